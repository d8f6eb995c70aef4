"""Checkpoints that a crash cannot corrupt: write beside the target, fsync, then rename over it.

Lightning's own atomic save stages the file in the system temp directory and moves it, which becomes a plain,
interruptible copy when that directory is on another filesystem than the run.
"""

import os
from pathlib import Path
from typing import Any

import torch
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
