"""Every option of every config group composes, and every model/teacher/loss/data option builds."""

import random
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from timm.data.transforms_factory import transforms_imagenet_eval, transforms_imagenet_train
from torchvision import transforms as T

from deit_train.data import DeiTDataModule
from deit_train.data.transforms import eval_transform, train_transform
from deit_train.errors import DeitTrainError
from deit_train.losses import DistillationLoss
from deit_train.models.student import build_student, forward_heads
from deit_train.schema import check
from deit_train.teacher import build_teacher_network
from deit_train.train import CONFIG_DIR

from .conftest import compose_config, finished, save_safetensors

GROUPS = [
    "model",
    "teacher",
    "loss",
    "data",
    "augment",
    "optim",
    "trainer",
    "logger",
    "callbacks",
    "paths",
    "hydra",
    "task",
    "experiment",
]
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted(Path(CONFIG_DIR, group).glob("*.yaml"))]

# DeiT paper, Table 1: embedding dimension, heads, depth and resolution of each model.
PAPER_MODELS = {
    "deit_tiny": (192, 3, 12, 224),
    "deit_small": (384, 6, 12, 224),
    "deit_base": (768, 12, 12, 224),
    "deit_base_384": (768, 12, 12, 384),
    # the plain DeiT (no distillation token): Table 1's same sizes
    "deit_tiny_plain": (192, 3, 12, 224),
    "deit_small_plain": (384, 6, 12, 224),
    "deit_base_plain": (768, 12, 12, 224),
    "deit_base_384_plain": (768, 12, 12, 384),
}


def vit_parameters(
    dim: int,
    depth: int,
    tokens: int,
    classes: int,
    patch: int = 16,
    distilled: bool = True,
    layer_scale: bool = False,
    position_on_prefix: bool = True,
) -> int:
    """Closed-form parameter count of a (distilled) ViT: patch embedding, class (+ distillation) token, position
    embeddings (on the patches, and on the prefix tokens unless DeiT III), depth x (2 norms, qkv, proj, 4x MLP, and
    DeiT III's two LayerScale vectors), final norm, one head (two when distilled)."""
    prefix = 2 if distilled else 1
    block = (
        2 * dim
        + (3 * dim * dim + 3 * dim)
        + (dim * dim + dim)
        + 2 * dim
        + (4 * dim * dim + 4 * dim)
        + (4 * dim * dim + dim)
        + (2 * dim if layer_scale else 0)
    )
    return (
        (3 * patch * patch * dim + dim)
        + prefix * dim
        + (tokens + (prefix if position_on_prefix else 0)) * dim
        + depth * block
        + 2 * dim
        + prefix * (dim * classes + classes)
    )


# DeiT III (README_revenge.md's table, ImageNet-1k heads): ViT-S 22.0M, ViT-B 86.6M, ViT-L 304.4M parameters.
DEIT3_MODELS = {
    "deit3_small": (384, 6, 12, 22.0),
    "deit3_base": (768, 12, 12, 86.6),
    "deit3_large": (1024, 16, 24, 304.4),
}


@pytest.mark.parametrize("option", [*DEIT3_MODELS, *(f"{name}_distilled" for name in DEIT3_MODELS)])
def test_deit3_models_have_layer_scale_and_the_published_sizes(option, tmp_path):
    cfg = compose_config([f"model={option}"], tmp_path, tmp_path)
    dim, heads, depth, published_millions = DEIT3_MODELS[option.removesuffix("_distilled")]
    assert (cfg.model.embed_dim, cfg.model.num_heads, cfg.model.depth) == (dim, heads, depth)
    distilled = option.endswith("_distilled")
    # timm's distilled ViT keeps position embeddings on its two tokens (no_embed_class would not fit them)

    def count(classes):
        return vit_parameters(
            dim, depth, 196, classes, distilled=distilled, layer_scale=True, position_on_prefix=distilled
        )

    if not distilled:
        assert count(1000) / 1e6 == pytest.approx(published_millions, abs=0.1)  # S: 22.06M, printed 22.0
    with torch.device("meta"):  # sizes and shapes without the memory or the initialisation (ViT-L: 4 s)
        student = build_student(cfg.model, num_classes=10)
    assert sum(p.numel() for p in student.parameters()) == count(10)
    one_block = build_student(OmegaConf.merge(cfg.model, {"depth": 1}), num_classes=10)  # with values
    assert one_block.blocks[0].ls1.gamma.flatten()[0].item() == pytest.approx(1e-6)  # LayerScale's init


