#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for trying the SLURM launcher and for the tests that need it.
#
#   sudo bash scripts/slurm_local.sh          start it (installs Debian's slurm-wlm if needed); idempotent
#   sudo bash scripts/slurm_local.sh stop     stop it
#
# Root only, and for a single machine you own: AuthType=auth/none lets any local user act as any other.
# The node's CPUs and memory are read from the machine (slurmd -C). Jobs run in place (no containers, no
# cgroups: ProctrackType=proctrack/linuxproc, TaskPlugin=task/none) and may be requeued (JobRequeue=1).
set -euo pipefail

CONF_DIR=/etc/slurm
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
LOG_DIR=/var/log/slurm

stop() {
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    for _ in $(seq 50); do
        pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || break
        sleep 0.1
    done
    echo "local Slurm stopped"
}

if [ "${1:-start}" = stop ]; then
    stop
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "slurm_local.sh: run as root (it writes $CONF_DIR and starts slurmctld and slurmd)" >&2
    exit 1
fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null; then
    echo "installing slurm-wlm (Debian's package)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q slurm-wlm >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q slurm-wlm >/dev/null; }
fi
if scontrol ping 2>/dev/null | grep -q UP && sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    echo "local Slurm already running: $(sinfo -h -o '%P %D node(s) %c CPUs %T')"
    exit 0
fi

stop >/dev/null
host=$(hostname -s)
node=$(slurmd -C | head -n 1)  # NodeName=<host> CPUs=... RealMemory=...
cpus=$(sed -E 's/.* CPUs=([0-9]+).*/\1/' <<<"$node")
memory=$(sed -E 's/.* RealMemory=([0-9]+).*/\1/' <<<"$node")
mkdir -p "$CONF_DIR" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR"
cat >"$CONF_DIR/slurm.conf" <<EOF
# Written by deit-train's scripts/slurm_local.sh: a one-node cluster for local tests.
ClusterName=local
SlurmctldHost=$host
AuthType=auth/none
CredType=cred/none
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=300
InactiveLimit=0
SchedulerParameters=sched_interval=1,bf_interval=1
NodeName=$host CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
slurmctld
slurmd
for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
        echo "local Slurm running: $(sinfo -h -o '%P: %D node (%N), %c CPUs, %m MB, %T')"
        echo "stop it with: bash $(realpath "$0") stop"
        exit 0
    fi
    sleep 0.5
done
echo "slurm_local.sh: the node did not come up; see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log" >&2
sinfo -N -l >&2 || true
exit 1
