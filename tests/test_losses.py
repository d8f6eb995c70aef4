"""The DeiT losses against independent computations on small hand-made tensors."""

import math

import pytest
import torch

from deit_train.losses import DistillationLoss

from .conftest import official

torch.manual_seed(0)
B, C = 4, 5
CLS = torch.randn(B, C)
DIST = torch.randn(B, C)
TEACHER = torch.randn(B, C) * 2
LABELS = torch.tensor([0, 3, 1, 4])


def manual_ce(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Cross-entropy written out: mean over samples of -sum_c t_c log softmax(z)_c."""
    total = 0.0
    for z, t in zip(logits.tolist(), targets.tolist(), strict=True):
        log_norm = math.log(sum(math.exp(v) for v in z))
        if isinstance(t, int):
            total += log_norm - z[t]
        else:
            total += sum(tc * (log_norm - zc) for zc, tc in zip(z, t, strict=True))
    return total / len(logits)


def manual_kl_sum(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> float:
    """sum over samples and classes of p_t (log p_t - log p_s) at temperature tau."""
    total = 0.0
    for zs, zt in zip(student.tolist(), teacher.tolist(), strict=True):
        ps = [math.exp(v / tau) for v in zs]
        pt = [math.exp(v / tau) for v in zt]
        ps = [v / sum(ps) for v in ps]
        pt = [v / sum(pt) for v in pt]
        total += sum(t * (math.log(t) - math.log(s)) for s, t in zip(ps, pt, strict=True))
    return total


def test_hard_distill_is_half_label_ce_half_teacher_argmax_ce():
    loss = DistillationLoss("hard", alpha=0.5)(CLS, DIST, LABELS, TEACHER)
    teacher_labels = [max(range(C), key=lambda c: row[c]) for row in TEACHER.tolist()]
    expected = 0.5 * manual_ce(CLS, LABELS) + 0.5 * manual_ce(DIST, torch.tensor(teacher_labels))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_hard_distill_uses_teacher_argmax_only():
    criterion = DistillationLoss("hard")
    sharper_teacher = TEACHER * 10 + 3  # same argmax, other values
    assert criterion(CLS, DIST, LABELS, TEACHER).item() == pytest.approx(
        criterion(CLS, DIST, LABELS, sharper_teacher).item(), rel=1e-6
    )


@pytest.mark.parametrize("alpha,tau", [(0.1, 3.0), (0.5, 1.0), (0.7, 2.0)])
def test_soft_distill_batchmean_matches_formula(alpha, tau):
    loss = DistillationLoss("soft", alpha=alpha, tau=tau, kl_reduction="batchmean")(CLS, DIST, LABELS, TEACHER)
    expected = (1 - alpha) * manual_ce(CLS, LABELS) + alpha * tau**2 * manual_kl_sum(DIST, TEACHER, tau) / B
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_soft_distill_official_reduction_divides_by_batch_times_classes():
    alpha, tau = 0.5, 1.0
    loss = DistillationLoss("soft", alpha=alpha, tau=tau, kl_reduction="deit_official")(CLS, DIST, LABELS, TEACHER)
    expected = (1 - alpha) * manual_ce(CLS, LABELS) + alpha * tau**2 * manual_kl_sum(DIST, TEACHER, tau) / (B * C)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def official_distillation_loss() -> type[torch.nn.Module]:
    """facebookresearch/deit losses.py's DistillationLoss as written there (scripts/bench/official.py)."""
    return official().OfficialDistillationLoss


@pytest.mark.parametrize(
    "kind,alpha,tau", [("soft", 0.5, 1.0), ("soft", 0.3, 3.0), ("hard", 0.5, 1.0), ("hard", 0.2, 1.0)]
)
def test_distill_matches_the_official_deit_loss(kind, alpha, tau):
    """Ours with kl_reduction=deit_official against the official loss (which runs its teacher, here a function
    returning TEACHER, on the step's inputs)."""
    official = official_distillation_loss()(
        torch.nn.CrossEntropyLoss(), lambda inputs: TEACHER, kind, alpha=alpha, tau=tau
    )(None, (CLS, DIST), LABELS)
    criterion = DistillationLoss(kind, alpha=alpha, tau=tau, kl_reduction="deit_official")
    ours = criterion(CLS, DIST, LABELS, TEACHER)
    assert ours.item() == pytest.approx(official.item(), rel=1e-6)


def test_mixup_soft_targets_use_soft_cross_entropy_without_extra_smoothing():
    soft_targets = torch.softmax(torch.randn(B, C), dim=1)
    criterion = DistillationLoss("hard", alpha=0.5, label_smoothing=0.1)  # smoothing is already in the targets
    loss = criterion(CLS, DIST, soft_targets, TEACHER)
    teacher_labels = TEACHER.argmax(dim=1)
    expected = 0.5 * manual_ce(CLS, soft_targets) + 0.5 * manual_ce(DIST, teacher_labels)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_label_smoothing_applies_to_index_targets():
    eps = 0.1
    smoothed = torch.full((B, C), eps / C)
    smoothed[torch.arange(B), LABELS] += 1 - eps
    loss = DistillationLoss("none", label_smoothing=eps)(CLS, None, LABELS)
    assert loss.item() == pytest.approx(manual_ce(CLS, smoothed), rel=1e-5)


def test_ce_without_teacher_trains_both_heads_on_the_label():
    loss = DistillationLoss("none")(CLS, DIST, LABELS)
    assert loss.item() == pytest.approx(0.5 * manual_ce(CLS, LABELS) + 0.5 * manual_ce(DIST, LABELS), rel=1e-5)


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_single_head_student_distills_on_its_only_head(kind):
    criterion = DistillationLoss(kind, alpha=0.3, tau=2.0)
    loss = criterion(CLS, None, LABELS, TEACHER)
    hard = manual_ce(CLS, TEACHER.argmax(dim=1))
    distill = hard if kind == "hard" else 4.0 * manual_kl_sum(CLS, TEACHER, 2.0) / B
    assert loss.item() == pytest.approx(0.7 * manual_ce(CLS, LABELS) + 0.3 * distill, rel=1e-5)


def test_distillation_without_teacher_logits_is_refused():
    with pytest.raises(ValueError, match="teacher_logits"):
        DistillationLoss("hard")(CLS, DIST, LABELS)


def manual_bce(logits: torch.Tensor, targets: list[list[float]]) -> float:
    """Binary cross-entropy written out: mean over samples and classes of -(t log s(z) + (1 - t) log(1 - s(z)))."""
    total, count = 0.0, 0
    for z_row, t_row in zip(logits.tolist(), targets, strict=True):
        for z, t in zip(z_row, t_row, strict=True):
            s = 1 / (1 + math.exp(-z))
            total -= t * math.log(s) + (1 - t) * math.log(1 - s)
            count += 1
    return total / count


# Mixup/CutMix targets: lam one-hot(y) + (1 - lam) one-hot(y'), one image unmixed (lam = 1).
MIXED = torch.tensor(
    [[0.7, 0, 0, 0.3, 0], [0, 0, 0, 0.55, 0.45], [0, 1.0, 0, 0, 0], [0.2, 0, 0, 0, 0.8]], dtype=torch.float32
)


def test_bce_counts_every_class_mixup_put_in_the_image_as_present():
    """DeiT III (official engine.py): targets.gt(0.0), then BCEWithLogitsLoss (mean over batch x classes)."""
    binary = [[1.0 if t > 0 else 0.0 for t in row] for row in MIXED.tolist()]
    loss = DistillationLoss("none", label_loss="bce")(CLS, None, MIXED)
    assert loss.item() == pytest.approx(manual_bce(CLS, binary), rel=1e-6)
    official = torch.nn.BCEWithLogitsLoss()(CLS, MIXED.gt(0.0).type(MIXED.dtype))
    assert loss.item() == pytest.approx(official.item(), rel=1e-6)


def test_bce_with_soft_targets_keeps_the_mixup_weights():
    loss = DistillationLoss("none", label_loss="bce", bce_target_threshold=None)(CLS, None, MIXED)
    assert loss.item() == pytest.approx(manual_bce(CLS, MIXED.tolist()), rel=1e-6)


def test_hard_distillation_on_top_of_bce_keeps_the_teacher_term_a_cross_entropy():
    loss = DistillationLoss("hard", alpha=0.5, label_loss="bce")(CLS, DIST, MIXED, TEACHER)
    binary = [[1.0 if t > 0 else 0.0 for t in row] for row in MIXED.tolist()]
    teacher_labels = [max(range(C), key=lambda c, row=row: row[c]) for row in TEACHER.tolist()]
    expected = 0.5 * manual_bce(CLS, binary) + 0.5 * manual_ce(DIST, torch.tensor(teacher_labels))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
