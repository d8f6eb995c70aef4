"""The DeiT training objective (Touvron et al. 2021, arXiv 2012.12877, section 4).

Notation of the paper: Z_s student logits (class head), Z_dist distillation-head logits,
Z_t teacher logits, y the label, tau the temperature, psi the softmax.

    none (loss=ce):  CE(Z_s, y)                    a distilled student trains both heads on y
    soft:            (1 - alpha) CE(Z_s, y) + alpha tau^2 KL(psi(Z_dist / tau) || psi(Z_t / tau))
    hard:            (1 - alpha) CE(Z_s, y) + alpha CE(Z_dist, argmax Z_t)       (paper: alpha = 1/2)

y may be class indices (label smoothing applies) or soft targets from Mixup/CutMix. A single-head
student passes the same logits as Z_s and Z_dist (the paper's "usual distillation").

label_loss=bce (DeiT III, Touvron et al. 2022, section 3.1; official main.py --bce-loss) replaces CE(Z_s, y) by
the binary cross-entropy of each class, mean over batch x classes, on targets binarised as y > threshold (0: each
class Mixup/CutMix put in the image is a positive, as the official engine.py's targets.gt(0.0)); timm's
BinaryCrossEntropy. The distillation term stays as above.

loss.feature_weight=W > 0 adds a feature term to any of these: ... + W d(P(F_s), F_t) (FeatureLoss below).
"""

from typing import Literal

import torch
import torch.nn.functional as F
from timm.loss import BinaryCrossEntropy
from torch import nn

DistillationType = Literal["none", "soft", "hard"]
# batchmean: KL summed over classes, averaged over the batch (Hinton et al.; timm's token distillation).
# deit_official: KL summed, divided by batch x classes (facebookresearch/deit losses.py, on purpose per its
#   issue #61); numerically the batchmean value divided by the number of classes.
KLReduction = Literal["batchmean", "deit_official"]
LabelLoss = Literal["ce", "bce"]
FeatureTarget = Literal["pre_logits", "tokens"]  # FeatureLoss


