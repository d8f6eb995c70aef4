"""A run's results as a person reads them: metrics.json, the console's metric lines and the per-class files of the
epoch best.ckpt holds.

One scale everywhere a person reads a number: accuracies (top-k, the teacher's, the student-teacher agreement) in
percent, under keys that say so (`val/acc1_percent`), as deit-eval and deit-report print them; losses as they are.
The loggers (CSV, TensorBoard, W&B) keep Lightning's own values, fractions under the metric's name.

metrics.json:
  {"last_epoch":      {"epoch": 34, "val/acc1_percent": 56.83, ..., "val/loss": 1.31},
   "best_checkpoint": {"epoch": 30, "path": "checkpoints/best.ckpt", "monitor": "val/acc1", "val/acc1_percent": ...}}
"""

import logging
import os
from pathlib import Path

import lightning as L
import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from deit_train.class_results import PER_CLASS_NAME, class_results, describe, worst_classes, write_class_results
from deit_train.metric_units import BEST, LAST, in_percent

log = logging.getLogger("deit_train")


class BestEpoch(L.Callback):
    """Follows the epoch best.ckpt holds: its metrics (for metrics.json) and the confusion matrix of its prediction,
    written as per-class files into the run directory when training ends.

    An epoch is the best when its monitored metric improves strictly, as ModelCheckpoint chooses best.ckpt (this
    callback runs before the checkpoint callbacks, which Lightning puts last, so the checkpoint saved for an epoch
    holds that epoch's state: a resumed run goes on knowing its best). The confusion matrix counts the validation
    step's returned logits, synchronised over ranks as the module's metrics are. Tasks without classes (task=mim)
    get the metrics only."""

    def __init__(self, directory: str, monitor: str = "val/acc1", mode: str = "max") -> None:
        self.directory, self.monitor, self.mode = Path(directory), monitor, mode
        self.confusion: MulticlassConfusionMatrix | None = None
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.best_metrics: dict[str, float] = {}
        self.best_confusion: torch.Tensor | None = None
        self.last_epoch: int | None = None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        names = getattr(pl_module, "class_names", None)
        self.confusion = MulticlassConfusionMatrix(len(names)).to(pl_module.device) if names else None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.confusion is not None and isinstance(outputs, torch.Tensor):
            self.confusion.update(outputs.detach(), batch[1])

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        counted = self.confusion is not None and self.confusion.update_count > 0
        confusion = self.confusion.compute().cpu() if counted else None  # every rank takes part in the sync
        self.last_epoch = trainer.current_epoch
        score = trainer.callback_metrics.get(self.monitor)
        if score is None:
            return
        score = float(score)
        if self.best_score is None or (score > self.best_score if self.mode == "max" else score < self.best_score):
            self.best_score, self.best_epoch, self.best_confusion = score, trainer.current_epoch, confusion
            self.best_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val")}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        names = getattr(pl_module, "class_names", None)
        if trainer.is_global_zero and names and self.best_confusion is not None:
            write_class_results(self.best_confusion, names, self.directory)
            worst = worst_classes(class_results(self.best_confusion, names), 3)
            log.info(
                "per-class results of epoch %d (best.ckpt): %s; worst: %s",
                self.best_epoch,
                self.directory / PER_CLASS_NAME,
                describe(worst),
            )

    def state_dict(self) -> dict:
        return {
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "best_metrics": self.best_metrics,
            "best_confusion": self.best_confusion,
            "last_epoch": self.last_epoch,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        for key, value in state_dict.items():
            setattr(self, key, value)


def metrics_record(last: dict[str, float], trainer: L.Trainer) -> dict:
    """metrics.json's content: the last epoch's metrics (`last`, as logged) and, where the run followed it
    (BestEpoch), the epoch best.ckpt holds with its metrics. train.py writes it with run_dir.write_metrics."""
    best = next((c for c in trainer.callbacks if isinstance(c, BestEpoch)), None)
    record = {LAST: {"epoch": best.last_epoch if best and best.last_epoch is not None else trainer.current_epoch - 1}}
    record[LAST].update(in_percent(last))
    if best is not None and best.best_epoch is not None:
        from deit_train.checkpoint_io import EpochCheckpoints

        saved = [
            c.dirpath / "best.ckpt"
            for c in trainer.callbacks
            if isinstance(c, EpochCheckpoints) and c.monitor == best.monitor and c.best_epoch == best.best_epoch
        ]
        record[BEST] = {
            "epoch": best.best_epoch,
            "path": os.path.relpath(saved[0], best.directory) if saved else None,
            "monitor": best.monitor,
            **in_percent(best.best_metrics),
        }
    return record
