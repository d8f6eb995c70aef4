"""model.init: fine-tuning from trained weights on new classes and a new resolution."""

import json
import logging
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from deit_train.errors import DeitTrainError
from deit_train.models.init import settle_heads
from deit_train.models.student import build_student
from deit_train.schema import ModelConfig
from deit_train.train import train

from .conftest import assert_metrics_reproduce, save_safetensors

TINY_VIT = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.0)


def student_config(img_size=16, init=None, **changes):
    fields = {
        "name": "deit_tiny_distilled_patch16_224",
        "pretrained": False,
        "img_size": img_size,
        "init": init,
    }
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), {**fields, **TINY_VIT, **changes})


def save_source(path, num_classes=10, img_size=16, wrapper=None, **changes):
    source = timm.create_model(
        "deit_tiny_distilled_patch16_224",
        num_classes=num_classes,
        img_size=img_size,
        **{**TINY_VIT, **changes},
    )
    if path.suffix == ".safetensors":
        return save_safetensors(source, path)
    state = source.state_dict()
    torch.save({wrapper: state} if wrapper else state, path)
    return state


@pytest.mark.parametrize("filename,wrapper", [("s.pth", "model"), ("s.pth", None), ("s.safetensors", None)])
def test_same_shape_init_copies_every_tensor(tmp_path, filename, wrapper):
    source = save_source(tmp_path / filename, wrapper=wrapper)
    student = build_student(student_config(init=str(tmp_path / filename)), num_classes=10)
    for key, tensor in student.state_dict().items():
        torch.testing.assert_close(tensor, source[key], rtol=0, atol=0)


def test_new_class_count_resets_both_heads_and_keeps_the_rest(tmp_path, caplog):
    source = save_source(tmp_path / "s.pth", num_classes=10)
    student = build_student(student_config(init=str(tmp_path / "s.pth")), num_classes=3)
    state = student.state_dict()
    assert state["head.weight"].shape == state["head_dist.weight"].shape == (3, 32)
    for key in (k for k in state if not k.startswith("head")):
        torch.testing.assert_close(state[key], source[key], rtol=0, atol=0)
    assert "both heads start fresh" in caplog.text


def test_new_resolution_resamples_position_embeddings_keeping_both_tokens(tmp_path, caplog):
    source = save_source(tmp_path / "s.pth", img_size=16)  # 4x4 patches
    student = build_student(student_config(img_size=24, init=str(tmp_path / "s.pth")), num_classes=10)  # 6x6
    pos_embed = student.pos_embed.detach()
    torch.testing.assert_close(pos_embed[:, :2], source["pos_embed"][:, :2], rtol=0, atol=0)  # bit-identical
    # The official DeiT fine-tuning code's interpolation (main.py): bicubic, align_corners=False.
    grid = source["pos_embed"][:, 2:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    expected = (
        F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 36, 32)
    )
    torch.testing.assert_close(pos_embed[:, 2:], expected, rtol=1e-5, atol=1e-6)
    assert "resampled from 4x4 to 6x6" in caplog.text
    assert student(torch.randn(1, 3, 24, 24))[0].shape == (1, 10)


def test_another_architecture_names_the_tensors(tmp_path):
    save_source(tmp_path / "s.pth", depth=1)
    with pytest.raises(DeitTrainError, match=r"missing tensors \(e.g. \['blocks.1"):
        build_student(student_config(init=str(tmp_path / "s.pth")), num_classes=10)
    save_source(tmp_path / "w.pth", embed_dim=48, num_heads=2)
    with pytest.raises(DeitTrainError, match="cls_token|pos_embed|patch_embed"):
        build_student(student_config(init=str(tmp_path / "w.pth")), num_classes=10)


def test_diverged_weights_are_refused(tmp_path):
    state = save_source(tmp_path / "s.pth")
    state["blocks.1.attn.qkv.weight"][0, 0] = float("inf")
    torch.save(state, tmp_path / "s.pth")
    with pytest.raises(DeitTrainError, match=r"non-finite weights \(1 tensors, e.g. blocks.1.attn.qkv.weight\)"):
        build_student(student_config(init=str(tmp_path / "s.pth")), num_classes=10)


