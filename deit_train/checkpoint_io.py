"""Checkpoints that a crash cannot corrupt: write beside the target, fsync, then rename over it.

Lightning's own atomic save stages the file in the system temp directory and moves it, which becomes a plain,
interruptible copy when that directory is on another filesystem than the run.
"""

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(staging, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(staging, path)  # atomic on POSIX and Windows within one filesystem
        finally:
            staging.unlink(missing_ok=True)
