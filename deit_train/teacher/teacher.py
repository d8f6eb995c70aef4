"""The frozen teacher as the training step sees it: `teacher(images)` returns its logits for a batch."""

import logging

import torch
from omegaconf import DictConfig
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from deit_train.teacher.cache import CacheSettings, TeacherCache
from deit_train.teacher.network import build_teacher_network

log = logging.getLogger(__name__)


class Teacher(nn.Module):
    """A frozen classifier, always in eval mode and never saved with the student (DeiTModule.on_save_checkpoint).

    Training batches come with their view keys: with teacher.cache their logits are read from the cache (or
    computed and stored, teacher/cache.py); validation batches, without keys, always run the network.
    """

    def __init__(
        self,
        network: nn.Module,
        cache: CacheSettings | None = None,
        data_mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
        data_std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
    ) -> None:
        super().__init__()
        self.network = network
        self.cache_settings = cache
        self.cache: TeacherCache | None = None
        # The teacher's own normalisation (timm's pretrained_cfg), when it differs from the data's: a teacher
        # trained on inputs scaled to [-1, 1] would otherwise see the wrong colours. x_teacher = a * x + b.
        config = getattr(network, "pretrained_cfg", None) or {}
        mean, std = tuple(config.get("mean", data_mean)), tuple(config.get("std", data_std))
        self.renormalize = (mean, std) != (tuple(data_mean), tuple(data_std))
        if self.renormalize:
            log.info("teacher input re-normalised from the data's mean/std %s/%s to its own %s/%s",
                     data_mean, data_std, mean, std)  # fmt: skip
        to_column = lambda values: torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)  # noqa: E731
        scale = to_column(data_std) / to_column(std)
        self.register_buffer("input_scale", scale, persistent=False)
        self.register_buffer(
            "input_shift", (to_column(data_mean) - to_column(mean)) / to_column(std), persistent=False
        )
        self.train(False)

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # frozen: BatchNorm statistics and dropout stay as loaded

    def forward(
        self, images: torch.Tensor, view_keys: torch.Tensor | None = None, batch_idx: int = 0
    ) -> torch.Tensor:
        """The teacher's logits for `images`; pass a training batch's view keys and index to use the cache."""
        if self.cache is not None and view_keys is not None:
            return self.cache.teacher_logits(batch_idx, view_keys, lambda: self.run_network(images))
        return self.run_network(images)

    def run_network(self, images: torch.Tensor) -> torch.Tensor:
        """One forward pass without autograd, in channels_last (the faster layout for convnets)."""
        with torch.inference_mode():
            if self.renormalize:
                images = images * self.input_scale + self.input_shift
            logits = self.network(images.contiguous(memory_format=torch.channels_last))
        return logits.clone()  # a normal tensor, which the loss may save for its backward pass

    # teacher.cache: opened once the training data and world size are known, one file per epoch and rank.
    def open_cache(self, trainer) -> None:
        if self.cache_settings is not None:
            self.cache = self.cache_settings.open(trainer, self.network)

    def start_epoch(self, epoch: int, num_batches: int) -> None:
        if self.cache is not None:
            self.cache.start_epoch(epoch, num_batches)

    def end_epoch(self) -> None:
        if self.cache is not None:
            self.cache.end_epoch()


def build_teacher(cfg: DictConfig, class_names: list[str]) -> Teacher:
    """The run's teacher (cfg.teacher) on the data's classes, with its cache when teacher.cache is set."""
    network = build_teacher_network(cfg.teacher, class_names)
    cache = CacheSettings.from_config(cfg, len(class_names)) if cfg.teacher.cache else None
    return Teacher(network, cache)
