"""The frozen teacher as the training step sees it: `teacher(images)` returns its logits for a batch."""

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from deit_train.data.pixels import IMAGENET_MEAN, IMAGENET_STD
from deit_train.features import FeatureTap
from deit_train.teacher.cache import TeacherCache
from deit_train.teacher.network import build_teacher_network, member_img_sizes, teacher_members

log = logging.getLogger(__name__)


class TeacherNetwork(nn.Module):
    """One frozen classifier with its own input: the views resized to its img_size (bicubic, antialiased; None: a
    transformers teacher's image processor size, a timm teacher's views as they come), and its own normalisation:
    timm's pretrained_cfg mean/std (a transformers teacher's: its image processor's), when they differ from the
    data's. A teacher trained on inputs scaled to [-1, 1] would otherwise see the wrong colours."""

    def __init__(
        self,
        network: nn.Module,
        img_size: int | None = None,
        data_mean: tuple[float, ...] = IMAGENET_MEAN,
        data_std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.network = network
        self.img_size = img_size if img_size is not None else getattr(network, "processor_size", None)
        config = getattr(network, "pretrained_cfg", None) or {}
        mean, std = tuple(config.get("mean", data_mean)), tuple(config.get("std", data_std))
        self.renormalize = (mean, std) != (tuple(data_mean), tuple(data_std))
        if self.renormalize:
            log.info(
                "teacher input re-normalised from the data's mean/std %s/%s to its own %s/%s",
                data_mean,
                data_std,
                mean,
                std,
            )
        to_column = lambda values: torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)  # noqa: E731
        # x_teacher = a * x + b
        self.register_buffer("input_scale", to_column(data_std) / to_column(std), persistent=False)
        self.register_buffer("input_shift", (to_column(data_mean) - to_column(mean)) / to_column(std), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(self.own_input(images))

    def logits_and_features(self, images: torch.Tensor, tap: FeatureTap) -> tuple[torch.Tensor, torch.Tensor]:
        """Its logits and the features `tap` reads, in one pass."""
        final, features = tap(self.network, self.own_input(images))
        return self.network.forward_head(final), features

    def own_input(self, images: torch.Tensor) -> torch.Tensor:
        size = self.img_size
        if size is not None and images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        if self.renormalize:
            images = images * self.input_scale + self.input_shift
        # channels_last: the faster layout for convnets
        return images.contiguous(memory_format=torch.channels_last)


def ensemble_logits(member_logits: list[torch.Tensor], tau: float = 1.0) -> torch.Tensor:
    """An ensemble's output as logits at temperature tau: tau log p with p = mean_i softmax(Z_i / tau), the average
    of the members' probabilities. Then softmax(output / tau) = p (what soft distillation reads) and argmax output =
    argmax p (what hard distillation reads, at tau = 1). log p is a logsumexp of log-probabilities: finite where
    p underflows."""
    log_probs = torch.stack([F.log_softmax(logits.float() / tau, dim=1) for logits in member_logits])
    return tau * (torch.logsumexp(log_probs, dim=0) - math.log(len(member_logits)))


@dataclass
class TeacherOutput:
    """What the teacher gives a batch: `logits`, which the loss reads (an ensemble's combined), and each network's
    own `member_logits` (empty when the logits were read from the cache), and the features the feature term reads."""

    logits: torch.Tensor
    member_logits: list[torch.Tensor]
    features: torch.Tensor | None = None  # what `features` asked of its member (Teacher.read_features)


class Teacher(nn.Module):
    """A frozen classifier or an ensemble of them, always in eval mode and never saved with the student
    (tasks/classify.py, DeiTModule.on_save_checkpoint).

    `teacher(images)` runs the networks; `teacher(images, view_keys, batch_idx)` on a training batch reads its
    logits from `self.cache` when one is open (teacher/cache.py, opened by TeacherCacheCallback). An ensemble's
    logits are ensemble_logits of its members' at `tau` (soft distillation's; 1 for hard). `img_sizes`: the
    resolution each network sees the views at (None: the student's views as they are).
    """

    def __init__(
        self,
        networks: nn.Module | list[nn.Module],
        tau: float = 1.0,
        img_sizes: list[int | None] | None = None,
        data_mean: tuple[float, ...] = IMAGENET_MEAN,
        data_std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        networks = networks if isinstance(networks, list) else [networks]
        img_sizes = img_sizes or [None] * len(networks)
        self.members = nn.ModuleList(
            TeacherNetwork(network, size, data_mean, data_std)
            for network, size in zip(networks, img_sizes, strict=True)
        )
        self.tau = tau
        self.cache: TeacherCache | None = None
        self.features: tuple[int, FeatureTap] | None = None  # (member, where): read_features
        self.train(False)

    def read_features(self, member: int, tap: FeatureTap) -> None:
        """Every run of the networks also gives the features `tap` reads from `member` (the feature term's)."""
        self.features = (member, tap)

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # frozen: BatchNorm statistics and dropout stay as loaded

    def hold_in(self, precision: str) -> None:
        """Keep the frozen weights in the training precision's half type (bf16-mixed: bfloat16; 16-mixed: float16),
        cast once here: autocast re-casts fp32 weights that need no gradient at every call, and caches only those
        that do. Normalisation layers stay in fp32 (their statistics need its range; they take half inputs)."""
        dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(str(precision).split("-")[0])
        if dtype is None:
            return
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm | nn.GroupNorm | nn.LayerNorm):
                continue
            for parameter in module.parameters(recurse=False):
                parameter.data = parameter.data.to(dtype)
            for name, buffer in module.named_buffers(recurse=False):
                if buffer.is_floating_point() and name not in ("input_scale", "input_shift"):
                    setattr(module, name, buffer.to(dtype))

    def forward(self, images: torch.Tensor, view_keys: torch.Tensor | None = None, batch_idx: int = 0) -> TeacherOutput:
        if self.cache is not None and view_keys is not None:
            logits = self.cache.teacher_logits(batch_idx, view_keys, lambda: self.run_networks(images).logits)
            return TeacherOutput(logits, [])
        return self.run_networks(images)

    def run_networks(self, images: torch.Tensor) -> TeacherOutput:
        """Each network's logits, in one forward pass each without autograd, and their combination."""
        tapped, tap = self.features if self.features is not None else (None, None)
        member_logits, features = [], None
        with torch.inference_mode():
            for i, member in enumerate(self.members):
                if i == tapped:
                    logits, features = member.logits_and_features(images, tap)
                else:
                    logits = member(images)
                member_logits.append(logits)
        # normal fp32 tensors the loss may save
        member_logits = [logits.to(torch.float32, copy=True) for logits in member_logits]
        features = features.to(torch.float32, copy=True) if features is not None else None
        if len(member_logits) == 1:
            return TeacherOutput(member_logits[0], member_logits, features)
        return TeacherOutput(ensemble_logits(member_logits, self.tau), member_logits, features)


def build_teacher(cfg: DictConfig, class_names: list[str]) -> Teacher:
    """The run's teacher (cfg.teacher, or each of teacher.members for teacher=ensemble) on the data's classes."""
    img_sizes = member_img_sizes(cfg.teacher)
    networks = [
        build_teacher_network(member, class_names, size or cfg.model.img_size)
        for member, size in zip(teacher_members(cfg.teacher), img_sizes, strict=True)
    ]
    return Teacher(networks, tau=ensemble_tau(cfg), img_sizes=img_sizes)


def ensemble_tau(cfg: DictConfig) -> float:
    """The temperature an ensemble averages its members' probabilities at: soft distillation's; 1 for hard, whose
    target is the argmax of the average."""
    return cfg.loss.tau if cfg.loss.distillation_type == "soft" else 1.0
