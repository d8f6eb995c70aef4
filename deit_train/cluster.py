"""Running under Slurm (or any launcher that starts one process per device): who owns requeueing, what a requeued job
resumes from, where each task's device and CPUs are, how the ranks agree to stop, and the signals clusters send.

Requeueing belongs to Slurm and submitit (hydra/launcher=slurm). A preempting scheduler or `scontrol requeue` sends
SIGTERM, kills the job and queues it again; submitit requeues a job that reaches its time limit (SIGUSR2, 90 s
before). The job then runs again in the same run directory (`run_name`: the job id under Slurm) and resumes from
checkpoints/last.ckpt, which is written atomically after every epoch (requeued_checkpoint, run_dir.resume_from).
Lightning's own SLURM auto-requeue stands aside (auto_requeue=False): a second owner would requeue twice and write a
mid-epoch checkpoint that a resumed run could not continue exactly.

Lightning is imported inside the functions that need it: the command line imports this module to resolve the run
directory before a single argument is checked (cli.py answers without importing Lightning).
"""

import fcntl
import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger("deit_train")

CPU_TOPOLOGY = Path("/sys/devices/system/cpu")  # the kernel's cpuN/topology/{physical_package_id,core_id}


def slurm_restart_count() -> int:
    """How often Slurm has requeued this job (SLURM_RESTART_COUNT; 0 outside Slurm or on the first run)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def slurm_job() -> str | None:
    """This Slurm job's id as `scontrol requeue` names it (an array task as JOB_TASK), with the step for a job step
    (srun): every task of one step shares it, a requeued job keeps it, two steps of one job differ. None outside
    Slurm and in an interactive allocation's shell (salloc), where each command is a run of its own."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if not job or os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive", "sh", "zsh"):
        return None
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job += f"_{os.environ['SLURM_ARRAY_TASK_ID']}"
    step = os.environ.get("SLURM_STEP_ID", os.environ.get("SLURM_STEPID"))
    return f"{job}.{step}" if step not in (None, "", "batch", "4294967294") else job


def run_name(otherwise: str) -> str:
    """The run directory's name under outputs/ (conf/hydra/default.yaml): under Slurm `slurm-<job>`, which every
    task of the job resolves alike (`${now:...}` is each task's own clock) and a requeued job finds again;
    `otherwise` (the date and time) elsewhere."""
    job = slurm_job()
    return f"slurm-{job}" if job else otherwise


def requeued_checkpoint(output_dir: Path) -> str | None:
    """last.ckpt of a job that Slurm requeued, which the job resumes from without being asked."""
    last, restarts = output_dir / "checkpoints" / "last.ckpt", slurm_restart_count()
    if restarts > 0 and last.is_file():
        log.info("Slurm requeued this job (restart %d): resuming from %s", restarts, last)
        return str(last)
    return None


def cluster_environment():
    """The cluster environment the trainer runs in (ranks, local rank, node), as Lightning chooses it, with Slurm's
    requeue left to Slurm (module docstring). The trainer gets this very object (train.build_trainer), and each
    task's device and CPUs are read from it, never from a variable one launcher happens to set."""
    from lightning.fabric.plugins.environments import (
        LightningEnvironment,
        LSFEnvironment,
        MPIEnvironment,
        SLURMEnvironment,
        TorchElasticEnvironment,
    )

    for environment in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment):  # Lightning's order
        if environment.detect():
            return SLURMEnvironment(auto_requeue=False) if environment is SLURMEnvironment else environment()
    return LightningEnvironment()


def process_device(accelerator: str, devices: object, environment=None):
    """This process's device, as the trainer's strategy will place it: the local rank's entry of the devices the
    trainer uses (trainer.devices: a count, a list or "auto"). Under Slurm and submitit the local rank is
    SLURM_LOCALID, not LOCAL_RANK: reading LOCAL_RANK put every task of a node on GPU 0."""
    import torch

    if str(accelerator) not in ("auto", "gpu", "cuda") or not torch.cuda.is_available():
        return torch.device("cpu")
    environment = environment or cluster_environment()
    return torch.device("cuda", gpu_index(environment.local_rank(), devices, torch.cuda.device_count()))


