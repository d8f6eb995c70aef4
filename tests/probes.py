"""Callbacks the DDP tests add to a CLI run (+callbacks.NAME._target_=tests.probes.X); the run's PYTHONPATH holds
the repository root."""

from pathlib import Path

import lightning as L
import torch


class DropPathMasks(L.Callback):
    """Saves which samples each stochastic-depth layer of the student kept in the first training step, per rank:
    DropPath zeroes a dropped sample's residual branch and scales the kept ones."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.masks: list[torch.Tensor] = []
        self.handles = []

    def on_train_start(self, trainer, pl_module) -> None:
        for module in pl_module.student.modules():
            if type(module).__name__ == "DropPath":
                self.handles.append(module.register_forward_hook(self.record))

    def record(self, module, inputs, output) -> None:
        if len(self.masks) < len(self.handles):  # the first step only
            self.masks.append(output.detach().flatten(1).ne(0).any(dim=1))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.path.mkdir(parents=True, exist_ok=True)
            torch.save(torch.stack(self.masks), self.path / f"rank{trainer.global_rank}.pt")
            for handle in self.handles:
                handle.remove()
