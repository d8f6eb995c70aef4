"""One run of deit-train, as one object with one lifecycle (Run): check, claim the directory, build, fit, record.

    run = Run(cfg)          # the config as composed; a data source may be handed in (tests, the benchmark)
    run.check()             # the schema's rules, the source's, the task's, the batch against the data's size
    run.claim()             # the run directory: lock, earlier results, resume (run_dir.RunDirectory)
    run.build()             # the task's data module (from the one source), module and callbacks; the trainer
    run.fit()               # Lightning's fit, stopped together by SIGTERM (cluster.py)
    run.record()            # metrics.json

Each step is called once, in this order: by `train(cfg)` inside a Hydra job (sweeps, the tests: train.py), or by
the command line (cli.py), which checks a single run before Hydra creates anything, then hands the same Run to
Hydra's job. The task (conf/task/, tasks/) decides what is trained; everything here is the same for every task.

This module imports Lightning, the tasks and the data sources only where a step needs them: a config refused by
the schema is refused before any of them is imported (the command line answers in the time of `import torch`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig

from deit_train import schema
from deit_train.errors import DeitTrainError
from deit_train.run_dir import RunDirectory, check_resume, is_launch_leader, resume_from

if TYPE_CHECKING:
    import lightning as L

    from deit_train.data.sources import DataSource
    from deit_train.tasks.task import Built, Task

log = logging.getLogger("deit_train")


@dataclass
class TrainRun:
    """What train() returns: the final validation metrics and the objects it built (None for a finished run that
    resume=true left as it was)."""

    metrics: dict[str, float]
    trainer: L.Trainer | None = None
    module: L.LightningModule | None = None
    datamodule: L.LightningDataModule | None = None


class Run:
    """One run of deit-train (the module docstring). `source`: the data, where it is not the config's data source
    (a test's in-memory images, the benchmark's)."""

    def __init__(self, cfg: DictConfig, source: DataSource | None = None, job: DictConfig | None = None) -> None:
        self.cfg = cfg
        self.source = source
        # the Hydra job's own node (what was typed, where its configs were found): a run checkpoint given as
        # model.init or teacher.checkpoint brings its network where they name none (adopt.py); None: none adopted
        self.job = job
        self.adopted: list[str] = []  # the networks a run checkpoint brought (check_config), said when it builds
        self.task: Task | None = None
        self.datamodule: L.LightningDataModule | None = None
        self.directory = RunDirectory(Path(cfg.paths.output_dir))
        self.leader = is_launch_leader()  # the other ranks of a run share its directory and leave it to the first
        self.built: Built | None = None
        self.trainer: L.Trainer | None = None
        self.checkpoint: str | None = None
        self.finished: dict | None = None
        self.started = time.monotonic()

    # ------------------------------------------------------------------------------------------------------ check
    def check(self, directory: bool = False) -> Task:
        """Every refusal that needs no training, before anything is written. Raises DeitTrainError. `directory`
        (the command line's first process): the run directory too (RunDirectory.check), after the config's own
        rules; a finished run that resume=true leaves as it is (self.finished) then needs no other check."""
        cfg = self.cfg
        self.check_config()
        # A rule on how Hydra runs this job, which only the running job knows: it cannot be in the schema.
        if relaunches_ranks_inside_a_sweep(cfg):
            raise DeitTrainError(
                "trainer.strategy=ddp re-launches this script once per rank, which inside a local multirun (-m) "
                "would not find the job's directory. Use trainer=ddp_spawn (or trainer.strategy=ddp_spawn) in "
                "sweeps, or the SLURM launcher (hydra/launcher=slurm), where the ranks are SLURM tasks."
            )
        if directory and self.leader:
            self.finished = self.directory.check(cfg)
            if self.finished is not None:
                return self.task
        # Then, cheapest first, each step importing what it needs (a refusal imports nothing after it): the data's
        # rules that read no image (its classes), the hardware (torch), the data's own rules (the batch against its
        # size; its views' policy first, which the data module builds), the rules that build an object with its
        # library (timm, Lightning).
        self.task.check_data(self.source)
        choose_precision(cfg)
        schema.check_augment_policy(cfg.augment)
        self.datamodule = self.task.datamodule(cfg, self.source)
        self.datamodule.check_batch_fits(named_world_size(cfg), cfg.trainer.accumulate_grad_batches)
        schema.check_optimizer(cfg.optim)
        from deit_train.callbacks import check_callbacks

        check_callbacks(cfg.callbacks)
        return self.task

    def check_config(self) -> Task:
        """The config's own rules: the schema's, the data source's keys and the task's, which read no data. A sweep
        checks each of its jobs with them before the first starts (sweep_jobs.check_jobs)."""
        cfg = self.cfg
        if cfg.model.init or cfg.teacher.checkpoint:  # reads the checkpoints' records: imports torch
            from deit_train.adopt import adopt_run_networks

            self.adopted = adopt_run_networks(cfg, self.job)
        schema.check(cfg)
        from deit_train.data.sources import build_source

        self.source = self.source or build_source(cfg.data)  # the data source's own keys and rules
        from deit_train.tasks.task import task_class

        if task_class(cfg.task.get("_target_")) is None:  # checked before anything it names is called
            raise DeitTrainError(
                f"task._target_={cfg.task.get('_target_')} is not a deit-train task (tasks/task.py: Task): choose "
                f"task=classify, mim or teacher_cache, or name a Task subclass"
            )
        try:
            self.task = instantiate(cfg.task)
        except Exception as error:  # a field the task does not take
            detail = " ".join(str(error).split(", set env var HYDRA_FULL_ERROR")[0].split())
            raise DeitTrainError(f"task: {detail}") from error
        self.task.check(cfg)
        return self.task

    # ------------------------------------------------------------------------------------------------------ claim
    def claim(self) -> dict | None:
        """The run directory for this run (its first process); the metrics of a finished run that resume=true
        leaves as it is, else None."""
        if self.leader:
            self.finished = self.directory.claim(self.cfg)
        if self.finished is not None:
            log.info(
                "%s has finished its %d epochs: resume=true leaves it and its metrics.json as they are",
                self.directory.path,
                self.cfg.trainer.max_epochs,
            )
        return self.finished

    # ------------------------------------------------------------------------------------------------------ build
    def build(self) -> None:
        import lightning as L

        from deit_train.console import StartupTime, config_summary
        from deit_train.models.checkpoints import read_run_checkpoint

        cfg = self.cfg
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        self.built = built = self.task.build(cfg, self.datamodule)
        self.checkpoint = resume_from(cfg, self.directory.path)
        if self.checkpoint is not None:
            stored = read_run_checkpoint(self.checkpoint, "ckpt_path" if cfg.ckpt_path else "resume=true")
            check_resume(
                cfg,
                stored.config,
                stored.class_names,
                getattr(built.module, "class_names", None),
                stored_files=stored.weights_files,
            )
        if self.leader:
            built.datamodule.scan()  # unreadable images, all of them, before training meets the first
        callbacks = [*built.callbacks, StartupTime(self.started)]
        self.trainer = build_trainer(cfg, self.directory.path, callbacks, built.module)
        if self.leader:
            self.directory.write_config(cfg)
        log.info("%s", config_summary(cfg))
        for line in self.adopted:
            log.info("%s", line)

    # -------------------------------------------------------------------------------------------------------- fit
    def fit(self) -> None:
        from lightning.pytorch.loggers import WandbLogger

        from deit_train.cluster import fit_until_preempted

        built = self.built
        fit_until_preempted(
            self.trainer, built.module, datamodule=built.datamodule, ckpt_path=self.checkpoint, weights_only=True
        )
        for run_logger in self.trainer.loggers:
            if isinstance(run_logger, WandbLogger) and self.trainer.is_global_zero:
                run_logger.experiment.finish()  # the next run of a sweep in this process starts its own W&B run

    # ----------------------------------------------------------------------------------------------------- record
    def record(self) -> dict[str, float]:
        """metrics.json: the last epoch's and best.ckpt's (results.py); the last epoch's are returned."""
        from deit_train.metric_units import format_metrics
        from deit_train.results import metrics_record

        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val")}
        if self.trainer.is_global_zero:
            self.directory.write_metrics(metrics_record(metrics, self.trainer))
            log.info("final metrics: %s", format_metrics(metrics))
        return metrics

    # ------------------------------------------------------------------------------------------------------- all
    def execute(self) -> TrainRun:
        """claim, build, fit, record (check has run); the directory released whatever happens, and what this run
        created in it removed when it failed before training."""
        from deit_train.console import quiet_console

        quiet_console()
        trained = False
        try:
            if self.claim() is not None:
                trained = True
                return TrainRun(self.finished)
            self.build()
            trained = True  # from here on the run writes what it trained: kept whatever happens
            self.fit()
            metrics = self.record()
        finally:
            if self.leader:
                self.directory.release(trained)
        return TrainRun(metrics, self.trainer, self.built.module, self.built.datamodule)


def named_world_size(cfg: DictConfig) -> int:
    """The processes the config names (devices x nodes); 1 where only the trainer knows (devices=auto or -1)."""
    devices = cfg.trainer.devices
    if isinstance(devices, int) and devices > 0:
        count = devices
    elif isinstance(devices, str) and devices.isdigit():
        count = int(devices)
    elif not isinstance(devices, (int, str)) and devices is not None:
        count = len(devices)
    else:
        count = 1
    return count * int(cfg.trainer.num_nodes or 1)


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


def choose_precision(cfg: DictConfig) -> None:
    """What the hardware can run, whatever the trainer: trainer.precision=auto (the default) is bf16-mixed on a GPU
    (as the paper and the official code train), 32-true on a CPU; a GPU without bf16 (before Ampere) trains in
    16-mixed with the loss scaler instead, said once. The choice is recorded in the run's config. A GPU trainer on a
    machine without one is refused here, naming the CPU trainers."""
    import torch

    accelerator = str(cfg.trainer.accelerator)
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if str(cfg.trainer.precision) == "auto":
        cfg.trainer.precision = "bf16-mixed" if on_gpu else "32-true"
    if not on_gpu:
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


def distributed_strategy(cfg: DictConfig, module: L.LightningModule) -> object:
    """trainer.strategy=ddp / ddp_spawn as DDP's experts set it: gradients written straight into the all-reduce
    buckets (gradient_as_bucket_view); the frozen teacher and the divergence flag neither broadcast nor reduced
    (training.ddp_ignored); buffers broadcast from rank 0 at each forward only where the trained network has any
    (a convnet student's BatchNorm statistics, which then follow rank 0's; trainer.sync_batchnorm=true computes
    them over all ranks instead): a ViT has none. Any other strategy is Lightning's, as named."""
    from lightning.pytorch.strategies import DDPStrategy

    from deit_train.tasks.module import ddp_ignored

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
    from hydra.errors import InstantiationException
    from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar

    from deit_train.cluster import PreemptionAgreement, acknowledge_warning_signals, cluster_environment

    if str(cfg.trainer.precision) == "auto":  # a trainer built from a config the run did not check (benchmarks)
        choose_precision(cfg)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None] + task_callbacks
    loggers = [instantiate(c, **logger_run_id(c, output_dir)) for c in (cfg.logger or {}).values() if c is not None]
    if not loggers and any(isinstance(c, LearningRateMonitor) for c in callbacks):  # Lightning refuses it then
        log.info("no logger (~logger): the learning-rate monitor (callbacks.lr_monitor) has nothing to write to")
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    plugins = [instantiate(plugin) for plugin in cfg.trainer.plugins or []] + [cluster_environment()]
    # checkpoints are the callbacks group's (checkpoint_io.EpochCheckpoints): none of Lightning's own beside them
    switches = {"enable_checkpointing": False}
    if "enable_progress_bar" not in cfg.trainer:  # no progress bar callback: no bar (Lightning would add its own)
        switches["enable_progress_bar"] = any(isinstance(c, ProgressBar) for c in callbacks)
    acknowledge_warning_signals()
    try:
        trainer = instantiate(
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
    trainer.deit_preemption = PreemptionAgreement(trainer)
    trainer.deit_preemption.install()
    return trainer
