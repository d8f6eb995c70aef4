"""What every task's LightningModule shares: the optimizer and schedule of the optim group, model randomness
drawn from (seed, epoch, rank), a guard that stops a diverged run before it can replace the last good
checkpoint, and the run config and metadata inside every checkpoint."""

import logging
import math

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

from deit_train.cluster import preemption_agreement
from deit_train.console import quiet_console
from deit_train.data.views import MODEL_STREAM, ViewsOnDevice, view_seed
from deit_train.errors import TrainingDiverged

log = logging.getLogger("deit_train")

CHECKPOINT_FORMAT = 1  # checkpoint["deit_train"]["format"]: how a deit-train checkpoint is laid out


class TrainingModule(ViewsOnDevice, L.LightningModule):
    """A task's module sets `network` (the nn.Module the optimizer trains) and calls `self.track(loss)` in its
    training step. `student_prefix`: where the weights that start a student (model.init) sit in its state dict.
    Its steps get the batch's images as normalised floats, made on the device from uint8 (ViewsOnDevice)."""

    student_prefix = "student."
    divergence_advice = "Lower optim.lr, set trainer.gradient_clip_val=1.0, or prefer bf16-mixed to 16-mixed"

    def __init__(self, optim: DictConfig, global_batch_size: int, seed: int = 0, config: dict | None = None):
        super().__init__()
        self.optim = optim
        self.global_batch_size = global_batch_size
        self.seed = seed
        # The resolved run config travels in every checkpoint (plain containers: weights_only-safe).
        self.save_hyperparameters({"config": config or {}})
        # Set on the device when a loss is NaN/inf; read (a host sync) only at log steps and before a save.
        self.register_buffer("loss_diverged", torch.tensor(False), persistent=False)
        self.fresh_optimizer_settings: tuple[list[dict], dict] | None = None
        self.weights_files: dict[str, str] | None = None  # on_save_checkpoint: the sha256 of its weights files

    @property
    def network(self) -> nn.Module:
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        """In every rank's process, spawned ones included (trainer=ddp_spawn starts them after train.py ran)."""
        quiet_console()
        if self.trainer.strategy.root_device.type == "cuda":
            fast_cuda_math()
        teacher = getattr(self, "teacher", None)
        if teacher is not None:
            teacher.hold_in(self.trainer.precision)

    # Model randomness (drop path, dropout) is drawn from (seed, epoch, rank): each rank its own masks, as the
    # official code's seed + rank, and a run resumed at an epoch boundary draws what the uninterrupted run draws.
    # The data views have their own seeds (data/views.py).
    def on_train_epoch_start(self) -> None:
        torch.manual_seed(view_seed(self.seed, self.current_epoch, self.global_rank, MODEL_STREAM))

    def track(self, loss: torch.Tensor) -> None:
        """Remember a non-finite loss without a host sync; check it at log steps."""
        self.loss_diverged |= ~torch.isfinite(loss.detach())
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.stop_if_diverged()

    def stop_if_diverged(self) -> None:
        """Decided by all ranks together, in one host sync: a rank that raised alone would leave the others waiting
        in the next all-reduce (a hang, not an exit 5). The loss flag and the weights' finiteness are reduced (max)
        over the ranks and read once; which weight went bad is looked up only then. The same reduce carries whether
        any rank received SIGTERM (cluster.PreemptionAgreement): the only collective a training step makes besides
        the gradients' all-reduce, and only at log steps."""
        parameters = [p.detach() for p in self.network.parameters()]
        weights_bad = ~torch.stack([torch.isfinite(p).all() for p in parameters]).all()
        preemption = preemption_agreement(self.trainer)
        signalled = torch.tensor(preemption is not None and preemption.signalled, device=weights_bad.device)
        flags = torch.stack([self.loss_diverged, weights_bad, signalled]).float()
        if self.trainer.world_size > 1:
            flags = self.trainer.strategy.reduce(flags, reduce_op="max")
        loss_bad, weights_bad, signalled = (bool(flag) for flag in flags.tolist())
        if signalled and preemption is not None:
            preemption.stop()  # every rank in this same step: Lightning ends the epoch loop on all of them
        if loss_bad:
            raise TrainingDiverged(
                f"the training loss became NaN or inf (detected at step {self.global_step}). The last good "
                f"checkpoint is kept. {self.divergence_advice}; then resume=true or start again."
            )
        if weights_bad:
            bad = next((n for n, p in self.network.named_parameters() if not torch.isfinite(p).all()), "on a rank")
            raise TrainingDiverged(
                f"the weights became NaN or inf ({bad}, at step {self.global_step}) while the loss was still "
                f"finite. The last good checkpoint is kept. {self.divergence_advice}; then resume=true or start "
                f"again."
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.stop_if_diverged()  # never replace the last good checkpoint by a diverged model
        if self.weights_files is None:  # read once: the files this start was given (a resume's are compared by them)
            from deit_train.run_dir import weights_files

            self.weights_files = weights_files(self.hparams["config"])
        checkpoint["deit_train"] = {
            "format": CHECKPOINT_FORMAT,
            "student": self.student_prefix,
            "weights_files": self.weights_files,
        }

    def configure_optimizers(self):
        """The optim group's optimizer (timm's factory) with the paper's linear scaling rule, and its schedule
        (timm's), stepped per optimizer step by lr_scheduler_step."""
        optim = self.optim
        lr = optim.lr * self.global_batch_size / optim.lr_batch_ref if optim.lr_batch_ref else optim.lr
        extra = dict(optim.kwargs)
        # A fused AdamW unscales 16-mixed gradients inside its step, after Lightning would clip them: Lightning
        # refuses that pair at the first step, so with clipping under the GradScaler the update stays unfused.
        clips_scaled = self.trainer.precision == "16-mixed" and bool(self.trainer.gradient_clip_val)
        if optim.name == "adamw" and self.device.type == "cuda" and not clips_scaled:
            extra.setdefault("fused", True)  # one kernel for the whole update
        # No weight decay on norms, biases, tokens and position embeddings (timm's factory).
        optimizer = create_optimizer_v2(self.network, opt=optim.name, lr=lr, weight_decay=optim.weight_decay, **extra)
        trainer = self.trainer
        # Our data module counts the steps without making the training loader: Lightning's estimate makes it, and
        # its first iterator, before a resumed run's epoch is restored (data/datamodule.py). Without a data module
        # (loaders given to fit, as scripts/benchmark.py does) Lightning's estimate it is.
        if trainer.datamodule is not None:
            steps_per_epoch = trainer.datamodule.steps_per_epoch()
        else:
            steps_per_epoch = max(1, trainer.estimated_stepping_batches // max(1, trainer.max_epochs))
        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched=optim.schedule,
            num_epochs=trainer.max_epochs,
            warmup_epochs=optim.warmup_epochs,
            warmup_lr=optim.warmup_lr,
            min_lr=optim.min_lr,
            step_on_epochs=False,  # per optimizer step: a smooth warm-up even for short runs
            updates_per_epoch=steps_per_epoch,
        )
        groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        self.fresh_optimizer_settings = (groups, scheduler.state_dict())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        """A resumed run restored the optimizer's hyper-parameters and the schedule's settings from the checkpoint;
        put back this run's (optim.lr, weight decay, warm-up, min lr, max_epochs), keeping the optimizer's moments.
        timm's schedules are functions of the step, so their state holds nothing but settings."""
        if self.trainer.ckpt_path is None or self.fresh_optimizer_settings is None:
            return
        groups, schedule = self.fresh_optimizer_settings
        optimizer = self.trainer.optimizers[0]
        for group, fresh in zip(optimizer.param_groups, groups, strict=True):
            group.update(fresh)
        scheduler = self.trainer.lr_scheduler_configs[0].scheduler
        before = scheduler._get_lr(self.global_step)[0]  # the stored schedule's rate at this step (timm's)
        scheduler.load_state_dict(schedule)
        scheduler.step_update(num_updates=self.global_step)  # the rate of the next step, as without a stop
        after = scheduler._get_lr(self.global_step)[0]
        if not math.isclose(before, after, rel_tol=1e-6):
            log.info(
                "resume: at step %d the learning rate is the new schedule's, %.3g (the stored schedule had %.3g): "
                "trainer.max_epochs and optim.* as given now shape the rest of the run",
                self.global_step,
                after,
                before,
            )

    def lr_scheduler_step(self, scheduler, metric) -> None:
        scheduler.step_update(num_updates=self.global_step)


def run_config(cfg: DictConfig) -> dict:
    """The resolved run config as plain containers, as checkpoints store it."""
    return OmegaConf.to_container(cfg, resolve=True)


def fast_cuda_math() -> None:
    """TF32 matmuls and convolutions on Ampere and newer (fp32 work: the loss, the EMA, a 32-true run), and cuDNN's
    autotuner for the fixed input sizes. Process-wide settings: set in each rank."""
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def ddp_ignored(module: nn.Module) -> list[str]:
    """What DDP must neither broadcast nor reduce: the frozen teacher (every rank loads the same weights; its
    BatchNorm buffers would be broadcast every forward), and each rank's own divergence flag (tasks/module.py)."""
    names = [name for name, _ in module.named_parameters()] + [name for name, _ in module.named_buffers()]
    return [name for name in names if name.startswith("teacher.") or name == "loss_diverged"]
