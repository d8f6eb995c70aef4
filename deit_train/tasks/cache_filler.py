"""The LightningModule of task=teacher_cache (tasks/teacher_cache.py): the students' views through the teacher."""

import lightning as L
import torch
from torch import nn

from deit_train.data.mixup import BatchMixer
from deit_train.data.views import ViewsOnDevice
from deit_train.teacher import Teacher


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
        images, _ = self.mix(batch.images, batch.targets, self.current_epoch, batch_idx, self.global_rank)
        self.teacher(images, batch.view_keys, batch_idx)

    def setup(self, stage: str) -> None:
        self.teacher.hold_in(self.trainer.precision)  # as the students' runs hold it (tasks/module.py)

    def configure_optimizers(self) -> None:
        return None
