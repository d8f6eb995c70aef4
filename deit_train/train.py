"""`deit-train`: compose the config, check it, let the task build its data and module, fit, write metrics.json.

The task (conf/task/, tasks/) decides what is trained; everything here is the same for every task: the run
directory (run_dir.py), the trainer, callbacks and loggers from their config groups, and the fit.
"""

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig, OmegaConf

import deit_train.conf
import deit_train.schema
from deit_train.cluster import acknowledge_warning_signals, fit_until_preempted, slurm_plugins
from deit_train.console import config_summary, quiet_console
from deit_train.data.sources import build_source
from deit_train.errors import DeitTrainError, debugging, error_boundary
from deit_train.models.checkpoints import read_run_checkpoint
from deit_train.results import format_metrics, metrics_record
from deit_train.run_dir import (
    RunLock,
    check_resume,
    discard_if_unused,
    finished_metrics,
    is_launch_leader,
    refuse_overwrite,
    resume_from,
    write_config,
    write_metrics,
)
from deit_train.sweep_jobs import clear_failure, in_sweep, record_failure
from deit_train.tasks.module import ddp_ignored
from deit_train.tasks.task import Task

CONFIG_DIR = str(Path(deit_train.conf.__file__).parent)
log = logging.getLogger("deit_train")


CHECKED: dict[str, Task] = {}  # the configs this process has checked, by their resolved text


def check_config(cfg: DictConfig) -> Task:
    """The schema's rules, the data source's and the task's own; returns the task. Raises DeitTrainError.

    A config is checked once per process: `deit-train` checks a single run's config before Hydra makes the run
    directory (cli.py: a refused run must write nothing), and train() then meets the same config again from Hydra.
    The precision choice is applied to every copy (it changes the config)."""
    key = hashlib.sha256(OmegaConf.to_yaml(cfg, resolve=True).encode()).hexdigest()
    task = CHECKED.get(key)
    if task is None:
        task = CHECKED[key] = checked_task(cfg)
    choose_precision(cfg)
    return task


def checked_task(cfg: DictConfig) -> Task:
    deit_train.schema.check(cfg)
    build_source(cfg.data)  # the data source's own keys and rules (data/sources/)
    try:
        task: Task = instantiate(cfg.task)
    except Exception as error:  # a task._target_ that does not import, or a field it does not take
        detail = str(error).splitlines()[0].split(", set env var HYDRA_FULL_ERROR")[0]
        raise DeitTrainError(f"task: {detail}") from error
    task.check(cfg)
    # A rule on how Hydra runs this job, which only the running job knows: it cannot be in the schema.
    if relaunches_ranks_inside_a_sweep(cfg):
        raise DeitTrainError(
            "trainer.strategy=ddp re-launches this script once per rank, which inside a local multirun (-m) "
            "would not find the job's directory. Use trainer=ddp_spawn (or trainer.strategy=ddp_spawn) in sweeps, "
            "or the SLURM launcher (hydra/launcher=slurm), where the ranks are SLURM tasks."
        )
    return task


