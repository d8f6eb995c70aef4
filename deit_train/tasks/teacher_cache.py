"""task=teacher_cache: fill teacher.cache=DIR for the students of a sweep without training one. The teacher runs on
every training view (Mixup/CutMix included) of every epoch; the cache callback stores its outputs. Nothing is
validated or saved (conf/task/teacher_cache.yaml)."""

from dataclasses import dataclass

import lightning as L
import torch
from omegaconf import DictConfig
from torch import nn

from deit_train.data import DeiTDataModule
from deit_train.data.mixup import BatchMixer
from deit_train.data.views import ViewsOnDevice
from deit_train.errors import DeitTrainError
from deit_train.tasks.classify import Classify, cache_callbacks, check_label_order
from deit_train.tasks.task import Built
from deit_train.teacher import Teacher, build_teacher


class TeacherCacheFiller(ViewsOnDevice, L.LightningModule):
    """The views of the students' runs through the teacher; no optimizer, no step."""

    def __init__(self, teacher: Teacher, mix: BatchMixer) -> None:
        super().__init__()
        self.teacher = teacher
        self.mix = mix
        self.automatic_optimization = False
        # DDP wraps the module and refuses one without a trainable parameter; this one is never used.
        self.placeholder = nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx: int) -> None:
        images, targets, view_keys = batch
        images, _ = self.mix(images, targets, self.current_epoch, batch_idx, self.global_rank)
        self.teacher(images, view_keys, batch_idx)

    def setup(self, stage: str) -> None:
        self.teacher.hold_in(self.trainer.precision)  # as the students' runs hold it (tasks/module.py)

    def configure_optimizers(self) -> None:
        return None


@dataclass
class FillTeacherCache(Classify):
    """A classify run's teacher on its views, without its student."""

    def check(self, cfg: DictConfig) -> None:
        super().check(cfg)
        if cfg.loss.distillation_type == "none" or not cfg.teacher.cache:
            raise DeitTrainError(
                "task=teacher_cache fills teacher.cache=DIR for a distillation run: give the run's "
                "loss=hard_distill or soft_distill, its teacher and teacher.cache=DIR"
            )

    def build(self, cfg: DictConfig) -> Built:
        # The students' data, teacher, mixing and cache: exactly what their runs will look up.
        datamodule = DeiTDataModule(cfg.data, cfg.augment, img_size=cfg.model.img_size, seed=cfg.seed)
        teacher = build_teacher(cfg, datamodule.class_names)
        check_label_order(cfg, datamodule, teacher)  # as the students' runs will: a misordered teacher is refused now
        mix = BatchMixer(cfg.augment, datamodule.num_classes, cfg.seed)
        callbacks = cache_callbacks(cfg, teacher, datamodule.num_classes, datamodule.source)
        return Built(datamodule, TeacherCacheFiller(teacher, mix), callbacks)
