"""task=teacher_cache: fill teacher.cache=DIR for the students of a sweep without training one. The teacher runs on
every training view (Mixup/CutMix included) of every epoch; the cache callback stores its outputs. Nothing is
validated or saved (conf/task/teacher_cache.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from omegaconf import DictConfig

from deit_train.errors import DeitTrainError
from deit_train.tasks.classify import Classify, cache_callbacks, check_label_order
from deit_train.tasks.task import Built

if TYPE_CHECKING:
    from deit_train.data.datamodule import DeiTDataModule


@dataclass
class FillTeacherCache(Classify):
    """A classify run's teacher on its views, without its student."""

    fills_cache: ClassVar[bool] = True

    def check(self, cfg: DictConfig) -> None:
        super().check(cfg)
        if cfg.loss.distillation_type == "none" or not cfg.teacher.cache:
            raise DeitTrainError(
                "task=teacher_cache fills teacher.cache=DIR for a distillation run: give the run's "
                "loss=hard_distill or soft_distill, its teacher and teacher.cache=DIR"
            )

    def build(self, cfg: DictConfig, datamodule: DeiTDataModule) -> Built:
        from deit_train.data.mixup import BatchMixer
        from deit_train.tasks.cache_filler import TeacherCacheFiller
        from deit_train.teacher import build_teacher

        # The students' data, teacher, mixing and cache: exactly what their runs will look up.
        teacher = build_teacher(cfg, datamodule.class_names)
        check_label_order(cfg, datamodule, teacher)  # as the students' runs will: a misordered teacher is refused now
        mix = BatchMixer(cfg.augment, datamodule.num_classes, cfg.seed)
        callbacks = cache_callbacks(cfg, teacher, datamodule.num_classes, datamodule.source)
        return Built(datamodule, TeacherCacheFiller(teacher, mix), callbacks)
