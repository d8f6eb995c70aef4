"""task=classify: supervised training of a student with the DeiT loss (losses.py), from an optional frozen teacher
(teacher/). Its LightningModule, whose training step reads like the paper (mix, teacher, both heads, loss), is
DeiTModule (tasks/deit_module.py). This module names the task and its rules; what it builds is imported where it is
built, so that a config composes without Lightning or timm."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from omegaconf import DictConfig, OmegaConf

from deit_train.errors import DeitTrainError, StorageError
from deit_train.run_dir import check_writable
from deit_train.tasks.task import Built, Task

if TYPE_CHECKING:
    import torch
    from torch import nn

    from deit_train.data.datamodule import DeiTDataModule
    from deit_train.data.sources import DataSource
    from deit_train.models.checkpoints import RunCheckpoint
    from deit_train.models.trained_model import TrainedModel
    from deit_train.tasks.deit_module import DeiTModule
    from deit_train.teacher import Teacher, TeacherCacheCallback

log = logging.getLogger("deit_train")


@dataclass
class Classify(Task):
    """The default task: the student learns the data's labels, with hard or soft distillation when the loss group
    asks for a teacher."""

    fills_cache: ClassVar[bool] = False  # task=teacher_cache: writing teacher.cache is what it is for

    def check(self, cfg: DictConfig) -> None:
        super().check(cfg)
        distillation = cfg.loss.distillation_type
        uses_teacher = distillation != "none" or cfg.loss.feature_weight > 0
        if not uses_teacher and cfg.teacher.name is not None and not cfg.teacher.keep_for_metrics:
            raise DeitTrainError(
                f"teacher={cfg.teacher.name} with loss={cfg.loss.get('label_loss', 'ce')}, which uses no teacher: "
                f"distil with loss=hard_distill or loss=soft_distill, or keep the teacher for val/teacher_acc1 and "
                f"val/agreement only with teacher.keep_for_metrics=true"
            )
        if uses_teacher and cfg.teacher.name is None:
            what = f"loss={distillation}_distill" if distillation != "none" else "loss.feature_weight>0"
            if cfg.teacher.checkpoint:  # weights, but teacher=none chose no network for them
                raise DeitTrainError(
                    f"{what} with teacher.checkpoint={cfg.teacher.checkpoint} but no teacher network (teacher=none): "
                    f"drop teacher=none (a deit-train run's checkpoint brings its own), or name the architecture of "
                    f"other weights with teacher=timm teacher.name=<timm name>"
                )
            raise DeitTrainError(
                f"{what} needs a teacher: add e.g. teacher=regnety_160 (ImageNet), teacher.checkpoint=<a deit-train "
                f"run>/checkpoints/best.ckpt, or teacher=timm teacher.name=<timm name> teacher.checkpoint=PATH; or "
                f"train without one: loss=ce."
            )
        if cfg.teacher.cache and cfg.loss.feature_weight > 0:
            raise DeitTrainError(
                f"teacher.cache={cfg.teacher.cache} stores the teacher's logits, not the features that "
                f"loss.feature_weight={cfg.loss.feature_weight} matches: drop one (teacher.cache=null, or "
                f"loss.feature_weight=0)"
            )
        if cfg.teacher.cache and distillation != "none":  # before the run writes anything
            cache = Path(cfg.teacher.cache).expanduser().absolute()
            try:
                check_writable(cache, "teacher.cache")
            except StorageError:
                if self.fills_cache:  # its one product: refused
                    raise
                # a cache filled once and shared read-only (a data set's folder): what it holds for this run is
                # read, the rest computed and not stored (teacher/cache.py)
                log.warning(
                    "teacher.cache=%s cannot be written: its epochs for this run are read, others computed", cache
                )

    def build(self, cfg: DictConfig, datamodule: DeiTDataModule) -> Built:
        import torch

        from deit_train.flops import count_cpu_attention

        module = self.build_module(cfg, datamodule.class_names)
        # one image at the student's size: Lightning's model summary counts a prediction's FLOPs on it (flops.py);
        # not for a compiled student, which would compile again for it (the summary's FLOPs then read 0)
        if not cfg.compile:
            module.example_input_array = torch.zeros(1, 3, cfg.model.img_size, cfg.model.img_size)
            count_cpu_attention()
        check_label_order(cfg, datamodule, module.teacher, module.student)
        return Built(datamodule, module, cache_callbacks(cfg, module.teacher, module.num_classes, datamodule.source))

    @classmethod
    def inference_model(cls, run: RunCheckpoint, path: Path, ema: bool, classifier: bool) -> TrainedModel:
        """The student on the run's classes (its EMA's weights with `ema`); a distilled DeiT's forward averages its
        two heads, as validation did."""
        from deit_train.models.checkpoints import load_into
        from deit_train.models.student import build_student
        from deit_train.models.trained_model import TrainedModel, check_class_names

        class_names = list(run.class_names) if isinstance(run.class_names, list | tuple) else run.class_names
        state = run.part("ema.module." if ema else "student.")
        if not state:
            what = "EMA weights (the run did not set ema.decay)" if ema else "student weights"
            raise DeitTrainError(f"{path} holds no {what}")
        head = state.get("head.weight", state.get("fc.weight"))
        check_class_names(class_names, len(head) if head is not None else None, path)
        student = build_student(run.model_config(), len(class_names))
        load_into(student, state, str(path), "student")
        if hasattr(student, "set_distilled_training"):
            student.set_distilled_training(False)  # forward = the average of both heads
        return TrainedModel.of_run(student, class_names, run)

    @staticmethod
    def build_module(cfg: DictConfig, class_names: list[str]) -> DeiTModule:
        """Student, teacher and loss on these classes."""
        from deit_train.features import attach_feature_loss
        from deit_train.losses import DistillationLoss
        from deit_train.models.student import build_student, compile_student, describe, is_distilled
        from deit_train.tasks.deit_module import DeiTModule
        from deit_train.tasks.module import run_config
        from deit_train.teacher import build_teacher, teacher_members

        criterion = DistillationLoss(**cfg.loss, label_smoothing=cfg.augment.smoothing)
        if cfg.teacher.cache and not criterion.needs_teacher:
            log.warning("teacher.cache=%s is unused: loss=ce runs no teacher in training", cfg.teacher.cache)
        wanted = criterion.needs_teacher or (cfg.teacher.name is not None and cfg.teacher.keep_for_metrics)
        teacher = build_teacher(cfg, class_names) if wanted else None
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


@dataclass
class OrderSubject:
    """A network checked on the data: its name in the log, the module to move to the device, its prediction, where
    its weights come from when they name no classes (None: named, or combined: logged only), the option that keeps
    it anyway, and what a refusal does when not an error (model.init: its heads start fresh)."""

    what: str
    network: nn.Module
    predict: Callable[[torch.Tensor], torch.Tensor]
    unnamed: str | None = None
    option: str | None = None
    instead: Callable[[str], None] | None = None


def check_label_order(
    cfg: DictConfig, datamodule: DeiTDataModule, teacher: Teacher | None, student: nn.Module | None = None
) -> None:
    """model.init's heads settled on the data's classes by name (models/init.py); each teacher network's top-1 on a
    stratified sample of the validation data logged; a teacher whose weights name no classes refused, and
    model.init's nameless heads started fresh, when that sample shows its outputs in another class order
    (labels.py: OrderCheck)."""
    from deit_train.cluster import process_device
    from deit_train.data.pixels import model_input
    from deit_train.labels import order_on_data, sample_size
    from deit_train.models.init import settle_heads
    from deit_train.models.student import average_heads, forward_heads
    from deit_train.teacher import ensemble_logits

    class_names = datamodule.class_names
    kept = settle_heads(student, class_names, cfg.model.init_class_map) if student is not None else None
    subjects = []
    if teacher is not None:
        members = cfg.teacher.members or [cfg.teacher]
        for member, network in zip(members, teacher.members, strict=True):
            unnamed = getattr(network.network, "unnamed", None)
            option = "teacher.unchecked_order"
            subjects.append(OrderSubject(f"teacher {member.name}", network, network, unnamed, option))
        if len(members) > 1:
            combined = lambda images: ensemble_logits([m(images) for m in teacher.members], teacher.tau)  # noqa: E731
            subjects.append(OrderSubject("teacher ensemble", teacher, combined))
    if kept is not None:
        subjects.append(
            OrderSubject(
                "model.init",
                student,
                lambda images: average_heads(*forward_heads(student, images)),
                f"model.init={kept.source} (weights without class names)",
                "model.init_unchecked_order",
                instead=lambda why: kept.start_fresh(student, why),
            )
        )
    if not subjects:
        return
    batches = datamodule.validation_sample(sample_size(len(class_names)))
    device = process_device(cfg.trainer.accelerator, cfg.trainer.devices)  # this task's GPU, as the trainer's
    for subject in subjects:
        was_training = subject.network.training
        subject.network.eval().to(device)
        try:
            check = order_on_data(
                lambda images, predict=subject.predict: predict(model_input(images.to(device))), batches, class_names
            )
        finally:
            subject.network.train(was_training).to("cpu")
        log.info("%s: %s", subject.what, check.describe())
        if not check.refused:
            if not check.above_chance and check.images:
                log.warning("%s: top-1 not clearly above chance on the data: was it trained on it?", subject.what)
            continue
        if subject.unnamed is None:
            continue
        verdict = (
            f"{subject.unnamed} cannot be checked by name, and on the data its outputs fit another class order "
            f"than the data's: {check.describe()}"
        )
        if OmegaConf.select(cfg, subject.option):
            log.warning("%s; %s=true: training with it anyway", verdict, subject.option)
        elif subject.instead is not None:
            subject.instead(f"{verdict}; {subject.option}=true keeps them")
        else:
            raise DeitTrainError(
                f"{verdict}. It was likely trained with its classes in another order (class folders sort as "
                f"strings: 0, 1, 10, 2, ...) or on other data: save it with the data's class names in the data's "
                f"order (a deit-train checkpoint or export names them), or set {subject.option}=true to train with "
                f"it anyway"
            )


def cache_callbacks(
    cfg: DictConfig, teacher: Teacher | None, num_classes: int, source: DataSource
) -> list[TeacherCacheCallback]:
    """teacher.cache's callback, when the run has a teacher and a cache."""
    from deit_train.teacher import CacheSettings, TeacherCacheCallback, ensemble_tau

    if teacher is None or not cfg.teacher.cache or cfg.loss.distillation_type == "none":
        return []
    tau = ensemble_tau(cfg) if len(teacher.members) > 1 else None
    return [TeacherCacheCallback(CacheSettings.from_config(cfg, num_classes, tau, source), teacher)]