def gpu_index(local_rank: int, devices: object, visible: int) -> int:
    """The GPU of local rank `local_rank` among `visible` ones: Lightning's parallel devices (trainer.devices as a
    count takes the first ones, as a list or "0,2" those), indexed by the local rank. A task that sees fewer GPUs
    than the node has (Slurm's --gpus-per-task binds each task to its own) takes its own first."""
    ids = device_ids(devices, visible)
    index = ids[local_rank] if local_rank < len(ids) else local_rank
    return index if index < visible else 0


def device_ids(devices: object, visible: int) -> list[int]:
    """trainer.devices as Lightning reads it for GPUs: a count (the first ones; -1 or "auto" all), a list, or a
    string of indices with a comma ("0,2", "1,")."""
    if devices in (None, "auto", -1, "-1"):
        return list(range(visible))
    if isinstance(devices, str):
        if "," in devices:
            return [int(part) for part in devices.split(",") if part.strip()]
        devices = int(devices)
    if isinstance(devices, int):
        return list(range(devices))
    return [int(index) for index in devices]


def usable_cpus(devices_on_node: int, environment=None) -> int:
    """The CPUs this process's data loading may use, in physical cores where the kernel tells them apart:
    - a task that Slurm bound to its own CPUs (several tasks on the node, --cpus-per-task, the affinity no larger than
      its share) has them all;
    - otherwise the affinity is the node's (one process per node starting the others, torchrun, Slurm without
      binding), shared by the node's devices.
    Hyperthreads of one core count once: decoding and augmenting saturate a core's units, and a 224-thread node of
    112 cores gave 27 workers per rank of 8 where 13 is what the cores can feed."""
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = physical_cores(affinity, CPU_TOPOLOGY)
    if task_owns_its_cpus(len(affinity), environment):
        return cores
    return max(1, cores // max(1, devices_on_node))


def task_owns_its_cpus(affinity_size: int, environment=None) -> bool:
    """Whether this process's CPU affinity is its own share (Slurm binding one task per device), not the node's."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    environment = environment or cluster_environment()
    if not isinstance(environment, SLURMEnvironment):
        return False
    tasks_here = slurm_tasks_on_this_node()
    per_task = int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0)
    # Slurm counts hyperthreads as CPUs: a task of --cpus-per-task=10 is bound to 10 of them
    return tasks_here > 1 and per_task > 0 and affinity_size <= per_task


def slurm_tasks_on_this_node() -> int:
    """SLURM_NTASKS_PER_NODE, or this node's entry of SLURM_TASKS_PER_NODE ("8(x4)" or "8,8,4")."""
    if os.environ.get("SLURM_NTASKS_PER_NODE"):
        return int(os.environ["SLURM_NTASKS_PER_NODE"])
    layout = os.environ.get("SLURM_TASKS_PER_NODE", "")
    counts = []
    for part in layout.split(","):
        if not part:
            continue
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    node = int(os.environ.get("SLURM_NODEID", "0") or 0)
    return counts[node] if node < len(counts) else 1


def physical_cores(cpus: list[int], topology: Path) -> int:
    """How many physical cores `cpus` (logical CPU numbers) span, from the kernel's topology files; the logical count
    where they cannot be read."""
    cores = set()
    for cpu in cpus:
        try:
            package = (topology / f"cpu{cpu}" / "topology" / "physical_package_id").read_text().strip()
            core = (topology / f"cpu{cpu}" / "topology" / "core_id").read_text().strip()
        except OSError:
            return len(cpus)
        cores.add((package, core))
    return len(cores) or len(cpus)


@contextmanager
def once_per_node(name: str, folder: Path) -> Iterator[None]:
    """Let one process of the node at a time through (an flock in `folder`, the download cache every task shares):
    the first task fetches the teacher's weights, the others wait and then find them there, instead of each
    downloading the same file at once. Where the filesystem has no locks, each goes through."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".deit-train-{name}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def fit_until_preempted(trainer, *args, **kwargs) -> None:
    """trainer.fit, ending the process without a result when it was stopped by SIGTERM (preemption, requeue,
    scancel): exit status 143, whatever broke while stopping (a logger's service killed by the same signal, say).
    A launcher then waits for the requeued job instead of reporting this run's stop as its result."""
    try:
        trainer.fit(*args, **kwargs)
    except BaseException as error:
        if getattr(trainer, "received_sigterm", False):
            log.warning(
                "stopped by SIGTERM at epoch %d, step %d: a requeued job resumes from checkpoints/last.ckpt",
                trainer.current_epoch,
                trainer.global_step,
            )
            raise SystemExit(128 + signal.SIGTERM) from error
        if isinstance(error, SystemExit) and trainer.interrupted:  # Lightning's answer to Ctrl-C: sys.exit(1)
            log.warning(
                "interrupted at epoch %d, step %d: resume=true continues from checkpoints/last.ckpt",
                trainer.current_epoch,
                trainer.global_step,
            )
            raise SystemExit(128 + signal.SIGINT) from error
        raise


class PreemptionAgreement:
    """A SIGTERM agreed by the ranks at the steps where they already meet, not at every step.

    Lightning (2.6) broadcasts a SIGTERM flag from rank 0 and reads it on the host before every training step of a
    multi-process run (`_broadcast_sigterm_tensor`, Lightning issue #21487), and broadcasts again from inside the
    signal handler: a collective and a host sync per step, which keeps the CPU from running ahead of the GPU. Here
    the handler only notes the signal (and passes it to the ranks a launcher started, as Lightning's does), and the
    ranks agree on it in the divergence check's one reduce at log steps and before every checkpoint
    (tasks/module.py, stop_if_diverged): when any rank was signalled, every rank sets Lightning's `received_sigterm`
    in the same step, and Lightning stops them all there. A SIGTERM reaches a run within log_every_n_steps steps;
    Slurm waits KillWait (30 s by default) before it kills."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.signalled = False

    def install(self) -> None:
        """Take over Lightning's two per-step broadcasts on this trainer; the handlers are registered by fit."""
        connector = self.trainer._signal_connector
        connector._sigterm_notifier_fn = self.notice
        self.trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = self.skip_broadcast

    def skip_broadcast(self) -> None:
        """Stands in for the per-step broadcast (a method, not a lambda: ddp_spawn pickles the trainer)."""

    def notice(self, signum, frame) -> None:
        log.info("received SIGTERM: the ranks stop together at the next log step")
        launcher = self.trainer.strategy.launcher
        if not self.signalled and launcher is not None:
            launcher.kill(signum)
        self.signalled = True
        if self.trainer.world_size == 1:
            self.stop()

    def stop(self) -> None:
        self.trainer._signal_connector.received_sigterm = True


def preemption_agreement(trainer) -> PreemptionAgreement | None:
    return getattr(trainer, "deit_preemption", None)


def acknowledge_warning_signals() -> None:
    """SIGUSR1 is the warning some clusters send before a time limit or preemption (sbatch --signal=USR1@90);
    its default action would kill the run at once. The run carries on until the SIGTERM that follows (on which
    Lightning stops at the next batch) and resumes from last.ckpt when requeued."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        signal.signal(
            signal.SIGUSR1,
            lambda signum, frame: log.warning(
                "received SIGUSR1 (preemption or time limit ahead): training continues; a requeued job resumes from "
                "checkpoints/last.ckpt"
            ),
        )


def worker_options(workers: int) -> dict:
    """A training or validation loader's worker processes: how they start and what they ignore (data_worker_init).
    Their start method is the platform's, unless this process runs in a launcher that replaced it: joblib's
    (hydra/launcher=local_parallel) makes its own, loky, the default, whose processes cannot start a loader's
    workers ("'Process' object has no attribute 'env'"); there they fork where the platform can, else spawn."""
    import multiprocessing

    if workers == 0:
        return {}
    method = multiprocessing.get_start_method(allow_none=True)
    standard = method in (None, *multiprocessing.get_all_start_methods())
    start = None if standard else "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return {"worker_init_fn": data_worker_init, "multiprocessing_context": start}


def data_worker_init(worker_id: int) -> None:
    """Data-loader workers leave SIGTERM and SIGUSR1 to the main process: Slurm signals every process of a job,
    and a worker dying first would end the run with "DataLoader worker ... is killed by signal: Terminated"
    instead of Lightning's orderly stop. The main process ends the workers itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def slurm_gpus_per_node(accelerator: str, devices) -> int | None:
    """hydra/launcher=slurm's GPU request: none for trainer.accelerator=cpu (sbatch refuses a GPU request on a
    cluster without GPUs), else one per device."""
    return None if str(accelerator) == "cpu" else devices


OmegaConf.register_new_resolver("slurm_gpus_per_node", slurm_gpus_per_node, replace=True)
OmegaConf.register_new_resolver("run_name", run_name, replace=True)