class DistillationLoss(nn.Module):
    def __init__(
        self,
        distillation_type: DistillationType = "none",
        alpha: float = 0.5,
        tau: float = 1.0,
        kl_reduction: KLReduction = "batchmean",
        label_smoothing: float = 0.0,
        label_loss: LabelLoss = "ce",
        bce_target_threshold: float | None = 0.0,
        feature_weight: float = 0.0,
        feature_target: FeatureTarget = "pre_logits",
        feature_block: int = 1,
        feature_teacher_layer: int | None = None,
        feature_member: str | None = None,
    ) -> None:
        """Values as the schema checked them (schema.py, LossConfig). A feature_weight > 0 needs `feature`, the
        FeatureLoss on the run's student and teacher widths, which features.attach_feature_loss sets from the
        feature_* settings (where the features are read)."""
        super().__init__()
        self.feature_weight = feature_weight
        self.feature_target = feature_target
        self.feature_block = feature_block
        self.feature_teacher_layer = feature_teacher_layer if feature_teacher_layer is not None else feature_block
        self.feature_member = feature_member
        self.feature: FeatureLoss | None = None
        self.distillation_type = distillation_type
        self.alpha = alpha
        self.tau = tau
        self.kl_reduction = kl_reduction
        self.label_smoothing = label_smoothing
        self.bce = (
            BinaryCrossEntropy(smoothing=label_smoothing, target_threshold=bce_target_threshold)
            if label_loss == "bce"
            else None
        )

    @property
    def needs_teacher(self) -> bool:
        return self.distillation_type != "none" or self.feature_weight > 0

    def label_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """CE(Z, y) or BCE(Z, y): y as class indices (smoothed here) or as soft targets (already smoothed by
        Mixup)."""
        if self.bce is not None:
            return self.bce(logits, targets)
        smoothing = self.label_smoothing if targets.dtype == torch.long else 0.0
        return F.cross_entropy(logits, targets, label_smoothing=smoothing)

    def terms(
        self,
        cls_logits: torch.Tensor,
        dist_logits: torch.Tensor | None,
        targets: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        student_features: torch.Tensor | None = None,
        teacher_features: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The objective's parts before weighting: `cls` = CE(Z_s, y); `dist` = the distillation head's term
        (CE(Z_dist, argmax Z_t), tau^2 KL(...), or CE(Z_dist, y) without a teacher); `kl` = the KL alone (soft);
        `feature` = d(P(F_s), F_t) when feature_weight > 0."""
        terms = self.logit_terms(cls_logits, dist_logits, targets, teacher_logits)
        if self.feature is not None:
            terms["feature"] = self.feature(student_features, teacher_features)
        return terms

    def logit_terms(
        self,
        cls_logits: torch.Tensor,
        dist_logits: torch.Tensor | None,
        targets: torch.Tensor,
        teacher_logits: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        if self.distillation_type == "none":
            if dist_logits is None:
                return {"cls": self.label_loss(cls_logits, targets)}
            # Without a teacher both heads learn the label (the "classic" fine-tuning of a distilled model).
            return {
                "cls": self.label_loss(cls_logits, targets),
                "dist": self.label_loss(dist_logits, targets),
            }
        if teacher_logits is None:
            raise ValueError(f"{self.distillation_type} distillation needs teacher_logits")
        dist_logits = cls_logits if dist_logits is None else dist_logits  # a single head: "usual distillation"
        terms = {"cls": self.label_loss(cls_logits, targets)}
        if self.distillation_type == "hard":
            terms["dist"] = F.cross_entropy(dist_logits, teacher_logits.float().argmax(dim=1))
        else:
            terms["kl"] = self.kl(dist_logits, teacher_logits.float())
            terms["dist"] = self.tau * self.tau * terms["kl"]
        return terms

    def kl(self, dist_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """KL(psi(Z_dist / tau) || psi(Z_t / tau)), reduced as kl_reduction says."""
        kl_sum = F.kl_div(
            F.log_softmax(dist_logits / self.tau, dim=1),
            F.log_softmax(teacher_logits / self.tau, dim=1),
            reduction="sum",
            log_target=True,
        )
        denominator = dist_logits.shape[0] if self.kl_reduction == "batchmean" else dist_logits.numel()
        return kl_sum / denominator

    def combine(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """The logit terms' combination, plus W x the feature term."""
        loss = self.combine_logit_terms(terms)
        return loss + self.feature_weight * terms["feature"] if "feature" in terms else loss

    def combine_logit_terms(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """(1 - alpha) cls + alpha dist; without a teacher, the mean of the heads' label losses."""
        if "dist" not in terms:
            return terms["cls"]
        if self.distillation_type == "none":
            return 0.5 * (terms["cls"] + terms["dist"])
        return (1.0 - self.alpha) * terms["cls"] + self.alpha * terms["dist"]

    def forward(
        self,
        cls_logits: torch.Tensor,
        dist_logits: torch.Tensor | None,
        targets: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """cls_logits: Z_s; dist_logits: Z_dist (None for a single-head student); targets: y."""
        return self.combine(self.terms(cls_logits, dist_logits, targets, teacher_logits))


class FeatureLoss(nn.Module):
    """d(P(F_s), F_t): the student's features F_s, mapped by P, against the teacher's F_t (features.py reads them).

    pre_logits: F_s, F_t the pooled pre-logits (B x D); d the mean squared error over batch x channels, as timm's
        FeatureDistillationTask (timm.task.distillation, its kd_loss).
    tokens: ViTKD's mimicking (Yang et al. 2022, "ViTKD: Practical Guidelines for ViT feature knowledge
        distillation", arXiv 2209.02432; official code yzd-v/cls_KD, ViTKDLoss): F_s the student's N patch tokens at
        a block, F_t the teacher's tokens or a convnet's stage, resampled (bilinear, antialiased) to the student's
        patch grid; d = 1/B sum over tokens and channels of (P(F_s) - F_t)^2, the paper's summed MSE over the batch
        (it weighs each mimicked block alpha = 3e-5).
    P: a learned linear map C_s -> C_t, per token, where the widths differ (else the identity), as both do. It
    trains with the student, is saved in the run's checkpoints (criterion.feature.*) and never exported.
    """

    def __init__(self, target: FeatureTarget, student_width: int, teacher_width: int) -> None:
        super().__init__()
        self.target = target
        self.projection = nn.Linear(student_width, teacher_width) if student_width != teacher_width else None

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        if self.target == "tokens":  # (B, C, H, W) maps -> (B, N, C) tokens on the student's grid
            grid = student_features.shape[-2:]
            if teacher_features.shape[-2:] != grid:
                teacher_features = F.interpolate(
                    teacher_features.float(), size=grid, mode="bilinear", align_corners=False, antialias=True
                )
            student_features = student_features.flatten(2).transpose(1, 2)
            teacher_features = teacher_features.flatten(2).transpose(1, 2)
        if self.projection is not None:
            student_features = self.projection(student_features)
        student_features, teacher_features = student_features.float(), teacher_features.float()
        if self.target == "pre_logits":
            return F.mse_loss(student_features, teacher_features)
        return (student_features - teacher_features).pow(2).sum() / student_features.shape[0]
