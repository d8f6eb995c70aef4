"""Running under Slurm: who owns requeueing, what a requeued job resumes from, and the signals clusters send.

Requeueing belongs to Slurm and submitit (hydra/launcher=slurm). A preempting scheduler or `scontrol requeue` sends
SIGTERM, kills the job and queues it again; submitit requeues a job that reaches its time limit (SIGUSR2, 90 s
before). The job then runs again in the same run directory and resumes from checkpoints/last.ckpt, which is written
atomically after every epoch (requeued_checkpoint, train.resume_from). Lightning's own SLURM auto-requeue stands
aside (auto_requeue=False): a second owner would requeue twice and write a mid-epoch checkpoint that a resumed run
could not continue exactly.
"""

import logging
import os
import signal
from pathlib import Path

from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


def slurm_restart_count() -> int:
    """How often Slurm has requeued this job (SLURM_RESTART_COUNT; 0 outside Slurm or on the first run)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def requeued_checkpoint(output_dir: Path) -> str | None:
    """last.ckpt of a job that Slurm requeued, which the job resumes from without being asked."""
    last, restarts = output_dir / "checkpoints" / "last.ckpt", slurm_restart_count()
    if restarts > 0 and last.is_file():
        log.info("Slurm requeued this job (restart %d): resuming from %s", restarts, last)
        return str(last)
    return None


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


def slurm_plugins() -> list:
    """Lightning's SLURM environment (ranks from Slurm's variables) without its auto-requeue, under Slurm."""
    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def acknowledge_warning_signals() -> None:
    """SIGUSR1 is the warning some clusters send before a time limit or preemption (sbatch --signal=USR1@90);
    its default action would kill the run at once. The run carries on until the SIGTERM that follows (on which
    Lightning stops at the next batch) and resumes from last.ckpt when requeued."""
    if SLURMEnvironment.detect():
        signal.signal(
            signal.SIGUSR1,
            lambda signum, frame: log.warning(
                "received SIGUSR1 (preemption or time limit ahead): training continues; a requeued job resumes from "
                "checkpoints/last.ckpt"
            ),
        )


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