def relaunches_ranks_inside_a_sweep(cfg: DictConfig) -> bool:
    """Lightning's `ddp` starts ranks 1..N-1 as new processes of this script with the run directory, not the
    sweep job's directory; under SLURM the ranks are already separate tasks and nothing is re-launched."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return False
    devices = cfg.trainer.devices
    several = devices in (-1, "auto") or (isinstance(devices, int) and devices > 1) or cfg.trainer.num_nodes > 1
    return str(cfg.trainer.strategy) == "ddp" and several and "SLURM_NTASKS" not in os.environ


def logger_run_id(logger_cfg: DictConfig, output_dir: Path) -> dict:
    """A W&B run id derived from the run directory, so that resuming in the same directory continues the same
    W&B run (unless logger.wandb.id is set)."""
    if not logger_cfg._target_.endswith("WandbLogger") or logger_cfg.get("id"):
        return {}
    digest = hashlib.sha1(str(output_dir.resolve()).encode()).hexdigest()[:16]
    return {"id": digest, "resume": "allow"}


@dataclass
class TrainRun:
    """What train() returns: the final validation metrics and the objects it built (None for a finished run that
    resume=true left as it was)."""

    metrics: dict[str, float]
    trainer: L.Trainer | None = None
    module: L.LightningModule | None = None
    datamodule: L.LightningDataModule | None = None


def train(cfg: DictConfig) -> TrainRun:
    """One run: check, build the task, fit, write metrics.json. Raises DeitTrainError for bad input."""
    quiet_console()
    task = check_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    leader = is_launch_leader()  # the other ranks of a run share its directory and leave it to the first
    lock = RunLock(output_dir)
    if leader:
        lock.acquire()
    started = False
    try:
        if leader:  # the other ranks start once the first is training, into the directory it owns
            refuse_overwrite(cfg, output_dir)
        if (finished := finished_metrics(cfg, output_dir)) is not None:
            log.info(
                "%s has finished its %d epochs: resume=true leaves it and its metrics.json as they are",
                output_dir,
                cfg.trainer.max_epochs,
            )
            return TrainRun(finished)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        built = task.build(cfg)
        checkpoint = resume_from(cfg, output_dir)
        if checkpoint is not None:
            stored = read_run_checkpoint(checkpoint, "ckpt_path" if cfg.ckpt_path else "resume=true")
            check_resume(cfg, stored.config, stored.class_names, getattr(built.module, "class_names", None))
        if leader:
            built.datamodule.scan()  # unreadable images, all of them, before training meets the first
        trainer = build_trainer(cfg, output_dir, built.callbacks, built.module)
        if leader:
            write_config(cfg, output_dir)
        log.info("%s", config_summary(cfg))
        started = True
        fit_until_preempted(trainer, built.module, datamodule=built.datamodule, ckpt_path=checkpoint, weights_only=True)
        for run_logger in trainer.loggers:
            if isinstance(run_logger, WandbLogger) and trainer.is_global_zero:
                run_logger.experiment.finish()  # the next run of a sweep in this process starts its own W&B run
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val")}
        if trainer.is_global_zero:
            write_metrics(metrics_record(metrics, trainer), output_dir)
            log.info("final metrics: %s", format_metrics(metrics))
    except BaseException:
        if leader and not started:
            lock.release()
            discard_if_unused(output_dir)
        raise
    finally:
        lock.release()
    return TrainRun(metrics, trainer, built.module, built.datamodule)


def choose_precision(cfg: DictConfig) -> None:
    """What the hardware can run: the GPU trainers ask for bf16-mixed; a GPU without bf16 (before Ampere) trains in
    16-mixed with the loss scaler instead, said once and recorded in the run's config. A GPU trainer on a machine
    without one is refused here, naming the CPU trainers."""
    accelerator = str(cfg.trainer.accelerator)
    if accelerator not in ("gpu", "cuda"):
        return
    if not torch.cuda.is_available():
        raise DeitTrainError(
            f"trainer.accelerator={accelerator} (trainer=gpu, ddp or ddp_spawn, and the ImageNet presets) but this "
            f"machine has no CUDA GPU: run it on a GPU node, or add trainer=cpu (trainer=ddp_cpu for several processes)"
        )
    if str(cfg.trainer.precision).startswith("bf16") and not torch.cuda.is_bf16_supported(including_emulation=False):
        fallback = "16-mixed" if "mixed" in str(cfg.trainer.precision) else "32-true"
        log.warning(
            "%s has no bf16: trainer.precision=%s instead of %s",
            torch.cuda.get_device_name(),
            fallback,
            cfg.trainer.precision,
        )
        cfg.trainer.precision = fallback


def distributed_strategy(cfg: DictConfig, module: L.LightningModule) -> str | DDPStrategy:
    """trainer.strategy=ddp / ddp_spawn as DDP's experts set it: gradients written straight into the all-reduce
    buckets (gradient_as_bucket_view); the frozen teacher and the divergence flag neither broadcast nor reduced
    (training.ddp_ignored); buffers broadcast from rank 0 at each forward only where the trained network has any
    (a convnet student's BatchNorm statistics, which then follow rank 0's; trainer.sync_batchnorm=true computes
    them over all ranks instead): a ViT has none. Any other strategy is Lightning's, as named."""
    name = str(cfg.trainer.strategy)
    if name not in ("ddp", "ddp_spawn"):
        return name
    module._ddp_params_and_buffers_to_ignore = ddp_ignored(module)
    network = getattr(module, "network", module)
    return DDPStrategy(
        start_method="spawn" if name == "ddp_spawn" else "popen",
        broadcast_buffers=any(True for _ in network.buffers()),
        gradient_as_bucket_view=True,
    )


def build_trainer(
    cfg: DictConfig, output_dir: Path, task_callbacks: list[L.Callback], module: L.LightningModule
) -> L.Trainer:
    """The trainer for `module`, with the callbacks and loggers of their config groups; a group entry set to null
    (callbacks.progress_bar=null) switches that object off."""
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None] + task_callbacks
    loggers = [instantiate(c, **logger_run_id(c, output_dir)) for c in cfg.logger.values() if c is not None]
    plugins = [instantiate(plugin) for plugin in cfg.trainer.plugins or []] + slurm_plugins()
    switches = {}
    if "enable_progress_bar" not in cfg.trainer:  # no progress bar callback: no bar (Lightning would add its own)
        switches["enable_progress_bar"] = any(isinstance(c, ProgressBar) for c in callbacks)
    acknowledge_warning_signals()
    try:
        return instantiate(
            cfg.trainer,
            callbacks=callbacks,
            logger=loggers,
            plugins=plugins,
            strategy=distributed_strategy(cfg, module),
            **switches,
        )
    except InstantiationException as error:  # Lightning refused a value (accelerator, strategy, devices, ...)
        cause = error.__cause__ or error
        raise DeitTrainError(
            f"the trainer refused its settings: {str(cause).strip().splitlines()[0]} (trainer.* "
            f"on the command line or in conf/trainer/)"
        ) from error


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    with error_boundary("deit-train"):  # a Ctrl-C or SIGTERM ends a sweep too
        try:
            metrics = train(cfg).metrics
        except Exception as error:
            if not in_sweep() or debugging():
                raise
            # A sweep job's error is recorded in its directory and the sweep goes on (sweep_jobs.py).
            return record_failure(error, Path(cfg.paths.output_dir), cfg.task.optimized_mode)
    if in_sweep():
        clear_failure(Path(cfg.paths.output_dir))
    # The value sweeps optimise (hparams_search's direction follows task.optimized_mode).
    return metrics.get(cfg.task.optimized_metric)