def test_every_group_has_options():
    assert {group for group, _ in OPTIONS} == set(GROUPS)


def leaves(node, prefix: str = "") -> dict:
    """Dotted key -> value of every leaf of a yaml mapping."""
    if isinstance(node, list) and node and all(isinstance(item, dict) for item in node):  # teacher.members
        node = dict(enumerate(node))
    if not isinstance(node, dict) or not node:
        return {prefix.rstrip("."): node}
    return {key: value for name, child in node.items() for key, value in leaves(child, f"{prefix}{name}.").items()}


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_with_the_values_its_file_sets(group, option, tmp_path):
    """Each value an option's file sets is in the config it composes to (under the group, or at the top for
    `# @package _global_` files), unless a later default of the same file overrides it."""
    cfg = compose_config([f"{group}={option}"], tmp_path, tmp_path)
    path = Path(CONFIG_DIR, group, f"{option}.yaml")
    text = path.read_text()
    values = yaml.safe_load(text) or {}
    values.pop("defaults", None)
    prefix = "" if "# @package _global_" in text else "hydra." if group == "hydra" else f"{group}."
    if group == "hydra":
        return  # Hydra's own node is not part of the run config (it is checked by running sweeps)
    interpolated = OmegaConf.to_container(OmegaConf.create(values), resolve=False)
    for key, value in leaves(interpolated).items():
        if key == "" or (isinstance(value, str) and "${" in value):  # a file of defaults only; or resolved at run
            continue
        assert OmegaConf.select(cfg, f"{prefix}{key}") == value, (key, value)


