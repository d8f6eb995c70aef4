"""Where the feature term (losses.py, FeatureLoss) reads the student and the teacher: one forward pass gives both the
output that the heads read and the features, through timm's own entry points (forward_features and forward_head's
pre_logits; forward_intermediates, which every timm ViT and convnet has)."""

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from timm.task.distillation import FeatureDistillationTask
from torch import nn

from deit_train.errors import DeitTrainError
from deit_train.losses import DistillationLoss, FeatureLoss

if TYPE_CHECKING:  # teacher.py imports this module
    from deit_train.teacher import Teacher


@dataclass(frozen=True)
class FeatureTap:
    """target=pre_logits: the pooled pre-logits (B, D); target=tokens: the intermediate `index` of timm's
    forward_intermediates as a spatial map (B, C, H, W): a ViT's patch tokens on their grid (class and
    distillation tokens left out), a convnet's stage."""

    target: str  # pre_logits | tokens
    index: int = 1

    def __call__(self, network: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(forward_features' output, for the heads; the features), in one pass."""
        if self.target == "pre_logits":
            final = network.forward_features(images)
            return final, network.forward_head(final, pre_logits=True)
        final, (features,) = network.forward_intermediates(images, indices=[self.index], output_fmt="NCHW")
        return final, features

    def width(self, network: nn.Module, what: str) -> int:
        """The features' channels, from the network's timm metadata (no forward pass). `what` names it in errors."""
        if not hasattr(network, "forward_intermediates") or not hasattr(network, "forward_head"):
            raise DeitTrainError(
                f"loss.feature_weight>0 reads the {what}'s features through timm's forward_head and "
                f"forward_intermediates, which {type(network).__name__} lacks: take a timm {what}, or "
                f"loss.feature_weight=0"
            )
        if self.target == "pre_logits":
            return FeatureDistillationTask._detect_feature_dim(network)  # timm's rule: head_hidden_size, num_features
        layers = network.feature_info
        if not -len(layers) <= self.index < len(layers):
            names = ", ".join(f"{i}: {layer['module']}" for i, layer in enumerate(layers))
            option = "loss.feature_block" if what == "student" else "loss.feature_teacher_layer"
            raise DeitTrainError(
                f"{option}={self.index} is not a layer of the {what} {type(network).__name__}, whose "
                f"forward_intermediates has {len(layers)} ({names}): choose one of them"
            )
        return layers[self.index]["num_chs"]


def member_index(member: str | None, names: list[str]) -> int:
    """loss.feature_member as an index into the teacher's networks: a name, an index, or None (the first)."""
    if member is None:
        return 0
    if member in names:
        return names.index(member)
    if member.lstrip("-").isdigit() and -len(names) <= int(member) < len(names):
        return int(member) % len(names)
    raise DeitTrainError(
        f"loss.feature_member={member} names no teacher network: give one of {names} or its index 0-{len(names) - 1}"
    )


def attach_feature_loss(
    criterion: DistillationLoss, member_names: list[str], student: nn.Module, teacher: "Teacher"
) -> FeatureTap:
    """The feature term of a run, as criterion's feature_* settings say: criterion.feature on the widths of the
    student's and the teacher's features, the teacher asked for them (Teacher.read_features); returns where the
    student's are read."""
    target = criterion.feature_target
    student_tap = FeatureTap(target, criterion.feature_block)
    teacher_tap = FeatureTap(target, criterion.feature_teacher_layer)
    member = member_index(criterion.feature_member, member_names)
    network = teacher.members[member].network
    widths = student_tap.width(student, "student"), teacher_tap.width(network, "teacher")
    criterion.feature = FeatureLoss(target, *widths)
    teacher.read_features(member, teacher_tap)
    return student_tap
