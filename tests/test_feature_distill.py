"""The feature term (losses.py FeatureLoss, features.py) against timm's FeatureDistillationTask and a written-out
ViTKD mimicking loss, and its wiring into a run: the teacher ensemble's member, the checkpoint, export, refusals."""

import csv
import math
from pathlib import Path

import pytest
import timm
import torch
from timm.task.distillation import FeatureDistillationTask
from torch import nn

from deit_train.errors import DeitTrainError
from deit_train.features import FeatureTap, attach_feature_loss
from deit_train.losses import DistillationLoss
from deit_train.models.trained_model import load_trained_model
from deit_train.tasks.classify import Classify
from deit_train.teacher import Teacher
from deit_train.train import train

from .conftest import TINY_TEACHER
from .tiny import TINY_VIT_SIZES

CLASSES = 10
IMAGES = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
LABELS = torch.tensor([0, 3, 7, 9])
W = 2.5


def tiny_vit(name: str = "deit_tiny_patch16_224", **sizes) -> nn.Module:
    torch.manual_seed(1)
    sizes = {**TINY_VIT_SIZES, **sizes}
    return timm.create_model(name, num_classes=CLASSES, img_size=16, drop_path_rate=0.0, **sizes).eval()


def tiny_teacher(name: str = TINY_TEACHER) -> nn.Module:
    torch.manual_seed(2)
    return timm.create_model(name, num_classes=CLASSES).eval()


def feature_criterion(student, teacher_network, target, block=1, layer=None, distillation="none", member=None):
    """DistillationLoss with a feature term, wired as tasks/classify.py wires it; returns it, the student's tap and
    the Teacher."""
    teacher = Teacher(teacher_network if isinstance(teacher_network, list) else [teacher_network])
    criterion = DistillationLoss(
        distillation,
        feature_weight=W,
        feature_target=target,
        feature_block=block,
        feature_teacher_layer=layer,
        feature_member=member,
    )
    names = [f"net{i}" for i in range(len(teacher.members))]
    tap = attach_feature_loss(criterion, names, student, teacher)
    return criterion, tap, teacher


def our_terms(criterion, tap, teacher, student, images=IMAGES, labels=LABELS):
    final, student_features = tap(student, images)
    logits = student.forward_head(final)
    out = teacher(images)
    terms = criterion.terms(logits, None, labels, out.logits, student_features, out.features)
    return terms, criterion.combine(terms)


@pytest.mark.parametrize("student_name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_pre_logits_term_equals_timms_feature_distillation_task(student_name):
    """Same student, teacher, images and projection weights: our feature term is timm's kd_loss, and (a
    single-head student) our ce + W x feature is timm's task_loss_weight 1 + distill_loss_weight W total."""
    student, teacher_network = tiny_vit(student_name), tiny_teacher()
    criterion, tap, teacher = feature_criterion(student, teacher_network, "pre_logits")
    timms = FeatureDistillationTask(
        student, teacher_network, criterion=nn.CrossEntropyLoss(), distill_loss_weight=W, task_loss_weight=1.0
    ).eval()
    assert timms.trainable_module.projection.weight.shape == criterion.feature.projection.weight.shape == (512, 32)
    timms.trainable_module.projection.load_state_dict(criterion.feature.projection.state_dict())
    if student_name.startswith("deit_tiny_distilled"):  # timm's forward_head pairs the heads; its kd term alone
        _, student_features = timms.trainable_module(IMAGES)
        teacher_features = timms.teacher(IMAGES, return_features=True)
        expected = nn.functional.mse_loss(student_features, teacher_features)
        terms, _ = our_terms(criterion, tap, teacher, student)
        assert terms["feature"].item() == pytest.approx(expected.item(), rel=1e-5)
        return
    reference = timms(IMAGES, LABELS)
    terms, total = our_terms(criterion, tap, teacher, student)
    assert terms["feature"].item() == pytest.approx(reference["kd_loss"].item(), rel=1e-5)
    assert terms["cls"].item() == pytest.approx(reference["task_loss"].item(), rel=1e-6)
    assert total.item() == pytest.approx(reference["loss"].item(), rel=1e-5)


def output_of(module: nn.Module, run) -> torch.Tensor:
    """What `module` returns while `run()` runs (a forward hook: not timm's forward_intermediates)."""
    seen = []
    handle = module.register_forward_hook(lambda _, __, output: seen.append(output))
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


def vitkd_mimicking(student_tokens, teacher_map, weight, bias) -> float:
    """ViTKD's mimicking loss written out (official yzd-v/cls_KD ViTKDLoss: nn.MSELoss(reduction='sum') / B):
    student patch tokens (B, N, C_s) through the linear map, against the teacher's map (B, C_t, h, w) on the
    student's grid, summed over tokens and channels, over the batch size."""
    projected = student_tokens @ weight.T + bias
    targets = teacher_map.flatten(2).transpose(1, 2)
    total = 0.0
    for b in range(projected.shape[0]):
        for n in range(projected.shape[1]):
            total += sum((p - t) ** 2 for p, t in zip(projected[b, n].tolist(), targets[b, n].tolist(), strict=True))
    return total / projected.shape[0]


@pytest.mark.parametrize("layer", [1, 2])  # resnet10t's layer1 (stride 4: the student's 4x4 grid), layer2 (2x2)
def test_tokens_term_against_a_convnet_stage_is_vitkd_mimicking(layer):
    student, teacher_network = tiny_vit("deit_tiny_distilled_patch16_224"), tiny_teacher()
    criterion, tap, teacher = feature_criterion(student, teacher_network, "tokens", block=1, layer=layer)
    terms, _ = our_terms(criterion, tap, teacher, student)
    # The student's block 1 and the teacher's stage, read by hooks; class and distillation tokens dropped.
    tokens = output_of(student.blocks[1], lambda: student(IMAGES))[:, 2:].detach()
    stage = output_of(getattr(teacher_network, f"layer{layer}"), lambda: teacher_network(IMAGES)).detach()
    if stage.shape[-1] != 4:
        stage = nn.functional.interpolate(stage, size=(4, 4), mode="bilinear", align_corners=False, antialias=True)
    projection = criterion.feature.projection
    expected = vitkd_mimicking(tokens, stage, projection.weight.detach(), projection.bias.detach())
    assert terms["feature"].item() == pytest.approx(expected, rel=1e-5)


def test_tokens_term_against_a_vit_teacher_resamples_its_grid():
    """A ViT teacher with 2x2 patches (8x8 grid) taught to a 4x4-patch student (4x4 grid): its block-0 tokens
    are resampled to the student's grid; same widths take no projection."""
    student = tiny_vit()
    teacher_network = tiny_vit(patch_size=2)  # ImageNet mean/std, as the data: no re-normalisation
    criterion, tap, teacher = feature_criterion(student, teacher_network, "tokens", block=0)
    assert criterion.feature.projection is None
    terms, _ = our_terms(criterion, tap, teacher, student)
    tokens = output_of(student.blocks[0], lambda: student(IMAGES))[:, 1:].detach()
    teacher_tokens = output_of(teacher_network.blocks[0], lambda: teacher_network(IMAGES))[:, 1:].detach()
    grid = teacher_tokens.transpose(1, 2).reshape(4, 32, 8, 8)
    grid = nn.functional.interpolate(grid, size=(4, 4), mode="bilinear", align_corners=False, antialias=True)
    expected = vitkd_mimicking(tokens, grid, torch.eye(32), torch.zeros(32))
    assert terms["feature"].item() == pytest.approx(expected, rel=1e-5)


def test_an_ensemble_gives_the_named_members_features_and_its_own_logits():
    student = tiny_vit()
    first, second = tiny_teacher(), tiny_teacher("resnet18")
    criterion, tap, teacher = feature_criterion(student, [first, second], "pre_logits", member="net1")
    out = teacher(IMAGES)
    expected = second.forward_head(second.forward_features(IMAGES), pre_logits=True)
    assert out.features.shape == (4, 512)
    torch.testing.assert_close(out.features, expected)
    torch.testing.assert_close(out.member_logits[1], second(IMAGES))  # one pass still gives its logits
    torch.testing.assert_close(out.member_logits[0], first(IMAGES))


def test_under_bf16_the_teacher_gives_fp32_features_close_to_fp32s():
    student, teacher_network = tiny_vit(), tiny_teacher()
    criterion, tap, teacher = feature_criterion(student, teacher_network, "pre_logits")
    terms32, _ = our_terms(criterion, tap, teacher, student)
    teacher.hold_in("bf16-mixed")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = teacher(IMAGES)
        terms16, _ = our_terms(criterion, tap, teacher, student)
    assert out.features.dtype == torch.float32 and terms16["feature"].dtype == torch.float32
    assert terms16["feature"].item() == pytest.approx(terms32["feature"].item(), rel=0.05)


TEACHER = ["loss=hard_distill", "teacher=timm", f"teacher.name={TINY_TEACHER}", "teacher.unchecked_order=true"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["loss=ce", "loss.feature_weight=1"], "loss.feature_weight>0 needs a teacher"),
        ([*TEACHER, "loss.feature_weight=1", "teacher.cache=CACHE"], "stores the teacher's logits, not the features"),
        ([*TEACHER, "loss.feature_weight=1", "loss.feature_target=tokens", "loss.feature_block=7"], "is not a layer"),
        ([*TEACHER, "loss.feature_weight=1", "loss.feature_member=resnet50"], "names no teacher network"),
    ],
)
def test_a_feature_term_it_cannot_run_is_refused_in_one_line(overrides, message, tiny_config, tmp_path, request):
    checkpoint = request.getfixturevalue("random_teacher_checkpoint")
    overrides = [o.replace("CACHE", str(tmp_path / "cache")) for o in overrides]
    cfg = tiny_config(*overrides, f"teacher.checkpoint={checkpoint}" if "loss=ce" not in overrides else "seed=0")
    with pytest.raises(DeitTrainError, match=message) as refusal:
        Classify().check(cfg)
        Classify.build_module(cfg, [str(i) for i in range(CLASSES)])
    assert "\n" not in str(refusal.value)