@pytest.mark.parametrize("option", list(PAPER_MODELS))
def test_paper_models_build_with_the_paper_sizes(option, tmp_path):
    cfg = compose_config([f"model={option}"], tmp_path, tmp_path)
    dim, heads, depth, resolution = PAPER_MODELS[option]
    assert (cfg.model.embed_dim, cfg.model.num_heads, cfg.model.depth, cfg.model.img_size) == PAPER_MODELS[option]
    with torch.device("meta"):  # sizes and shapes without the memory or the arithmetic (ViT-B at 384 px: 2 s)
        student = build_student(cfg.model, num_classes=10)
        images = torch.randn(1, 3, cfg.model.img_size, cfg.model.img_size)
    tokens = (resolution // 16) ** 2
    distilled = not option.endswith("_plain")
    assert sum(p.numel() for p in student.parameters()) == vit_parameters(dim, depth, tokens, 10, distilled=distilled)
    assert student.patch_embed.img_size == (resolution, resolution)
    cls_logits, dist_logits = forward_heads(student.eval(), images)
    assert cls_logits.shape == (1, 10)
    assert (dist_logits is not None) == distilled


def test_timm_and_demo_models_build(tmp_path):
    for option, distilled in (("timm", False), ("deit_demo", True)):
        cfg = compose_config([f"model={option}"], tmp_path, tmp_path)
        student = build_student(cfg.model, num_classes=3)
        assert hasattr(student, "head_dist") == distilled


@pytest.mark.parametrize("option", ["regnety_160", "resnet50", "timm"])
def test_teacher_options_build_from_a_checkpoint(option, tmp_path):
    cfg = compose_config([f"teacher={option}"], tmp_path, tmp_path)
    architecture = cfg.teacher.name.split(".")[0]
    reference = timm.create_model(architecture, num_classes=4).eval()
    save_safetensors(reference, tmp_path / "t.safetensors")
    cfg.teacher.checkpoint = str(tmp_path / "t.safetensors")
    teacher = build_teacher_network(cfg.teacher, ["a", "b", "c", "d"])
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(teacher(images), reference(images))


def test_paper_teacher_is_the_official_deit_checkpoint(tmp_path):
    cfg = compose_config(["teacher=regnety_160"], tmp_path, tmp_path)
    assert cfg.teacher.name == "regnety_160.deit_in1k" and cfg.teacher.pretrained
    assert "deit" in timm.models.get_pretrained_cfg("regnety_160.deit_in1k").url


@pytest.mark.parametrize("option,kind", [("ce", "none"), ("hard_distill", "hard"), ("soft_distill", "soft")])
def test_loss_options_build(option, kind, tmp_path):
    cfg = compose_config([f"loss={option}"], tmp_path, tmp_path)
    criterion = DistillationLoss(**cfg.loss)
    assert criterion.distillation_type == kind


def test_soft_distill_defaults_are_the_papers(tmp_path):
    cfg = compose_config(["loss=soft_distill"], tmp_path, tmp_path)
    assert (cfg.loss.tau, cfg.loss.alpha, cfg.loss.kl_reduction) == (3.0, 0.1, "batchmean")


AUGMENT_OPTIONS = sorted(path.stem for path in Path(CONFIG_DIR, "augment").glob("*.yaml"))
# What each augment option asks of timm, written from the papers, not read from the yaml: DeiT (Touvron et al. 2021,
# Table 9; the official main.py's create_transform arguments), DeiT III's 3-Augment (Touvron et al. 2022, section
# 3.2: timm's '3a' policy, colour jitter 0.3, no random erasing) and SimMIM's crop (Xie et al. 2022: scale 0.67-1).
# Each is timm's transforms_imagenet_train at img_size 32, ImageNet mean/std; "none" trains on the eval transform and
# three_augment_src puts DeiT III's simple random crop in front of timm's 3-Augment (see timm_train_transform).
TIMM_TRAIN = {
    "deit": dict(
        scale=(0.08, 1.0),
        auto_augment="rand-m9-mstd0.5-inc1",
        color_jitter=0.3,
        interpolation="bicubic",
        re_prob=0.25,
        re_mode="pixel",
        re_count=1,
    ),
    "three_augment": dict(scale=(0.08, 1.0), auto_augment="3a", color_jitter=0.3, interpolation="bicubic"),
    "three_augment_src": dict(auto_augment="3a", color_jitter=0.3, interpolation="bicubic"),
    "mim": dict(scale=(0.67, 1.0), auto_augment=None, color_jitter=None, interpolation="bicubic"),
    "none": None,
}
IMG_SIZE = 32


def noise_image(width: int, height: int) -> Image.Image:
    """Random pixels: any difference in crop window, interpolation or colour shows in the tensor."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def timm_eval_transform():
    """DeiT's eval transform as timm builds it: short side to floor(32 / 0.875) = 36, bicubic, centre crop 32."""
    return transforms_imagenet_eval(IMG_SIZE, crop_pct=0.875, interpolation="bicubic")


def timm_train_transform(option: str, **changes):
    if TIMM_TRAIN[option] is None:
        return timm_eval_transform()
    settings = {**TIMM_TRAIN[option], **changes}
    if option != "three_augment_src":
        return transforms_imagenet_train(IMG_SIZE, **settings)
    # DeiT III's simple random crop, as its augment.py new_data_aug_generator(src=True) writes it, then timm's
    # policy, colour jitter and normalisation (the secondary and final stages of its factory).
    _, secondary, final = transforms_imagenet_train(IMG_SIZE, **settings, separate=True)
    primary = [
        T.Resize(IMG_SIZE, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomCrop(IMG_SIZE, padding=4, padding_mode="reflect"),
        T.RandomHorizontalFlip(),
    ]
    return T.Compose([*primary, secondary, final])


def seeded(transform, image: Image.Image, seed: int) -> torch.Tensor:
    """transform(image) after seeding every generator a transform may draw from: python's, numpy's and torch's."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return transform(image)


def test_every_augment_option_has_a_timm_reference():
    assert sorted(TIMM_TRAIN) == AUGMENT_OPTIONS


def assert_trains_as(ours, theirs, distinct_views: bool = True) -> None:
    """Under the same seeds, `ours` gives what timm's `theirs` gives (outside the erased noise), and each seed draws
    its own augmentation (one view for all where nothing is random)."""
    image = noise_image(50, 37)  # larger than the crop, not square (for "none": offsets on which both agree)
    outputs = []
    for seed in range(12):
        expected = seeded(theirs, image, seed)
        assert expected.shape == (3, IMG_SIZE, IMG_SIZE)
        got, outside = finished(seeded(ours, image, seed))
        assert torch.equal(got[:, outside], expected[:, outside]), seed  # all but the erased noise
        outputs.append(expected)
    distinct = len({output.numpy().tobytes() for output in outputs})
    assert distinct == (len(outputs) if distinct_views else 1), "each seed draws its own augmentation"


@pytest.mark.parametrize("option", AUGMENT_OPTIONS)
def test_augment_option_trains_on_timms_transform(option, tmp_path):
    """Under the same seeds, each option's train transform gives the same tensor as timm's transform built from
    the paper's numbers: the same crop, flip, policy, jitter, erasing and normalisation, drawn in the same order."""
    cfg = compose_config([f"augment={option}"], tmp_path, tmp_path)
    assert_trains_as(train_transform(cfg.augment, IMG_SIZE), timm_train_transform(option), option != "none")


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "augmix-m5-w4-d2", "original"])
def test_simple_random_crop_takes_every_timm_policy_as_timm_builds_it(policy, tmp_path):
    """DeiT III's simple random crop with any policy timm takes: accepted by the config check (a rand-* or augmix-*
    policy was refused, sent to the AutoAugment parser whatever its prefix) and built as timm builds the policy
    and its colour-jitter rule behind its own crop."""
    cfg = compose_config(["augment=three_augment_src", f"augment.auto_augment={policy}"], tmp_path, tmp_path)
    check(cfg)
    ours = train_transform(cfg.augment, IMG_SIZE)
    assert_trains_as(ours, timm_train_transform("three_augment_src", auto_augment=policy))


