"""The LightningModule: a student, an optional frozen teacher (teacher/) and the DeiT loss (losses.py)."""

import lightning as L
import torch
from omegaconf import DictConfig
from timm.data import Mixup
from timm.utils import ModelEmaV3
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from deit_train.data.views import MIXUP_STREAM, seeded, view_seed
from deit_train.errors import DeitTrainError
from deit_train.losses import DistillationLoss
from deit_train.models import average_heads, forward_heads, is_distilled
from deit_train.optim import configure_optimizers
from deit_train.teacher import Teacher


class DeiTModule(L.LightningModule):
    def __init__(
        self,
        student: nn.Module,
        criterion: DistillationLoss,
        class_names: list[str],
        optim: DictConfig,
        augment: DictConfig,
        global_batch_size: int,
        teacher: Teacher | None = None,
        ema_decay: float | None = None,
        seed: int = 0,
        fill_teacher_cache_only: bool = False,
        config: dict | None = None,
    ) -> None:
        super().__init__()
        if criterion.needs_teacher and teacher is None:
            raise ValueError(f"{criterion.distillation_type} distillation needs a teacher")
        self.student = student
        self.teacher = teacher
        self.criterion = criterion
        self.class_names = list(class_names)
        self.optim = optim
        self.global_batch_size = global_batch_size
        self.seed = seed
        # task=teacher_cache: the teacher fills its cache, the student takes no step (training_step returns None).
        self.fill_teacher_cache_only = fill_teacher_cache_only
        self.automatic_optimization = not fill_teacher_cache_only
        self.mixup = build_mixup(augment, self.num_classes)
        # An exponential moving average of the student (timm's ModelEmaV3), updated after every optimizer step,
        # evaluated as val_ema/* and saved with the checkpoint so that a resumed run continues it.
        self.ema = ModelEmaV3(student, decay=ema_decay) if ema_decay is not None else None
        if self.ema is not None:  # updated by copying, never by gradients: DDP must not wait for its grads
            self.ema.requires_grad_(False)
        # The resolved run config travels in every checkpoint (plain containers: weights_only-safe);
        # the class names too (on_save_checkpoint).
        self.save_hyperparameters({"config": config or {}})

        top5 = min(5, self.num_classes)
        acc = lambda k: MulticlassAccuracy(num_classes=self.num_classes, top_k=k, average="micro")  # noqa: E731
        self.val_metrics = nn.ModuleDict({"acc1": acc(1), "acc5": acc(top5), "loss": MeanMetric()})
        if is_distilled(student):  # each head on its own; acc1 is their average, the model's prediction
            self.val_metrics.update({"acc1_cls": acc(1), "acc1_dist": acc(1)})
        if teacher is not None:
            # agreement: the student's prediction scored against the teacher's prediction.
            self.val_metrics.update({"teacher_acc1": acc(1), "agreement": acc(1)})
            if len(teacher.members) > 1:  # an ensemble: each network's own top-1 too
                self.val_metrics.update(
                    {f"teacher_acc1_member{i}": acc(1) for i in range(len(teacher.members))}
                )
        if self.ema is not None:
            self.val_ema_metrics = nn.ModuleDict({"acc1": acc(1), "acc5": acc(top5)})
        # Set on the device when a loss is NaN/inf; read (a host sync) only at log steps and before a save.
        self.register_buffer("loss_diverged", torch.tensor(False), persistent=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def setup(self, stage: str) -> None:
        # Per-rank randomness inside the model (drop path), as the official code's seed + rank: without it every
        # rank draws the same stochastic-depth masks, and the repeated copies of an image (neighbouring ranks, same
        # local index) share one. The data views stay a function of (seed, epoch, sample, copy): data/views.py.
        if self.trainer.world_size > 1:
            L.seed_everything(self.seed + self.global_rank, workers=True, verbose=False)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.stop_if_diverged()  # never replace the last good checkpoint by a diverged model
        checkpoint["class_names"] = self.class_names
        # The teacher's weights come from the teacher config, not from the student's checkpoints.
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.teacher is not None:  # strict loading: put the teacher's own weights back
            teacher_state = {f"teacher.{k}": v for k, v in self.teacher.state_dict().items()}
            checkpoint["state_dict"] = {**teacher_state, **checkpoint["state_dict"]}

    def stop_if_diverged(self) -> None:
        if bool(self.loss_diverged):
            raise DeitTrainError(
                f"the training loss became NaN or inf (detected at step {self.global_step}). The last good "
                f"checkpoint is kept. Lower optim.lr, set trainer.gradient_clip_val=1.0, or prefer "
                f"trainer.precision=bf16-mixed to 16-mixed; then resume=true or start again."
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The model's prediction: the average of the class and distillation heads (DeiT section 4)."""
        return average_heads(*forward_heads(self.student, images))

    # teacher.cache (teacher/cache.py): opened once the training data and world size are known.
    def on_train_start(self) -> None:
        if self.teacher is not None:
            self.teacher.open_cache(self.trainer)

    def on_train_epoch_start(self) -> None:
        if self.teacher is not None:
            self.teacher.start_epoch(self.current_epoch, self.trainer.num_training_batches)

    def on_train_epoch_end(self) -> None:
        if self.teacher is not None:
            self.teacher.end_epoch()

    def mix(self, images: torch.Tensor, targets: torch.Tensor, batch_idx: int):
        """Mixup/CutMix, one draw per batch from (seed, epoch, batch index, rank): reproducible views."""
        if self.mixup is None:
            return images, targets
        with seeded(view_seed(self.seed, self.current_epoch, batch_idx, self.global_rank, MIXUP_STREAM)):
            return self.mixup(images, targets)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor | None:
        images, targets, view_keys = batch
        images, targets = self.mix(images, targets, batch_idx)  # the teacher sees the same mixed images
        teacher_logits = self.teacher(images, view_keys, batch_idx) if self.teacher is not None else None
        if self.fill_teacher_cache_only:
            return None
        cls_logits, dist_logits = forward_heads(self.student, images)
        terms = self.criterion.terms(cls_logits, dist_logits, targets, teacher_logits)
        loss = self.criterion.combine(terms)
        self.loss_diverged |= ~torch.isfinite(loss.detach())
        # Logged and checked every log_every_n_steps, without a host-device sync in the other steps.
        self.log("train/loss", loss)
        self.log_dict({f"train/loss_{name}": term.detach() for name, term in terms.items()})
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.stop_if_diverged()
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema is not None and (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0:
            self.ema.update(self.student, step=self.global_step)

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        cls_logits, dist_logits = forward_heads(self.student, images)
        logits = average_heads(cls_logits, dist_logits)
        metrics = self.val_metrics
        metrics["acc1"](logits, labels)
        metrics["acc5"](logits, labels)
        metrics["loss"](nn.functional.cross_entropy(logits, labels, reduction="none"))  # a mean over images
        if dist_logits is not None:
            metrics["acc1_cls"](cls_logits, labels)
            metrics["acc1_dist"](dist_logits, labels)
        if self.teacher is not None:
            member_logits = self.teacher.member_logits(images)
            teacher_logits = self.teacher.combine(member_logits)
            metrics["teacher_acc1"](teacher_logits, labels)
            metrics["agreement"](logits, teacher_logits.argmax(dim=1))
            if len(member_logits) > 1:
                for i, member in enumerate(member_logits):
                    metrics[f"teacher_acc1_member{i}"](member, labels)
        for name, metric in metrics.items():
            self.log(f"val/{name}", metric, prog_bar=name == "acc1")
        if self.ema is not None:
            ema_logits = average_heads(*forward_heads(self.ema.module, images))
            for name, metric in self.val_ema_metrics.items():
                metric(ema_logits, labels)
                self.log(f"val_ema/{name}", metric)

    def configure_optimizers(self):
        return configure_optimizers(self, self.student, self.optim, self.global_batch_size)

    def lr_scheduler_step(self, scheduler, metric) -> None:
        scheduler.step_update(num_updates=self.global_step)


def build_mixup(augment: DictConfig, num_classes: int) -> Mixup | None:
    """timm's Mixup/CutMix with label smoothing (DeiT: mixup 0.8, cutmix 1.0, smoothing 0.1)."""
    if not (augment.mixup > 0 or augment.cutmix > 0):
        return None
    return Mixup(
        mixup_alpha=augment.mixup,
        cutmix_alpha=augment.cutmix,
        prob=augment.mixup_prob,
        switch_prob=augment.mixup_switch_prob,
        mode="batch",
        label_smoothing=augment.smoothing,
        num_classes=num_classes,
    )


def student_summary(student: nn.Module) -> str:
    params = sum(p.numel() for p in student.parameters()) / 1e6
    heads = "class + distillation heads" if is_distilled(student) else "single head"
    return f"{type(student).__name__} ({params:.2f}M params, {heads})"
