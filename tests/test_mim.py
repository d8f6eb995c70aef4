"""task=mim: SimMIM pre-training of the DeiT encoder, checked against transformers' DeiTForMaskedImageModeling."""

import math
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf
from PIL import Image
from transformers import DeiTConfig, DeiTForMaskedImageModeling

from deit_train.data.sources.imagefolder import HOLDOUT_EVERY, ImageFolderSource
from deit_train.errors import DeitTrainError
from deit_train.mim.loss import masked_reconstruction_loss
from deit_train.mim.masking import MaskGenerator
from deit_train.mim.model import MaskedImageModel
from deit_train.models.student import build_student
from deit_train.models.transformers_format import transformers_to_timm
from deit_train.schema import ModelConfig
from deit_train.train import train

from .conftest import assert_metrics_reproduce, hard_distill_from

TINY = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2)


def tiny_encoder(img_size=16):
    return timm.create_model("deit_tiny_distilled_patch16_224", num_classes=0, img_size=img_size, **TINY)


def test_reconstruction_and_loss_equal_transformers_deit_for_masked_image_modeling(tmp_path):
    config = DeiTConfig(
        image_size=16,
        patch_size=4,
        encoder_stride=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        layer_norm_eps=1e-6,
    )
    torch.manual_seed(0)
    theirs = DeiTForMaskedImageModeling(config).eval()
    torch.nn.init.normal_(theirs.deit.embeddings.mask_token)  # zero at init: make it count
    ours = MaskedImageModel(tiny_encoder()).eval()
    ours.encoder.load_state_dict(transformers_to_timm(theirs.state_dict()), strict=True)
    ours.mask_token.data.copy_(theirs.deit.embeddings.mask_token.data)
    ours.decoder.load_state_dict(theirs.decoder.state_dict())
    images = torch.randn(3, 3, 16, 16)
    masks = torch.stack([MaskGenerator(16, 8, 4, 0.6)() for _ in range(3)])
    with torch.no_grad():
        expected = theirs(images, bool_masked_pos=masks)
        reconstruction = ours(images, masks)
        loss = masked_reconstruction_loss(images, reconstruction, masks, patch_size=4)
    assert (reconstruction - expected.reconstruction).abs().max() < 1e-4
    assert abs(loss - expected.loss) < 1e-4
    # Their checkpoint also starts a classifier: the encoder is kept, mask token and decoder dropped.
    theirs.save_pretrained(tmp_path / "hf_mim")
    student = build_student(
        OmegaConf.merge(
            OmegaConf.structured(ModelConfig),
            {"name": "deit_tiny_distilled_patch16_224", "img_size": 16, "init": str(tmp_path / "hf_mim"), **TINY},
        ),
        num_classes=5,
    )
    torch.testing.assert_close(student.blocks[1].mlp.fc2.weight, ours.encoder.blocks[1].mlp.fc2.weight)


def test_loss_counts_masked_pixels_only():
    images = torch.zeros(1, 3, 8, 8)
    reconstruction = torch.zeros(1, 3, 8, 8)
    reconstruction[..., :4, :4] = 2.0  # wrong only in the top-left patch
    masked_top_left = torch.tensor([[True, False, False, False]])
    masked_elsewhere = torch.tensor([[False, True, True, True]])
    # 16 masked pixels x 3 channels, each off by 2: mean 2 (up to the 1e-5 in the denominator)
    assert masked_reconstruction_loss(images, reconstruction, masked_top_left, 4) == pytest.approx(2.0, rel=1e-5)
    assert masked_reconstruction_loss(images, reconstruction, masked_elsewhere, 4) == 0.0


@pytest.mark.parametrize(
    "img_size,mask_patch,model_patch,ratio", [(224, 32, 16, 0.6), (192, 32, 8, 0.6), (16, 8, 4, 0.5)]
)
def test_mask_generator_masks_the_exact_ratio_in_blocks(img_size, mask_patch, model_patch, ratio):
    masks = MaskGenerator(img_size, mask_patch, model_patch, ratio)
    blocks = (img_size // mask_patch) ** 2
    scale = mask_patch // model_patch
    side = img_size // model_patch
    draws = [masks() for _ in range(20)]
    for mask in draws:
        assert mask.shape == (side * side,) and mask.dtype == torch.bool
        assert mask.sum() == math.ceil(blocks * ratio) * scale**2  # SimMIM: ceil(count x ratio) blocks
        grid = mask.view(side, side)
        per_block = grid.view(side // scale, scale, side // scale, scale).permute(0, 2, 1, 3).flatten(2)
        assert (per_block.all(-1) | ~per_block.any(-1)).all()  # every block wholly masked or wholly visible
    assert len({tuple(mask.tolist()) for mask in draws}) > 1
    generator = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    assert torch.equal(masks(generator()), masks(generator()))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["task.mask_patch_size=24"], "task.mask_patch_size=24: expected a divisor of model.img_size=224"),
        (["model.img_size=96", "task.mask_patch_size=8"], "task.mask_patch_size=8: expected a multiple of model.pat"),
        (["task.mask_ratio=1.0"], "task.mask_ratio=1.0: expected a share in (0, 1)"),
        (["task.pictures=-1"], "task.pictures=-1: expected a number of pictures >= 0"),
    ],
)
def test_mask_sizes_that_do_not_tile_are_refused(overrides, message, tmp_path, cache_dir):
    from deit_train.train import check_config

    from .conftest import compose_config

    cfg = compose_config(["task=mim", "data=demo", "model=deit_tiny", *overrides], tmp_path, cache_dir)
    with pytest.raises(DeitTrainError) as refused:
        check_config(cfg)
    assert str(refused.value).startswith(message)


def test_unlabeled_images_from_a_flat_folder_hold_out_every_twentieth(tmp_path):
    for index in range(45):
        Image.new("RGB", (8, 8), (index, 0, 0)).save(tmp_path / f"{index:02d}.png")
    cfg = ImageFolderSource(**{"root": str(tmp_path)})
    train_set = cfg.images_only("train", transform=lambda image: image.getpixel((0, 0))[0])
    val_set = cfg.images_only("val", transform=lambda image: image.getpixel((0, 0))[0])
    assert sorted(val_set[i] for i in range(len(val_set))) == list(range(0, 45, HOLDOUT_EVERY))
    assert sorted(train_set[i] for i in range(len(train_set))) == [i for i in range(45) if i % HOLDOUT_EVERY]


def test_pretrain_then_fine_tune_with_hard_distillation(tiny_config, random_teacher_checkpoint, caplog, demo_data):
    pretrain = tiny_config(
        "task=mim",
        "task.mask_patch_size=8",
        "task.pictures=3",
        "trainer.max_epochs=2",
        "logger=tensorboard",
        run="mim",
    )
    metrics = train(pretrain).metrics
    assert math.isfinite(metrics["val/loss"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = Path(pretrain.paths.output_dir).rglob("events.out.tfevents.*")
    logged = EventAccumulator(str(events)).Reload()
    assert "val/reconstruction" in logged.Tags()["images"] and "val/loss" in logged.Tags()["scalars"]
    pictures = sorted(Path(pretrain.paths.output_dir).glob("reconstructions/*.png"))
    assert [p.name for p in pictures] == ["epoch_000.png", "epoch_001.png"]
    # 3 rows (input, masked, reconstruction) x 3 images of 16 px with 2 px padding
    assert Image.open(pictures[-1]).size == (3 * 18 + 2, 3 * 18 + 2)
    checkpoint = f"{pretrain.paths.output_dir}/checkpoints/last.ckpt"
    stored = torch.load(checkpoint, weights_only=True)["state_dict"]

    finetune = tiny_config(
        f"model.init={checkpoint}",
        *hard_distill_from(random_teacher_checkpoint),
        run="finetune",
    )
    student = build_student(finetune.model, num_classes=10)
    assert "no classification heads: both heads start fresh" in caplog.text
    for key, tensor in student.state_dict().items():
        if not key.startswith("head"):
            torch.testing.assert_close(tensor, stored[f"model.encoder.{key}"], rtol=0, atol=0)
    assert "val/agreement" in train(finetune).metrics
    assert_metrics_reproduce(Path(finetune.paths.output_dir), demo_data)


def test_mim_refuses_a_teacher(tiny_config, random_teacher_checkpoint):
    cfg = tiny_config(
        "task=mim",
        "task.mask_patch_size=8",
        *hard_distill_from(random_teacher_checkpoint),
    )
    with pytest.raises(DeitTrainError, match="task=mim pre-trains without labels or teacher"):
        train(cfg)


def test_pretraining_continues_from_its_checkpoint_with_mask_token_and_decoder(tiny_config):
    first = tiny_config("task=mim", "task.mask_patch_size=8", "task.pictures=0", run="first")
    train(first)  # task.pictures=0: no reconstructions drawn, and no error
    assert not Path(first.paths.output_dir, "reconstructions").exists()
    checkpoint = f"{first.paths.output_dir}/checkpoints/last.ckpt"
    stored = torch.load(checkpoint, weights_only=True)["state_dict"]
    again = tiny_config(
        "task=mim",
        "task.mask_patch_size=8",
        "task.pictures=0",
        f"model.init={checkpoint}",
        "optim.lr=0",
        "optim.warmup_lr=0",
        "optim.min_lr=0",
        "optim.weight_decay=0",
        run="again",
    )
    model = train(again).module.model  # lr 0: nothing moves, so everything equals what it started from
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, stored[f"model.{key}"], rtol=0, atol=0, msg=key)


def test_every_deit_name_is_a_vit_as_the_mim_rule_reads_it():
    """MIMTask.check takes a deit* name for a ViT without importing timm (the refusals before it answer at once):
    every name timm registers under deit* is a network of its deit module (ViTs with a patch embedding)."""
    import timm

    assert set(timm.list_models("deit*")) <= set(timm.list_models(module="deit"))


@pytest.mark.parametrize(
    ("model", "patch"),
    [
        ({"name": "deit_tiny_patch16_224", "patch_size": 4}, 4),
        ({"name": "vit_tiny_patch16_224", "kwargs": {"patch_size": 4}}, 4),  # timm.create_model's own argument
        ({"name": "vit_small_patch8_224"}, 8),
        ({"name": "vit_tiny_patch16_224"}, 16),
    ],
)
def test_the_mask_blocks_are_cut_on_the_patch_the_config_builds(model, patch):
    """task=mim's rules and masks read the patch the network is built with: model.patch_size, else model.kwargs',
    else its timm name's (16 was assumed for any timm name: a 4 px patch from kwargs failed mid-run)."""
    from deit_train.mim.task import patch_size
    from deit_train.schema import ModelConfig

    config = OmegaConf.merge(OmegaConf.structured(ModelConfig), model)
    assert patch_size(config) == patch
    network = timm.create_model(config.name, pretrained=False, num_classes=0, **dict(config.kwargs))
    if config.patch_size is None:  # the timm network itself agrees
        assert network.patch_embed.patch_size[0] == patch