@pytest.mark.parametrize("option", AUGMENT_OPTIONS)
def test_augment_option_evaluates_on_timms_eval_transform(option, tmp_path):
    cfg = compose_config([f"augment={option}"], tmp_path, tmp_path)
    image = noise_image(50, 37)  # resized to 48x36: both centre-crop offsets (8, 2) are whole
    assert torch.equal(finished(eval_transform(cfg.augment, IMG_SIZE)(image))[0], timm_eval_transform()(image))


def test_eval_centre_crop_floors_where_timm_rounds_up(tmp_path):
    """53x37 resizes to 51x36: 19 spare columns. Our crop starts at column floor(19 / 2) = 9 (as transformers'
    processors, so that an exported model sees the same pixels); torchvision's CenterCrop in timm's eval transform
    starts at round(9.5) = 10. The same window one column apart: equal where they overlap, different as a whole."""
    cfg = compose_config([], tmp_path, tmp_path)
    image = noise_image(53, 37)
    ours, theirs = finished(eval_transform(cfg.augment, IMG_SIZE)(image))[0], timm_eval_transform()(image)
    assert not torch.equal(ours, theirs)
    torch.testing.assert_close(ours[..., 1:], theirs[..., :-1], rtol=0, atol=0)


def test_data_demo_and_imagefolder_options_find_their_classes(tmp_path, cache_dir, demo_data):
    demo = compose_config(
        ["data=demo", "data.image_size=16", "data.train_per_class=8", "data.val_per_class=4"],
        tmp_path,
        cache_dir,
    )
    assert DeiTDataModule(demo.data, demo.augment, 16).num_classes == 10
    folder = compose_config(["data=imagefolder", f"data.root={demo_data}"], tmp_path, cache_dir)
    assert (
        DeiTDataModule(folder.data, folder.augment, 16).class_names
        == DeiTDataModule(demo.data, demo.augment, 16).class_names
    )


@pytest.mark.parametrize("option", ["cifar10", "cifar100"])
def test_cifar_options_point_at_torchvision(option, tmp_path):
    cfg = compose_config([f"data={option}"], tmp_path, tmp_path)
    assert not cfg.data.download  # never downloads unless asked
    with pytest.raises(DeitTrainError, match=option):
        _ = DeiTDataModule(cfg.data, cfg.augment, 32).class_names


@pytest.mark.parametrize("option", ["default", "cpu"])
def test_trainer_options_instantiate(option, tmp_path):
    from deit_train.run import choose_precision

    cfg = compose_config([f"trainer={option}", "trainer.max_epochs=1"], tmp_path, tmp_path)
    choose_precision(cfg)  # trainer.precision=auto, as the run decides it
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.max_epochs == 1


def test_gpu_trainer_options_ask_for_gpus(tmp_path):
    assert compose_config(["trainer=gpu"], tmp_path, tmp_path).trainer.accelerator == "gpu"
    ddp = compose_config(["trainer=ddp", "trainer.devices=8"], tmp_path, tmp_path).trainer
    assert (ddp.accelerator, ddp.strategy, ddp.devices) == ("gpu", "ddp", 8)


