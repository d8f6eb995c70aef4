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


class StepProbe(L.Callback):
    """What the training step really did: each micro-batch's size, the dtype of the student's logits, the gradient
    norm before clipping (on_before_optimizer_step) and as the optimizer uses it (after clipping)."""

    def __init__(self) -> None:
        self.micro_batches: list[int] = []
        self.logit_dtypes: set[torch.dtype] = set()
        self.norms_before_clipping: list[float] = []
        self.norms_at_step: list[float] = []

    @staticmethod
    def grad_norm(module) -> float:
        grads = [p.grad.detach().flatten() for p in module.parameters() if p.grad is not None]
        return torch.cat(grads).norm().item()

    def on_train_start(self, trainer, pl_module) -> None:
        pl_module.student.head.register_forward_hook(lambda m, i, out: self.logit_dtypes.add(out.dtype))
        optimizer = trainer.optimizers[0]
        step = optimizer.step

        def recorded_step(closure=None, **kwargs):
            def closure_then_record():  # Lightning clips inside the closure it hands the optimizer
                result = closure()
                self.norms_at_step.append(self.grad_norm(pl_module.student))
                return result

            return step(closure=closure_then_record, **kwargs)

        optimizer.step = recorded_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.micro_batches.append(len(batch[0]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.norms_before_clipping.append(self.grad_norm(pl_module.student))


class Interrupt(L.Callback):
    """Stops the run after epoch `epoch` (counted from 0), whose checkpoint is then the last: cleanly at its end
    (trainer.should_stop), or by SIGINT (Ctrl-C) or SIGKILL (a crash) at batch `batch` of the next epoch."""

    def __init__(self, epoch: int, batch: int = 1, how: str = "stop") -> None:
        self.epoch, self.batch, self.how = epoch, batch, how

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.how == "stop" and trainer.current_epoch == self.epoch:
            trainer.should_stop = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.how != "stop" and trainer.current_epoch == self.epoch + 1 and batch_idx == self.batch:
            import os
            import signal
            import time

            os.kill(os.getpid(), signal.SIGINT if self.how == "sigint" else signal.SIGKILL)
            time.sleep(30)  # Python runs the SIGINT handler (KeyboardInterrupt) here at the latest, even under load


class Pause(L.Callback):
    """Holds the run at the start of epoch `epoch` (its previous epoch's checkpoint written) for `seconds`."""

    def __init__(self, epoch: int = 1, seconds: float = 120) -> None:
        self.epoch, self.seconds = epoch, seconds

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            import time

            time.sleep(self.seconds)


class PoisonBatch(L.Callback):
    """Makes one rank's training loss NaN at batch `batch` (its images set to NaN), the other ranks' finite."""

    def __init__(self, rank: int = 1, batch: int = 0) -> None:
        self.rank, self.batch = rank, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and batch_idx == self.batch:
            batch[0].fill_(float("nan"))


class RankStates(L.Callback):
    """Saves each rank's student and EMA weights (and a feature term's projection) at the end of training, and how
    DDP wrapped the module (broadcast buffers, bucket views, what it ignores), to PATH/rank<R>.pt."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_end(self, trainer, pl_module) -> None:
        wrapped = trainer.strategy.model
        kept = ("student.", "ema.", "criterion.")
        state = {k: v.detach().cpu() for k, v in pl_module.state_dict().items() if k.startswith(kept)}
        ddp = {name: getattr(wrapped, name, None) for name in ("broadcast_buffers", "gradient_as_bucket_view")}
        ddp["ignored"] = sorted(getattr(wrapped, "parameters_to_ignore", []))
        self.path.mkdir(parents=True, exist_ok=True)
        torch.save({"state": state, "ddp": ddp}, self.path / f"rank{trainer.global_rank}.pt")


class Crash(L.Callback):
    """Raises an unexpected error (a RuntimeError, as a bug would) at the start of epoch `epoch`, if `value` is one
    of `crash_on`: a sweep passes `value=${loss.alpha}` to crash the jobs of chosen values."""

    def __init__(self, value: float, crash_on: list[float], epoch: int = 0) -> None:
        self.crash, self.epoch = value in list(crash_on), epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.crash and trainer.current_epoch == self.epoch:
            raise RuntimeError("probe crash")


class Terminate(L.Callback):
    """Sends SIGTERM to rank `rank`'s own process at batch `batch` of the first epoch (a preemption that reached
    one task first), and records the steps each rank ran to PATH/rank<R>.txt when it stops."""

    def __init__(self, path: str, rank: int = 1, batch: int = 2) -> None:
        self.path, self.rank, self.batch = Path(path), rank, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.current_epoch == 0 and batch_idx == self.batch:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / f"rank{trainer.global_rank}.txt").write_text(f"{trainer.global_step} {type(exception).__name__}")
