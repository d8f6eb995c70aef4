"""The LightningModule of task=classify (tasks/classify.py): a student learning the data's labels with the DeiT loss
(losses.py), from an optional frozen teacher (teacher/). Its training step reads like the paper: mix, teacher, both
heads, loss."""

import logging

import torch
from omegaconf import DictConfig
from timm.task.distillation import FeatureDistillationTrainableModule
from timm.utils import ModelEmaV3
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from deit_train.data.mixup import BatchMixer
from deit_train.features import FeatureTap
from deit_train.losses import DistillationLoss
from deit_train.models.student import average_heads, forward_heads, heads_on, is_distilled
from deit_train.tasks.module import TrainingModule
from deit_train.teacher import Teacher

log = logging.getLogger("deit_train")


class StudentEMA(ModelEmaV3):
    """timm's ModelEmaV3 that trainer=ddp_spawn can send to its ranks: its private generator (for the stochastic
    rounding of a bf16 EMA) does not survive torch's shared-memory pickling ("unable to resize file"), so it is left
    out and made again, from its seed, on the other side."""

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_sr_generator", None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._sr_generator = torch.Generator(device=next(self.module.parameters()).device)
        self._sr_generator.manual_seed(self.stochastic_rounding_seed)


class DeiTModule(TrainingModule):
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
        config: dict | None = None,
        feature_tap: FeatureTap | None = None,
    ) -> None:
        super().__init__(optim, global_batch_size, seed, config)
        self.student = student
        self.feature_tap = feature_tap  # where the feature term reads the student (loss.feature_weight > 0)
        self.teacher = teacher
        self.criterion = criterion
        self.class_names = list(class_names)
        self.mix = BatchMixer(augment, self.num_classes, seed)
        # An exponential moving average of the student (timm's ModelEmaV3), updated after every optimizer step,
        # evaluated as val_ema/* and saved with the checkpoint so that a resumed run continues it.
        self.ema = StudentEMA(student, decay=ema_decay) if ema_decay is not None else None
        if self.ema is not None:  # updated by copying, never by gradients: DDP must not wait for its grads
            self.ema.requires_grad_(False)

        top5 = min(5, self.num_classes)
        acc = lambda k: MulticlassAccuracy(num_classes=self.num_classes, top_k=k, average="micro")  # noqa: E731
        self.val_metrics = nn.ModuleDict({"acc1": acc(1), "acc5": acc(top5), "loss": MeanMetric()})
        if is_distilled(student):  # each head on its own; acc1 is their average, the model's prediction
            self.val_metrics.update({"acc1_cls": acc(1), "acc1_dist": acc(1)})
        # The teacher's predicted classes on each validation batch, computed once (teacher_predictions).
        self.teacher_val_predictions: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.teacher_val_order_changed: torch.Tensor | bool = False
        if teacher is not None:
            # agreement: the student's prediction scored against the teacher's prediction.
            self.val_metrics.update({"teacher_acc1": acc(1), "agreement": acc(1)})
            if len(teacher.members) > 1:  # an ensemble: each network's own top-1 too
                self.val_metrics.update({f"teacher_acc1_member{i}": acc(1) for i in range(len(teacher.members))})
        if self.ema is not None:
            self.val_ema_metrics = nn.ModuleDict({"acc1": acc(1), "acc5": acc(top5)})

    @property
    def network(self) -> nn.Module:
        """The student, and the feature term's projection P where it has one: both train (timm's pair, which gives
        the optimizer the student's no-weight-decay names under its prefix)."""
        feature = self.criterion.feature
        if feature is None or feature.projection is None:
            return self.student
        return FeatureDistillationTrainableModule(self.student, feature.projection)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["class_names"] = self.class_names
        # The teacher's weights come from the teacher config, not from the student's checkpoints.
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.teacher is not None:  # strict loading: put the teacher's own weights back
            teacher_state = {f"teacher.{k}": v for k, v in self.teacher.state_dict().items()}
            checkpoint["state_dict"] = {**teacher_state, **checkpoint["state_dict"]}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The model's prediction: the average of the class and distillation heads (DeiT section 4). In eval mode
        through the student's own call (timm's forward averages the heads there), whose module hooks the model
        summary reads for its per-layer sizes and FLOPs."""
        if not self.training:
            return self.student(images)
        return average_heads(*forward_heads(self.student, images))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        # Mixup/CutMix (batch: data/views.py TrainingViews); the teacher sees the same mixed images
        images, targets = self.mix(batch.images, batch.targets, self.current_epoch, batch_idx, self.global_rank)
        distilling = self.teacher is not None and self.criterion.needs_teacher  # teacher.keep_for_metrics: validation
        teacher = self.teacher(images, batch.view_keys, batch_idx) if distilling else None
        if self.feature_tap is None:
            cls_logits, dist_logits = forward_heads(self.student, images)
            student_features = None
        else:  # one pass gives the heads their input and the feature term its features
            tokens, student_features = self.feature_tap(self.student, images)
            cls_logits, dist_logits = heads_on(self.student, tokens)
        terms = self.criterion.terms(
            cls_logits,
            dist_logits,
            targets,
            teacher.logits if teacher is not None else None,
            student_features,
            teacher.features if teacher is not None else None,
        )
        loss = self.criterion.combine(terms)
        self.track(loss)
        # Logged and checked every log_every_n_steps, without a host-device sync in the other steps.
        self.log("train/loss", loss)
        self.log_dict({f"train/loss_{name}": term.detach() for name, term in terms.items()})
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema is not None and (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0:
            self.ema.update(self.student, step=self.global_step)

    def teacher_predictions(
        self, images: torch.Tensor, labels: torch.Tensor, batch_idx: int, dataloader_idx: int
    ) -> torch.Tensor:
        """The frozen teacher's predicted classes (the ensemble's, then each member's when there are several) for
        this validation batch: computed in the first validation that meets the batch and kept, as the teacher's
        outputs on the fixed validation images never change; every later epoch reads them instead of running the
        teacher again. The batch's labels are kept beside them and compared at the epoch's end (one host sync), in
        case a data source served the validation images in another order: then the kept predictions are dropped."""
        key = (dataloader_idx, batch_idx)
        kept = self.teacher_val_predictions.get(key)
        if kept is None or kept[1].shape != labels.shape:
            teacher = self.teacher(images)
            predicted = [teacher.logits] + (teacher.member_logits if len(teacher.member_logits) > 1 else [])
            kept = self.teacher_val_predictions[key] = (torch.stack([p.argmax(dim=1) for p in predicted]), labels)
        predictions, kept_labels = kept
        self.teacher_val_order_changed = self.teacher_val_order_changed | (kept_labels != labels).any()
        return predictions

    def on_validation_epoch_end(self) -> None:
        if self.teacher is not None and bool(self.teacher_val_order_changed):
            log.warning("the validation images came in another order: the teacher's kept predictions are dropped")
            self.teacher_val_predictions.clear()
        self.teacher_val_order_changed = torch.tensor(False, device=self.device)

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Returns the prediction's logits, which the per-class results count (class_results.py)."""
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
            teacher, *members = self.teacher_predictions(images, labels, batch_idx, dataloader_idx)
            metrics["teacher_acc1"](teacher, labels)
            metrics["agreement"](logits, teacher)
            for i, member in enumerate(members):
                metrics[f"teacher_acc1_member{i}"](member, labels)
        for name, metric in metrics.items():
            self.log(f"val/{name}", metric, prog_bar=name == "acc1")
        if self.ema is not None:
            ema_logits = average_heads(*forward_heads(self.ema.module, images))
            for name, metric in self.val_ema_metrics.items():
                metric(ema_logits, labels)
                self.log(f"val_ema/{name}", metric)
        return logits
