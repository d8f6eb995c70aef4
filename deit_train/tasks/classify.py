"""task=classify: supervised training of a student with the DeiT loss (losses.py), from an optional frozen teacher
(teacher/). DeiTModule is its LightningModule; its training step reads like the paper: mix, teacher, both heads,
loss."""

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from timm.task.distillation import FeatureDistillationTrainableModule
from timm.utils import ModelEmaV3
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from deit_train.data import DeiTDataModule
from deit_train.data.mixup import BatchMixer
from deit_train.data.pixels import model_input
from deit_train.errors import DeitTrainError
from deit_train.features import FeatureTap, attach_feature_loss
from deit_train.labels import SAMPLE_IMAGES, order_on_data
from deit_train.losses import DistillationLoss
from deit_train.models import (
    average_heads,
    build_student,
    compile_student,
    describe,
    forward_heads,
    heads_on,
    is_distilled,
)
from deit_train.models.init import check_init_classes
from deit_train.run_dir import check_writable
from deit_train.tasks.module import TrainingModule, run_config
from deit_train.tasks.task import Built, Task
from deit_train.teacher import (
    CacheSettings,
    Teacher,
    TeacherCacheCallback,
    build_teacher,
    ensemble_logits,
    ensemble_tau,
    teacher_members,
)

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
        """The model's prediction: the average of the class and distillation heads (DeiT section 4)."""
        return average_heads(*forward_heads(self.student, images))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets, view_keys = batch
        # Mixup/CutMix; the teacher sees the same mixed images
        images, targets = self.mix(images, targets, self.current_epoch, batch_idx, self.global_rank)
        teacher = self.teacher(images, view_keys, batch_idx) if self.teacher is not None else None
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
            teacher = self.teacher(images)
            metrics["teacher_acc1"](teacher.logits, labels)
            metrics["agreement"](logits, teacher.logits.argmax(dim=1))
            if len(teacher.member_logits) > 1:
                for i, member in enumerate(teacher.member_logits):
                    metrics[f"teacher_acc1_member{i}"](member, labels)
        for name, metric in metrics.items():
            self.log(f"val/{name}", metric, prog_bar=name == "acc1")
        if self.ema is not None:
            ema_logits = average_heads(*forward_heads(self.ema.module, images))
            for name, metric in self.val_ema_metrics.items():
                metric(ema_logits, labels)
                self.log(f"val_ema/{name}", metric)


@dataclass
class Classify(Task):
    """The default task: the student learns the data's labels, with hard or soft distillation when the loss group
    asks for a teacher."""

    def check(self, cfg: DictConfig) -> None:
        super().check(cfg)
        distillation = cfg.loss.distillation_type
        if (distillation != "none" or cfg.loss.feature_weight > 0) and cfg.teacher.name is None:
            what = f"loss={distillation}_distill" if distillation != "none" else "loss.feature_weight>0"
            raise DeitTrainError(
                f"{what} needs a teacher: add e.g. teacher=regnety_160 (ImageNet) or "
                f"teacher=timm teacher.name=resnet50 teacher.checkpoint=PATH; or train without one: loss=ce."
            )
        if cfg.teacher.cache and cfg.loss.feature_weight > 0:
            raise DeitTrainError(
                f"teacher.cache={cfg.teacher.cache} stores the teacher's logits, not the features that "
                f"loss.feature_weight={cfg.loss.feature_weight} matches: drop one (teacher.cache=null, or "
                f"loss.feature_weight=0)"
            )
        if cfg.teacher.cache and distillation != "none":  # before the run writes anything
            check_writable(Path(cfg.teacher.cache).expanduser().absolute(), "teacher.cache")

    def build(self, cfg: DictConfig) -> Built:
        datamodule = DeiTDataModule(cfg.data, cfg.augment, img_size=cfg.model.img_size, seed=cfg.seed)
        module = self.build_module(cfg, datamodule.class_names)
        check_label_order(cfg, datamodule, module.teacher, module.student)
        return Built(datamodule, module, cache_callbacks(cfg, module.teacher, module.num_classes))

    @staticmethod
    def build_module(cfg: DictConfig, class_names: list[str]) -> DeiTModule:
        """Student, teacher and loss on these classes."""
        criterion = DistillationLoss(**cfg.loss, label_smoothing=cfg.augment.smoothing)
        if cfg.teacher.name is not None and not criterion.needs_teacher:
            log.warning("loss=ce ignores teacher=%s: no teacher is loaded or run.", cfg.teacher.name)
        if cfg.teacher.cache and not criterion.needs_teacher:
            log.warning("teacher.cache=%s is unused: loss=ce runs no teacher", cfg.teacher.cache)
        teacher = build_teacher(cfg, class_names) if criterion.needs_teacher else None
        student = build_student(cfg.model, len(class_names))
        # A rule on the built student (which of timm's classes a model name gives): it cannot be in the schema.
        if criterion.distillation_type != "none" and criterion.alpha == 1.0 and is_distilled(student):
            raise DeitTrainError(
                f"loss.alpha=1.0 gives the class head of the distilled student {cfg.model.name} no training signal, "
                f"yet its predictions are averaged with the distillation head's. Take a single-head student for pure "
                f"distillation (function matching), e.g. model=deit_small_plain, or set loss.alpha below 1."
            )
        feature_tap = None
        if criterion.feature_weight > 0:
            names = [member.name for member in teacher_members(cfg.teacher)]
            feature_tap = attach_feature_loss(criterion, names, student, teacher)
        if cfg.compile:
            compile_student(student)
        log.info(
            "student %s on %d classes; teacher %s",
            describe(student),
            len(class_names),
            cfg.teacher.name if teacher is not None else "none",
        )
        return DeiTModule(
            student=student,
            teacher=teacher,
            criterion=criterion,
            class_names=class_names,
            optim=cfg.optim,
            augment=cfg.augment,
            global_batch_size=cfg.data.batch_size,
            ema_decay=cfg.ema.decay,
            seed=cfg.seed,
            config=run_config(cfg),
            feature_tap=feature_tap,
        )


