"""The official DeiT pipeline's pieces we measure and test against: its distillation loss, as written in
facebookresearch/deit's losses.py (`DistillationLoss`, main branch): the reference that the benchmark's official
training step runs and that tests/test_losses.py holds deit_train.losses against; and its training transform
(datasets.py build_transform), the reference of scripts/benchmark_data.py and the pixel tests. Kept as it is there
(the loss owns the teacher and runs it under no_grad on the step's inputs; the soft term divides by
outputs_kd.numel(), batch x classes): do not tidy it into ours.

    https://github.com/facebookresearch/deit/blob/main/losses.py
"""

import torch
import torch.nn.functional as F
from torch import nn


class OfficialDistillationLoss(nn.Module):
    """facebookresearch/deit losses.py's DistillationLoss: base criterion, then none | soft | hard, then the
    alpha mix."""

    def __init__(
        self, base_criterion: nn.Module, teacher_model: nn.Module, distillation_type: str, alpha: float, tau: float
    ) -> None:
        super().__init__()
        self.base_criterion = base_criterion
        self.teacher_model = teacher_model
        assert distillation_type in ["none", "soft", "hard"]
        self.distillation_type = distillation_type
        self.alpha = alpha
        self.tau = tau

    def forward(self, inputs, outputs, labels):
        outputs_kd = None
        if not isinstance(outputs, torch.Tensor):
            outputs, outputs_kd = outputs  # (class head, distillation head)
        base_loss = self.base_criterion(outputs, labels)
        if self.distillation_type == "none":
            return base_loss
        if outputs_kd is None:
            raise ValueError(
                "When knowledge distillation is enabled, the model is expected to return a "
                "Tuple[Tensor, Tensor] with the output of the class_token and the dist_token"
            )
        with torch.no_grad():  # don't backprop through the teacher
            teacher_outputs = self.teacher_model(inputs)
        if self.distillation_type == "soft":
            T = self.tau
            distillation_loss = (
                F.kl_div(
                    F.log_softmax(outputs_kd / T, dim=1),
                    F.log_softmax(teacher_outputs / T, dim=1),
                    reduction="sum",
                    log_target=True,
                )
                * (T * T)
                / outputs_kd.numel()
            )
        elif self.distillation_type == "hard":
            distillation_loss = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
        return base_loss * (1 - self.alpha) + distillation_loss * self.alpha


def official_train_transform(img_size: int, augment):
    """facebookresearch/deit datasets.py build_transform(is_train=True): timm's create_transform with the run's
    augment values (color_jitter, aa, train_interpolation, reprob, remode pixel, recount 1); the crop scale and the
    mean/std are timm's defaults there, (0.08, 1) and ImageNet's. Ends in fp32 with RandomErasing on the worker."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

    return create_transform(
        img_size,
        is_training=True,
        color_jitter=augment.color_jitter,
        auto_augment=augment.auto_augment,
        interpolation=augment.train_interpolation,
        re_prob=augment.reprob,
        re_mode="pixel",
        re_count=1,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )
