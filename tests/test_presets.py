"""The paper's recipes as presets: values checked against the papers, and each preset runs one tiny step."""

import pytest
import timm
import torch
from omegaconf import OmegaConf

from deit_train.train import train

from .conftest import assert_metrics_reproduce, compose_config, save_safetensors

# Written from the DeiT paper (Touvron et al. 2021, Table 9 and section 6.3) and the official README's commands.
IMAGENET_RECIPE = {
    "data.batch_size": 1024,
    "optim.name": "adamw",
    "optim.lr": 5e-4,
    "optim.lr_batch_ref": 512,
    "optim.weight_decay": 0.05,
    "optim.warmup_epochs": 5,
    "optim.min_lr": 1e-5,
    "trainer.max_epochs": 300,
    "model.drop_path_rate": 0.1,
    "augment.auto_augment": "rand-m9-mstd0.5-inc1",
    "augment.mixup": 0.8,
    "augment.cutmix": 1.0,
    "augment.reprob": 0.25,
    "augment.smoothing": 0.1,
    "augment.repeated_aug": 3,
    "ema.decay": 0.99996,
    "teacher.name": "regnety_160.deit_in1k",
    "loss.distillation_type": "hard",
    "loss.alpha": 0.5,
}
FINETUNE_384 = {
    "model.img_size": 384,
    "optim.lr": 5e-6,
    "optim.weight_decay": 1e-8,
    "optim.min_lr": 5e-6,
    "trainer.max_epochs": 30,
}
PAPER = {
    "deit_tiny_distilled": {**IMAGENET_RECIPE, "model.embed_dim": 192, "model.num_heads": 3},
    "deit_small_distilled": {**IMAGENET_RECIPE, "model.embed_dim": 384, "model.num_heads": 6},
    "deit_base_distilled": {**IMAGENET_RECIPE, "model.embed_dim": 768, "model.num_heads": 12},
    "deit_base_distilled_384_finetune": {
        **FINETUNE_384,
        "loss.distillation_type": "hard",
        "teacher.name": "regnety_160.deit_in1k",
        # Section 6.3: the teacher at the target resolution, adapted by FixRes (experiment=teacher_fixres_384).
        "teacher.img_size": 384,
        "required": ["model.init", "teacher.checkpoint"],
    },
    # FixRes (Touvron et al. 2019), official imnet_finetune/train.py and main_finetune.py defaults: the classifier
    # alone, test transform, SGD momentum 0.9, wd 1e-4, lr 8 x 1e-3 x batch / 512 (batch 8 x 32 GPUs), 1 epoch.
    "teacher_fixres_384": {
        "model.name": "regnety_160.deit_in1k",
        "model.img_size": 384,
        "model.trainable": ["head.*"],
        "augment.crop": "center",
        "augment.eval_crop_pct": 0.875,
        "optim.name": "momentum",
        "optim.lr": 8e-3,
        "optim.lr_batch_ref": 512,
        "optim.weight_decay": 1e-4,
        "optim.warmup_epochs": 0,
        "data.batch_size": 256,
        "trainer.max_epochs": 1,
        "loss.distillation_type": "none",
    },
    # The paper's plain DeiT-B (no distillation token), so that it starts from the non-distilled 224 checkpoint.
    "deit_base_384_finetune": {
        **FINETUNE_384,
        "model.name": "deit_base_patch16_384",
        "loss.distillation_type": "none",
        "teacher.name": None,
        "teacher.img_size": None,
        "required": ["model.init"],
    },
    # The official repository's maintainers' advice for CIFAR-style transfer.
    "deit_transfer": {
        "optim.name": "sgd",  # timm's sgd is Nesterov, as the official --opt sgd
        "optim.warmup_epochs": 5,
        "trainer.max_epochs": 1000,
        "optim.lr": 0.01,
        "optim.weight_decay": 1e-4,
        "augment.reprob": 0.0,
        "model.drop_path_rate": 0.0,
        "loss.distillation_type": "hard",
    },
}
# DeiT III (Touvron et al. 2022), ImageNet-1k: the official README_revenge.md commands. Global batch = --batch x GPUs
# x nodes; --unscale-lr: lr as given (lr_batch_ref null); --eval-crop-ratio 1.0; no --src (random resized crop);
# EMA 0.99996 is main.py's default. Top-1 (README_revenge.md's table): ViT-S 81.4, ViT-B 83.8, ViT-L 84.9.
DEIT3_PRETRAIN = {
    "loss.label_loss": "bce",  # --bce-loss
    "loss.bce_target_threshold": 0.0,  # engine.py: targets.gt(0.0)
    "optim.name": "lamb",  # --opt fusedlamb
    "optim.lr_batch_ref": None,
    "optim.weight_decay": 0.05,
    "optim.warmup_epochs": 5,
    "optim.warmup_lr": 1e-6,
    "optim.min_lr": 1e-5,
    "data.batch_size": 2048,  # 256 x 8 GPUs (S, B); 64 x 8 x 4 nodes (L)
    "trainer.max_epochs": 800,
    "augment.crop": "random_resized",
    "augment.auto_augment": "3a",  # --ThreeAugment
    "augment.color_jitter": 0.3,
    "augment.smoothing": 0.0,
    "augment.reprob": 0.0,
    "augment.mixup": 0.8,
    "augment.cutmix": 1.0,
    "augment.repeated_aug": 3,
    "augment.eval_crop_pct": 1.0,
    "ema.decay": 0.99996,
}
DEIT3_FINETUNE_224 = {  # B and L: 20 epochs at 224 from the 192 px checkpoint
    "required": ["model.init"],
    "model.img_size": 224,
    "loss.label_loss": "ce",
    "optim.name": "adamw",
    "optim.lr": 1e-5,
    "optim.lr_batch_ref": None,
    "optim.weight_decay": 0.1,
    "optim.warmup_epochs": 5,
    "data.batch_size": 512,  # 64 x 8 GPUs
    "trainer.max_epochs": 20,
    "augment.auto_augment": "rand-m9-mstd0.5-inc1",
    "augment.smoothing": 0.1,
    "augment.reprob": 0.0,
    "augment.repeated_aug": 1,  # --no-repeated-aug
    "augment.eval_crop_pct": 1.0,
}
VIT_S = {"model.embed_dim": 384, "model.depth": 12, "model.num_heads": 6}
VIT_B = {"model.embed_dim": 768, "model.depth": 12, "model.num_heads": 12}
VIT_L = {"model.embed_dim": 1024, "model.depth": 24, "model.num_heads": 16}
DEIT3 = {
    "deit3_small": {
        **DEIT3_PRETRAIN,
        **VIT_S,
        "model.name": "deit3_small_patch16_224",
        "model.img_size": 224,
        "optim.lr": 4e-3,
        "model.drop_path_rate": 0.05,
    },
    "deit3_base_192": {
        **DEIT3_PRETRAIN,
        **VIT_B,
        "model.name": "deit3_base_patch16_224",
        "model.img_size": 192,
        "optim.lr": 3e-3,
        "model.drop_path_rate": 0.2,
    },
    "deit3_large_192": {
        **DEIT3_PRETRAIN,
        **VIT_L,
        "model.name": "deit3_large_patch16_224",
        "model.img_size": 192,
        "optim.lr": 3e-3,
        "model.drop_path_rate": 0.45,
    },
    "deit3_base_224_finetune": {
        **DEIT3_FINETUNE_224,
        **VIT_B,
        "model.name": "deit3_base_patch16_224",
        "model.drop_path_rate": 0.2,
    },
    "deit3_large_224_finetune": {
        **DEIT3_FINETUNE_224,
        **VIT_L,
        "model.name": "deit3_large_patch16_224",
        "model.drop_path_rate": 0.45,
    },
}
# The same recipes with a teacher on top (not in the paper): DeiT III's ViT with DeiT's distillation token.
DEIT3_DISTILLED = {
    f"{size}_distilled{stage}": {
        **DEIT3[f"{size}{stage}"],
        "model.name": f"deit_{'small' if size == 'deit3_small' else 'base'}_distilled_patch16_224",
        "model.kwargs": {"init_values": 1e-6},  # LayerScale
        "loss.distillation_type": "hard",
        "loss.alpha": 0.5,
        "teacher.name": "regnety_160.deit_in1k",
    }
    for size, stage in [
        ("deit3_small", ""),
        ("deit3_base", "_192"),
        ("deit3_base", "_224_finetune"),
        ("deit3_large", "_192"),
        ("deit3_large", "_224_finetune"),
    ]
}
PAPER |= DEIT3 | DEIT3_DISTILLED
# Function matching (Beyer et al. 2022): big_vision's configs/proj/distill/bit_i1k.py, the paper's ImageNet config.
PAPER["function_matching"] = {
    "model.name": "resnetv2_50x1_bit",  # student: BiT-R50x1
    "teacher.name": "resnetv2_152x2_bit.goog_teacher_in21k_ft_in1k",  # BiT-M R152x2 ic224
    "loss.distillation_type": "soft",  # distance 'kl'
    "loss.alpha": 1.0,  # no label term
    "loss.tau": 1.0,  # distance_kw t=1.0
    "augment.mixup": 1.0,  # mixup p=1.0: the Beta concentration
    "augment.cutmix": 0.0,
    "augment.mixup_prob": 1.0,
    "augment.auto_augment": None,  # decode_jpeg_and_inception_crop(224)|flip_lr only
    "augment.reprob": 0.0,
    "data.batch_size": 4096,
    "optim.lr": 0.03,
    "optim.lr_batch_ref": 4096,
    "optim.weight_decay": 3e-4,
    "optim.warmup_epochs": 16,  # warmup_steps=5000 at 306 steps an epoch
    "trainer.max_epochs": 1200,
    "trainer.gradient_clip_val": 1.0,  # grad_clip_norm
    "ema.decay": None,
}

# The DeiT recipe with ViTKD's mimicking on top (Yang et al. 2022, arXiv 2209.02432: shallow blocks, weight 3e-5 on
# the summed squared error), here from RegNetY-16GF's stage 2: not in either paper.
FEATURE_TERM = {
    "loss.feature_weight": 3e-5,
    "loss.feature_target": "tokens",
    "loss.feature_block": 1,
    "loss.feature_teacher_layer": 2,
}
FEATURE_PRESETS = {f"deit_{size}_feature_distilled": size for size in ("tiny", "small")}
for preset, size in FEATURE_PRESETS.items():
    PAPER[preset] = {**PAPER[f"deit_{size}_distilled"], **FEATURE_TERM}


@pytest.mark.parametrize("preset", list(PAPER))
def test_preset_carries_the_published_values(preset, tmp_path):
    cfg = compose_config([f"experiment={preset}"], tmp_path, tmp_path)
    for key, value in PAPER[preset].items():
        assert OmegaConf.select(cfg, key) == value, key


def test_three_augment_is_deit_iii_recipe(tmp_path):
    rrc = compose_config(["augment=three_augment"], tmp_path, tmp_path).augment
    src = compose_config(["augment=three_augment_src"], tmp_path, tmp_path).augment
    assert (rrc.crop, src.crop) == ("random_resized", "simple_random")
    for augment in (rrc, src):  # DeiT III, section 3.2: no RandAugment, no erasing, colour jitter 0.3
        assert (augment.auto_augment, augment.reprob, augment.color_jitter) == ("3a", 0.0, 0.3)


SHRINK = [
    "model.img_size=16",
    "model.patch_size=4",
    "model.depth=2",
    "model.embed_dim=32",
    "model.num_heads=2",
    "data.batch_size=16",
    "data.num_workers=0",
    "data.pin_memory=false",
    "trainer.max_epochs=1",
    "trainer=cpu",  # the presets choose trainer=gpu
    "+trainer.limit_train_batches=1",
    "+trainer.enable_model_summary=false",
    "callbacks.progress_bar=null",
]
# A distilling preset's teacher at CPU size (a preset without distillation keeps its teacher=none: a teacher its
# loss does not use is refused)
TINY_TEACHER_OVERRIDES = ["teacher=timm", "teacher.name=resnet10t", "teacher.pretrained=false"]


def distills(preset: str, path) -> bool:
    loss = compose_config([f"experiment={preset}"], path, path).loss
    return loss.distillation_type != "none" or loss.get("feature_weight", 0) > 0


def official_checkpoint(preset: str, path):
    """A tiny stand-in for the checkpoint the preset starts from, as the official {"model": ...} file: the preset's
    own architecture (plain or distilled, DeiT or DeiT III) with ImageNet's 1000-class head, at a lower resolution
    (3x3 patches, resampled to the run's 4x4 as in 224 -> 384 or 192 -> 224 fine-tuning)."""
    model = compose_config([f"experiment={preset}"], path.parent, path.parent).model
    student = timm.create_model(
        model.name, img_size=12, patch_size=4, depth=2, embed_dim=32, num_heads=2, num_classes=1000, **model.kwargs
    )
    torch.save({"model": student.state_dict()}, path)
    return path


def shrink(preset: str, path) -> list[str]:
    """The preset at CPU size, starting from a tiny official-style checkpoint (a ViT), or a tiny convnet; a
    distilling preset's teacher a tiny convnet."""
    model = compose_config([f"experiment={preset}"], path, path).model
    teacher = TINY_TEACHER_OVERRIDES if distills(preset, path) else []
    if model.patch_size is None:
        vit_sizes = ("model.patch_size", "model.depth", "model.embed_dim", "model.num_heads")
        convnet = ["model.name=resnet10t", "model.pretrained=false"]
        convnet += ["model.trainable=[fc.*]"] if model.trainable else []  # resnet10t's classifier
        return [*convnet, *[o for o in SHRINK if not o.startswith(vit_sizes)], *teacher]
    # random weights, at chance on the data
    return [
        *SHRINK,
        *teacher,
        f"model.init={official_checkpoint(preset, path / 'student.pth')}",
        "model.init_unchecked_order=true",
    ]


# The feature presets' step is the distilled presets' plus the feature term, which the slow end-to-end runs of
# test_feature_distill.py cover: slow here too (about 10 s each).
@pytest.mark.parametrize(
    "preset", [pytest.param(p, marks=pytest.mark.slow) if p in FEATURE_PRESETS else p for p in PAPER]
)
def test_preset_runs_one_tiny_step(preset, tmp_path, demo_data, random_teacher_checkpoint):
    overrides = [f"experiment={preset}", *shrink(preset, tmp_path)]
    if distills(preset, tmp_path):
        overrides += [f"teacher.checkpoint={random_teacher_checkpoint}", "teacher.unchecked_order=true"]
    overrides += (
        [f"data.root={demo_data}"] if preset != "deit_transfer" else ["data=imagefolder", f"data.root={demo_data}"]
    )
    cfg = compose_config(overrides, tmp_path / "run", tmp_path)
    train(cfg)
    assert_metrics_reproduce(tmp_path / "run", demo_data)


def test_function_matching_refuses_a_two_head_student(tmp_path, demo_data, random_teacher_checkpoint):
    """alpha 1 trains the distillation head only: a distilled DeiT's class head would stay random."""
    from deit_train.errors import DeitTrainError

    overrides = [
        "experiment=function_matching",
        "model=deit_tiny",
        *SHRINK,
        *TINY_TEACHER_OVERRIDES,
        f"data.root={demo_data}",
        f"teacher.checkpoint={random_teacher_checkpoint}",
        "teacher.unchecked_order=true",
    ]
    assert compose_config(overrides, tmp_path, tmp_path).model.name == "deit_tiny_distilled_patch16_224"
    with pytest.raises(DeitTrainError, match="loss.alpha=1.0 gives the class head"):
        train(compose_config(overrides, tmp_path / "run", tmp_path))
    single_head = compose_config([*overrides, "model=deit_tiny_plain"], tmp_path / "plain", tmp_path)
    train(single_head)
    assert_metrics_reproduce(tmp_path / "plain", demo_data)


def test_fixres_trains_the_classifier_alone_and_re_estimates_batch_norm(tmp_path, demo_data):
    start = save_safetensors(timm.create_model("resnet10t", num_classes=10), tmp_path / "teacher_224.safetensors")
    overrides = [
        "experiment=teacher_fixres_384",
        *shrink("teacher_fixres_384", tmp_path),
        f"data.root={demo_data}",
        f"model.init={tmp_path / 'teacher_224.safetensors'}",
        "trainer.max_epochs=2",
        "model.init_unchecked_order=true",
    ]  # random weights: at chance
    student = train(compose_config(overrides, tmp_path / "run", tmp_path)).module.student
    after = student.state_dict()
    changed = {key for key, tensor in start.items() if not torch.equal(after[key], tensor)}
    assert {"fc.weight", "fc.bias"} <= changed
    assert {key for key in changed if not key.startswith("fc.")} == {
        key for key in start if key.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }
