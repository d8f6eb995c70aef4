"""Optimizer and learning-rate schedule from the optim config group, with timm's factories."""

import lightning as L
from omegaconf import DictConfig
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn


def configure_optimizers(
    module: L.LightningModule, model: nn.Module, optim: DictConfig, global_batch_size: int
):
    """What LightningModule.configure_optimizers returns for training `model`; the schedule steps per optimizer
    step (the module's lr_scheduler_step calls scheduler.step_update)."""
    # Linear scaling rule of the paper: lr = base lr x global batch / 512.
    lr = optim.lr * global_batch_size / optim.lr_batch_ref if optim.lr_batch_ref else optim.lr
    # timm's factory: no weight decay on norms, biases, tokens and position embeddings.
    extra = dict(optim.kwargs)
    if optim.name == "adamw" and module.device.type == "cuda":
        extra.setdefault("fused", True)  # one kernel for the whole update
    optimizer = create_optimizer_v2(model, opt=optim.name, lr=lr, weight_decay=optim.weight_decay, **extra)
    trainer = module.trainer
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
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
