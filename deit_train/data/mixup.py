"""Mixup and CutMix, a batch-level augmentation: mixes a batch of finished views (on the device, after
data/pixels.py) and softens its labels, before the loss (tasks/classify.py) and the teacher (tasks/teacher_cache.py)."""

import torch
from omegaconf import DictConfig
from timm.data import Mixup

from deit_train.data.views import MIXUP_STREAM, seeded, view_seed


class BatchMixer:
    """timm's Mixup/CutMix with label smoothing (DeiT: mixup 0.8, cutmix 1.0, smoothing 0.1), one draw per batch
    from (seed, epoch, batch index, rank): the mixed batch is as reproducible as its views. Without Mixup and
    CutMix the batch passes unchanged."""

    def __init__(self, augment: DictConfig, num_classes: int, seed: int) -> None:
        self.seed = seed
        self.mixup = None
        if augment.mixup > 0 or augment.cutmix > 0:
            self.mixup = Mixup(
                mixup_alpha=augment.mixup,
                cutmix_alpha=augment.cutmix,
                prob=augment.mixup_prob,
                switch_prob=augment.mixup_switch_prob,
                mode="batch",
                label_smoothing=augment.smoothing,
                num_classes=num_classes,
            )

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, epoch: int, batch_idx: int, rank: int):
        if self.mixup is None:
            return images, targets
        with seeded(view_seed(self.seed, epoch, batch_idx, rank, MIXUP_STREAM)):
            return self.mixup(images, targets)