def test_a_teacher_without_timms_feature_entry_points_is_refused_in_one_line():
    """A transformers classifier (teacher=hf) has no forward_head or forward_intermediates to read features from."""
    with pytest.raises(DeitTrainError, match="lacks: take a timm teacher") as refusal:
        FeatureTap("pre_logits").width(nn.Linear(3, 10), "teacher")
    assert "\n" not in str(refusal.value)


def test_masked_image_pretraining_refuses_a_feature_term(tiny_config):
    cfg = tiny_config("task=mim", "task.mask_patch_size=4", "loss.feature_weight=1")
    with pytest.raises(DeitTrainError, match="task=mim pre-trains without labels or teacher"):
        train(cfg)


def test_at_weight_zero_the_run_has_no_feature_term(tiny_config, random_teacher_checkpoint):
    """loss.feature_weight=0 (the default) builds today's module: no projection, the teacher asked for logits
    only, the student alone in the optimizer."""
    cfg = tiny_config(*TEACHER, f"teacher.checkpoint={random_teacher_checkpoint}")
    assert cfg.loss.feature_weight == 0
    module = Classify.build_module(cfg, [str(i) for i in range(CLASSES)])
    assert module.criterion.feature is None and module.feature_tap is None and module.teacher.features is None
    assert module.network is module.student
    assert not [key for key in module.state_dict() if key.startswith("criterion.")]


def logged(run_dir: Path, key: str) -> list[float]:
    (metrics,) = run_dir.glob("csv/version_*/metrics.csv")
    with metrics.open() as file:
        return [float(row[key]) for row in csv.DictReader(file) if row.get(key)]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["pre_logits", "tokens"])
def test_a_tiny_distilled_run_trains_logs_and_saves_the_feature_term(target, tiny_config, random_teacher_checkpoint):
    """loss.feature_weight=1: train/loss_feature is logged; the projection trains, sits in the checkpoint and stays
    out of what export and eval load (the student's weights alone)."""
    cfg = tiny_config(
        *TEACHER,
        f"teacher.checkpoint={random_teacher_checkpoint}",
        "loss.feature_weight=1",
        f"loss.feature_target={target}",
    )
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    features = logged(run_dir, "train/loss_feature")
    assert features and all(math.isfinite(x) for x in features)
    checkpoint = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True, map_location="cpu")
    student = {k.removeprefix("student."): v for k, v in checkpoint["state_dict"].items() if k.startswith("student.")}
    projection = [k for k in checkpoint["state_dict"] if k.startswith("criterion.")]
    assert projection == ["criterion.feature.projection.weight", "criterion.feature.projection.bias"]
    trained = load_trained_model(run_dir / "checkpoints/last.ckpt")
    optimized = sum(len(group["params"]) for group in checkpoint["optimizer_states"][0]["param_groups"])
    assert optimized == len(list(trained.model.parameters())) + 2  # the student's and the projection's
    assert set(trained.model.state_dict()) == set(student)  # export and eval load the student alone


@pytest.mark.slow
def test_the_feature_term_trains_alike_on_two_processes_in_bf16(tmp_path, cache_dir, random_teacher_checkpoint):
    """trainer=ddp_cpu with 2 processes, bf16-mixed, an EMA: every rank ends with the same student and projection
    (DDP reduces the projection's gradients; the teacher stays ignored)."""
    from .test_ddp import DDP, assert_ranks_agree, run_ok

    overrides = [
        *DDP,
        *TEACHER,
        f"teacher.checkpoint={random_teacher_checkpoint}",
        "loss.feature_weight=1",
        "loss.feature_target=tokens",
        "ema.decay=0.9",
        "trainer.precision=bf16-mixed",
        "+callbacks.probe._target_=tests.probes.RankStates",
        f"+callbacks.probe.path={tmp_path / 'ranks'}",
    ]
    run_ok(*overrides, run_dir=tmp_path / "run", cache_dir=cache_dir)
    assert_ranks_agree(tmp_path / "ranks")
    state = torch.load(tmp_path / "ranks" / "rank0.pt", weights_only=True)["state"]
    assert "criterion.feature.projection.weight" in state
