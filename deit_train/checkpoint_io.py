"""How checkpoints are written: one write per epoch (EpochCheckpoints), which a crash cannot corrupt
(AtomicCheckpointIO: write beside the target, fsync, then rename over it).

Lightning's own atomic save stages the file in the system temp directory and moves it, which becomes a plain,
interruptible copy when that directory is on another filesystem than the run.
"""

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from deit_train.errors import StorageError


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(staging, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(staging, path)  # atomic on POSIX and Windows within one filesystem
        except (OSError, RuntimeError) as error:  # torch's writer can report a full disk as a RuntimeError
            cause = error
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__context__
            if cause is None and "write" not in str(error):
                raise
            reason = cause.strerror if cause is not None and cause.strerror else str(error).splitlines()[0]
            raise StorageError(
                f"could not write the checkpoint {path}: {reason}. Free space or fix the "
                f"permissions (the earlier checkpoints are intact), then resume=true"
            ) from error
        finally:
            staging.unlink(missing_ok=True)


class EpochCheckpoints(Callback):
    """One checkpoint write per epoch: checkpoints/last.ckpt after every epoch (to resume from), and best.ckpt, the
    best epoch by `monitor`, as a hard link to the last.ckpt of the epoch that improved it: the same file, not a
    second full write (Lightning's two ModelCheckpoint callbacks wrote and fsynced both, rank 0 alone while the
    other ranks waited). last.ckpt is replaced by a rename (AtomicCheckpointIO), so the link keeps the best epoch's
    bytes. Where the filesystem has no hard links, best.ckpt is a copy.

    The best score is decided before last.ckpt is written, so that the checkpoint a run resumes from knows its
    own best (a resumed run never replaces best.ckpt by a worse epoch)."""

    def __init__(self, dirpath: str, monitor: str | None, mode: str = "max") -> None:
        self.dirpath = Path(dirpath)
        self.monitor, self.mode = monitor, mode
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.saved_epoch: int | None = None

    @property
    def state_key(self) -> str:
        return f"EpochCheckpoints{{'monitor': {self.monitor!r}}}"

    def state_dict(self) -> dict:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best_score, self.best_epoch = state_dict["best_score"], state_dict["best_epoch"]

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        score = trainer.callback_metrics.get(self.monitor) if self.monitor else None
        improved = score is not None and bool(torch.isfinite(torch.as_tensor(score)))
        if improved and self.best_score is not None:
            improved = float(score) > self.best_score if self.mode == "max" else float(score) < self.best_score
        if improved:
            self.best_score, self.best_epoch = float(score), trainer.current_epoch
        self.save(trainer, best=improved)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.saved_epoch != trainer.current_epoch:  # no validation this epoch (check_val_every_n_epoch > 1)
            self.save(trainer, best=False)

    def save(self, trainer, best: bool) -> None:
        last = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(last, weights_only=False)  # whole: what resume=true continues from
        self.saved_epoch = trainer.current_epoch
        if best and trainer.is_global_zero:
            link(last, self.dirpath / "best.ckpt")
        trainer.strategy.barrier("best.ckpt")


def link(source: Path, target: Path) -> None:
    """target as the same file as source (a hard link made beside it and renamed over target), or a copy."""
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    staging.unlink(missing_ok=True)
    try:
        os.link(source, staging)
    except OSError:
        shutil.copyfile(source, staging)
    os.replace(staging, target)