def check_label_order(
    cfg: DictConfig, datamodule: DeiTDataModule, teacher: Teacher | None, student: nn.Module | None = None
) -> None:
    """model.init's heads are the data's classes by name (refused otherwise); each teacher network's top-1 on a
    sample of the validation data is logged; a teacher or model.init's heads whose weights name no classes are refused
    when that sample does not show them in the data's order (labels.py: OrderCheck)."""
    class_names = datamodule.class_names
    kept = check_init_classes(student, class_names) if student is not None else None
    checks = []  # (what, network, its prediction, where its weights come from when they name no classes, option)
    if teacher is not None:
        members = cfg.teacher.members or [cfg.teacher]
        for member, network in zip(members, teacher.members, strict=True):
            unnamed = getattr(network.network, "unnamed", None)
            checks.append((f"teacher {member.name}", network, network, unnamed, "teacher.unchecked_order"))
        if len(members) > 1:
            combined = lambda images: ensemble_logits([m(images) for m in teacher.members], teacher.tau)  # noqa: E731
            checks.append(("teacher ensemble", teacher, combined, None, None))
    if kept is not None:
        checks.append(
            (
                "model.init",
                student,
                lambda images: average_heads(*forward_heads(student, images)),
                f"model.init={kept.source} (weights without class names)",
                "model.init_unchecked_order",
            )
        )
    if not checks:
        return
    batches = datamodule.validation_sample(SAMPLE_IMAGES)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"
    for what, network, predict, unnamed, option in checks:
        was_training = network.training
        network.eval().to(device)
        try:
            check = order_on_data(
                lambda images, predict=predict: predict(model_input(images.to(device))), batches, class_names
            )
        finally:
            network.train(was_training).to("cpu")
        log.info("%s: %s", what, check.describe())
        if unnamed is None or check.passed:
            continue
        verdict = (
            f"{unnamed} cannot be checked by name, and on the data it scores {check.describe()}: its "
            f"outputs are likely in another class order than the data's (class folders sort as strings: 0, 1, "
            f"10, 2, ...) or it was not trained on this data"
        )
        if OmegaConf.select(cfg, option):
            log.warning("%s; %s=true: training with it anyway", verdict, option)
            continue
        raise DeitTrainError(
            f"{verdict}. Save it with the data's class names in the data's order (a deit-train "
            f"checkpoint or export names them), or set {option}=true to train with it anyway"
        )


def cache_callbacks(cfg: DictConfig, teacher: Teacher | None, num_classes: int) -> list[TeacherCacheCallback]:
    """teacher.cache's callback, when the run has a teacher and a cache."""
    if teacher is None or not cfg.teacher.cache:
        return []
    tau = ensemble_tau(cfg) if len(teacher.members) > 1 else None
    return [TeacherCacheCallback(CacheSettings.from_config(cfg, num_classes, tau), teacher)]