def test_fine_tune_a_trained_checkpoint_at_a_higher_resolution_on_new_classes(tiny_config, tmp_path, demo_data):
    first = tiny_config(run="base")
    train(first)
    # The same images as a 4-class problem at 24x24 px (new resolution, new heads), from the 16 px checkpoint.
    data = tmp_path / "four"
    for split in ("train", "val"):
        for name in sorted(p.name for p in (demo_data / split).iterdir())[:4]:
            (data / split / name).mkdir(parents=True)
            for image in (demo_data / split / name).iterdir():
                (data / split / name / image.name).symlink_to(image)
    cfg = tiny_config(
        "model.img_size=24",
        f"model.init={first.paths.output_dir}/checkpoints/last.ckpt",
        "data=imagefolder",
        f"data.root={data}",
        "data.batch_size=8",
        "data.num_workers=0",
        "data.pin_memory=false",
        run="finetune",
        data=[],
    )
    train(cfg)
    assert_metrics_reproduce(Path(cfg.paths.output_dir), data)
    checkpoint = torch.load(f"{cfg.paths.output_dir}/checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["state_dict"]["student.pos_embed"].shape == (1, 36 + 2, 32)
    assert checkpoint["class_names"] == sorted(p.name for p in (data / "train").iterdir())


# ---- the heads on the data's classes: by name, mapped, or fresh -----------------------------------------------------


def save_export(directory: Path, names: list[str]) -> dict:
    """A deit-export-style directory of a tiny DeiT trained on classes `names` (its config names them)."""
    directory.mkdir()
    state = save_source(directory / "model.safetensors", num_classes=len(names))
    config = {"architecture": "deit_tiny_distilled_patch16_224", "num_classes": len(names), "label_names": names}
    (directory / "config.json").write_text(json.dumps(config))
    return state


def settled(init: Path, class_names: list[str], class_map: dict | None = None) -> tuple[dict, dict]:
    """The student's state after model.init and settle_heads on `class_names`, and that of the same student without
    model.init (its fresh heads: same seed)."""
    torch.manual_seed(0)
    fresh = build_student(student_config(), num_classes=len(class_names)).state_dict()
    torch.manual_seed(0)
    student = build_student(student_config(init=str(init)), num_classes=len(class_names))
    settle_heads(student, class_names, class_map)
    return student.state_dict(), fresh


def test_new_classes_under_other_names_start_both_heads_fresh_keeping_the_backbone(tmp_path, caplog):
    """Fine-tuning onto new classes, as many as the weights': their heads would predict the wrong names."""
    source = save_export(tmp_path / "export", ["ant", "bee", "cat"])
    with caplog.at_level(logging.WARNING):
        state, fresh = settled(tmp_path / "export", ["dog", "eel", "fox"])
    for key in state:
        expected = fresh[key] if key.startswith("head") else source[key]
        torch.testing.assert_close(state[key], expected, rtol=0, atol=0)
    lines = [r.getMessage() for r in caplog.records if "both heads start fresh" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "its classes are not the data's (other names at 3 of 3 positions" in lines[0]
    assert "model.init_class_map={its_name: data_name, ...} keeps its heads" in lines[0]


def test_the_data_s_classes_take_the_rows_of_their_names_mapped_or_a_subset(tmp_path):
    source = save_export(tmp_path / "export", ["ant", "bee", "cat", "dog", "eel"])
    cases = [
        (["dog", "bee"], None, [3, 1]),  # a subset, in the data's order
        (["x", "y", "z"], {"cat": "x", "ant": "y", "eel": "z"}, [2, 0, 4]),  # other names, mapped
        (["bee", "y"], {"ant": "y"}, [1, 0]),  # a map for the names that differ; the rest by name
        (["the eel", "bee"], [["eel", "the eel"]], [4, 1]),  # pairs: names Hydra cannot write as keys
    ]
    for class_names, class_map, rows in cases:
        state, _ = settled(tmp_path / "export", class_names, class_map)
        for key in ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias"):
            torch.testing.assert_close(state[key], source[key][rows], rtol=0, atol=0)


@pytest.mark.parametrize(
    "class_map,message",
    [
        ({"ant": "x"}, r"the data's classes \['y'\] have no row in model.init=.*export's heads"),
        ({"ant": "x", "bat": "y"}, r"\['bat'\] are not classes of model.init=.*\(its classes: \['ant', 'bee'\]"),
        ({"ant": "x", "bee": "w"}, r"\['w'\] are not classes of the data"),
        (3, r"model.init_class_map=3: give \{name_in_weights: name_in_data, ...\}, or \[\[name in weights"),
    ],
)
def test_a_class_map_that_does_not_fit_is_refused_in_one_line(tmp_path, class_map, message):
    save_export(tmp_path / "export", ["ant", "bee"])
    with pytest.raises(DeitTrainError, match=message) as refused:
        settled(tmp_path / "export", ["x", "y"], class_map)
    assert "\n" not in str(refused.value)


def test_a_class_map_for_weights_without_names_is_refused(tmp_path):
    save_source(tmp_path / "s.pth", num_classes=2)
    with pytest.raises(DeitTrainError, match=r"model.init_class_map: model.init=.*s.pth names no classes"):
        settled(tmp_path / "s.pth", ["x", "y"], {"a": "x"})
