"""A quiet, useful console: the config summary, a progress bar, the per-epoch metrics and real warnings, without
the notices that say nothing about this run (advertising tips, the frozen teacher's eval mode, dependency
deprecations, Lightning's srun hint on a machine that merely has Slurm installed)."""

import logging
import re
import time
import warnings

import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from deit_train.metric_units import format_metrics

log = logging.getLogger("deit_train")

# Lightning's info lines and warnings that are noise here, each with why.
NOISE = [
    r"💡 Tip",  # advertising for Lightning's cloud products
    r"module\(s\) in eval mode",  # the frozen teacher is in eval mode on purpose (teacher/teacher.py)
    r"The `srun` command is available",  # a local launch on a machine with Slurm installed
    r"is deprecated|will be removed in",  # deprecations inside our dependencies; nothing a user can act on
    r"LeafSpec",  # torch's pytree deprecation, raised inside Lightning
    r"Loading `train_dataloader` to estimate",  # Lightning's note on sizing the schedule
    r"have no `validation_step`",  # task=teacher_cache validates nothing on purpose
    r"`configure_optimizers` returned `None`",  # task=teacher_cache trains nothing on purpose
    # the view keys stay on the host, the images are finished on the device, on purpose (data/views.py)
    r"overridden `(?:transfer_batch_to_device|on_after_batch_transfer)`",
]
NOISE_PATTERN = re.compile("|".join(NOISE))


class DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not NOISE_PATTERN.search(record.getMessage())


def quiet_console() -> None:
    """Filter Lightning's and the dependencies' noise, in this process (each DDP rank calls it)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropNoise) for f in logger.filters):
            logger.addFilter(DropNoise())
    for pattern in NOISE:
        warnings.filterwarnings("ignore", message=f".*(?:{pattern})")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(?!deit_train)")


def config_summary(cfg: DictConfig) -> str:
    """One line: the option chosen in each group and the run's main values."""
    choices = {}
    if HydraConfig.initialized():
        choices = {
            group: choice
            for group, choice in HydraConfig.get().runtime.choices.items()
            if not group.startswith("hydra") and choice is not None
        }
    chosen = " ".join(f"{group}={choice}" for group, choice in choices.items())
    return (
        f"config: {chosen} | model {cfg.model.name} at {cfg.model.img_size}px, batch {cfg.data.batch_size} "
        f"(global), lr {cfg.optim.lr}, {cfg.trainer.max_epochs} epochs, seed {cfg.seed} -> {cfg.paths.output_dir}"
    )


class StartupTime(L.Callback):
    """Logs the time from the run's start to its first training step (composing, checking, listing and scanning the
    data, building the networks, the process group): what every launch, resume and requeue pays before it trains."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.logged = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if not self.logged:
            self.logged = True
            log.info("first training step %.1f s after the run started", time.monotonic() - self.started)


class EpochSummary(L.Callback):
    """One line per validated epoch with its metrics (the progress bar keeps only the last epoch's)."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if "/" in k and v.numel() == 1 and not k.startswith("train/loss_") and "step" not in k
        }
        log.info("epoch %d: %s", trainer.current_epoch, format_metrics(metrics))