@pytest.mark.parametrize("preset", [None, "deit_small_distilled", "deit3_small", "deit_base_distilled_384_finetune"])
def test_precision_follows_the_hardware_whatever_the_trainer(preset, tmp_path, monkeypatch):
    """The paper and the official code train in mixed precision: on a GPU with bf16 every trainer, the default one
    (accelerator auto) included, trains in bf16-mixed (the default trainer trained in fp32 there); 16-mixed on a GPU
    without bf16; the CPU trainers and a machine without a GPU in 32-true; a precision asked for is kept."""
    from deit_train.run import choose_precision

    def chosen(gpu: bool, bf16: bool, *overrides: str) -> str:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "an old GPU")
        cfg = compose_config([*([f"experiment={preset}"] if preset else []), *overrides], tmp_path, tmp_path)
        choose_precision(cfg)
        return cfg.trainer.precision

    # each trainer once; a preset (which could fix a precision in its file) with the default trainer
    for trainer in ("default", "gpu", "ddp", "ddp_spawn") if preset is None else ("default",):
        assert chosen(True, True, f"trainer={trainer}") == "bf16-mixed"
        assert chosen(True, False, f"trainer={trainer}") == "16-mixed"
    for trainer in ("cpu", "ddp_cpu") if preset is None else ("cpu",):
        assert chosen(True, True, f"trainer={trainer}") == "32-true"
    assert chosen(False, False, "trainer=default") == "32-true"
    assert chosen(True, True, "trainer=gpu", "trainer.precision=32-true") == "32-true"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a CUDA GPU")
def test_a_gpu_trainer_on_a_machine_without_one_names_the_cpu_trainers(tmp_path, demo_data):
    from deit_train.train import check_config

    cfg = compose_config(["experiment=deit_tiny_distilled", f"data.root={demo_data}"], tmp_path, tmp_path)
    with pytest.raises(DeitTrainError, match="has no CUDA GPU: .* add trainer=cpu"):
        check_config(cfg)


def test_ddp_strategy_is_set_as_experts_set_it(tmp_path, random_teacher_checkpoint):
    """trainer=ddp: gradients as bucket views, no per-forward broadcast for a ViT student (it has no buffers), and the
    frozen teacher and the divergence flag never broadcast nor reduced; a BatchNorm student keeps the broadcast."""
    from deit_train.run import build_trainer
    from deit_train.tasks.classify import Classify

    distill = [
        "loss=hard_distill",
        "teacher=timm",
        "teacher.name=resnet10t",
        f"teacher.checkpoint={random_teacher_checkpoint}",
    ]
    tiny = ["experiment=demo", "model.img_size=16", "data.image_size=16"]
    vit = ["model.depth=1", "model.embed_dim=32", "model.num_heads=2", "model.patch_size=4"]
    cfg = compose_config([*tiny, *vit, *distill, "trainer=ddp_cpu"], tmp_path / "run", tmp_path)
    class_names = [str(i) for i in range(10)]
    module = Classify.build_module(cfg, class_names)
    trainer = build_trainer(cfg, tmp_path / "run", [], module)
    kwargs = trainer.strategy._ddp_kwargs
    assert kwargs["gradient_as_bucket_view"] is True and kwargs["broadcast_buffers"] is False
    teacher_names = {f"teacher.{n}" for n, _ in module.teacher.named_parameters()}
    teacher_names |= {f"teacher.{n}" for n, _ in module.teacher.named_buffers()}
    assert any("running_var" in n for n in teacher_names)
    assert set(module._ddp_params_and_buffers_to_ignore) == teacher_names | {"loss_diverged"}
    convnet = compose_config(
        [*tiny, *distill, "trainer=ddp_cpu", "model=timm", "model.name=resnet10t"], tmp_path / "conv", tmp_path
    )
    module = Classify.build_module(convnet, class_names)
    assert build_trainer(convnet, tmp_path / "conv", [], module).strategy._ddp_kwargs["broadcast_buffers"] is True


@pytest.mark.parametrize("option", ["csv", "tensorboard", "wandb"])
def test_logger_options_instantiate(option, tmp_path):
    cfg = compose_config([f"logger={option}"], tmp_path, tmp_path)
    loggers = [instantiate(c) for c in cfg.logger.values()]
    assert loggers and all(hasattr(lg, "log_metrics") for lg in loggers)


def test_callbacks_instantiate_and_watch_val_acc1(tmp_path):
    cfg = compose_config([], tmp_path, tmp_path)
    callbacks = {name: instantiate(c) for name, c in cfg.callbacks.items()}
    assert callbacks["checkpoints"].monitor == "val/acc1" and callbacks["checkpoints"].mode == "max"


def test_unknown_keys_are_errors(tmp_path):
    with pytest.raises(Exception, match="depht"):
        compose_config(["model.depht=3"], tmp_path, tmp_path)
    cfg = compose_config([], tmp_path, tmp_path)
    assert OmegaConf.is_struct(cfg)
