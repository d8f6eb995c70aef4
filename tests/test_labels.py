"""One label space: class lists compared by name and order by every reader, and on the data where a network has no
names. The teacher and model.init of the red team's cases: weights trained with the classes in numeric order
(0, 1, 2, ..., 11) on data whose folders sort as strings (0, 1, 10, 11, 2, ...)."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from deit_train.data import DeiTDataModule
from deit_train.errors import DeitTrainError
from deit_train.tasks.classify import Classify

from .conftest import save_safetensors

NUMERIC = [str(i) for i in range(12)]  # the order a network trained on labels 0..11 has
AS_STRINGS = sorted(NUMERIC)  # the order the class folders sort in: 0, 1, 10, 11, 2, ...


@pytest.fixture(scope="module")
def numbered_folders(tmp_path_factory) -> Path:
    """An ImageFolder of 12 classes named 0..11, each a colour of its own (with noise), 16 px, 4 images per class
    and split."""
    root = tmp_path_factory.mktemp("numbered")
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, size=(12, 3))
    for split in ("train", "val"):
        for label, name in enumerate(NUMERIC):
            (root / split / name).mkdir(parents=True)
            for i in range(4):
                pixels = np.clip(colours[label] + rng.normal(0, 6, size=(16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def data_overrides(root: Path) -> list[str]:
    return ["data=imagefolder", f"data.root={root}", "data.batch_size=16", "data.num_workers=0", "data.pin_memory=false"]


def fitted_resnet(cfg, order: list[str], tmp_path: Path) -> Path:
    """A resnet10t teacher that knows the colours: its classifier fitted (least squares) to its features of the
    validation images, output i meaning the class named order[i]; saved as a state dict, without names."""
    torch.manual_seed(0)
    network = timm.create_model("resnet10t", num_classes=12).eval()
    datamodule = DeiTDataModule(cfg.data, cfg.augment, img_size=cfg.model.img_size, seed=0)
    batches = datamodule.validation_sample(10_000)
    images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    names = datamodule.class_names
    with torch.no_grad():
        features = network.forward_head(network.forward_features(images), pre_logits=True)
        features = torch.cat([features, torch.ones(len(features), 1)], dim=1)
        outputs = torch.tensor([order.index(names[label]) for label in labels])
        targets = torch.nn.functional.one_hot(outputs, 12).float() * 10
        solution = torch.linalg.lstsq(features.double(), targets.double()).solution.float()
        network.fc.weight.copy_(solution[:-1].T)
        network.fc.bias.copy_(solution[-1])
        assert (network(images).argmax(1) == outputs).all()  # it knows every validation image
    path = tmp_path / f"teacher-{'-'.join(order[:3])}.safetensors"
    save_safetensors(network, path)
    return path


def teacher_config(tiny_config, root, checkpoint, *extra):
    return tiny_config(*data_overrides(root), "loss=hard_distill", "teacher=timm", "teacher.name=resnet10t",
                       f"teacher.checkpoint={checkpoint}", *extra, data=[])  # fmt: skip


def test_a_teacher_without_names_in_another_order_is_refused_with_its_accuracy(tiny_config, numbered_folders,
                                                                               tmp_path, caplog):  # fmt: skip
    base = teacher_config(tiny_config, numbered_folders, "unused")
    numeric = fitted_resnet(base, NUMERIC, tmp_path)
    with pytest.raises(DeitTrainError) as refused:
        Classify().build(teacher_config(tiny_config, numbered_folders, numeric))
    message = str(refused.value)
    # classes 0 and 1 sit at the same index in both orders: 8 of the 48 images right, 100% in numeric order
    assert "top-1 16.7% on 48 validation images" in message and "100.0% if its outputs are read in numeric order" in message
    assert "teacher.unchecked_order=true" in message and "\n" not in message
    # the same weights with their outputs in the folders' order: accepted, and the accuracy logged
    right = fitted_resnet(base, AS_STRINGS, tmp_path)
    with caplog.at_level(logging.INFO, logger="deit_train"):
        Classify().build(teacher_config(tiny_config, numbered_folders, right))
    assert "teacher resnet10t: top-1 100.0% on 48 validation images (chance: 8.3%)" in caplog.text
    # teacher.unchecked_order=true: trained with anyway, with a warning
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="deit_train"):
        Classify().build(teacher_config(tiny_config, numbered_folders, numeric, "teacher.unchecked_order=true"))
    assert "teacher.unchecked_order=true: training with it anyway" in caplog.text


TINY_DEIT = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2, img_size=16)


def fitted_student(cfg, order: list[str]) -> torch.nn.Module:
    """A tiny distilled DeiT whose two heads are fitted (least squares) to its tokens on the validation images,
    output i meaning the class named order[i]."""
    torch.manual_seed(0)
    student = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=12, **TINY_DEIT).eval()
    datamodule = DeiTDataModule(cfg.data, cfg.augment, img_size=cfg.model.img_size, seed=0)
    batches = datamodule.validation_sample(10_000)
    images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    outputs = torch.tensor([order.index(datamodule.class_names[label]) for label in labels])
    targets = torch.nn.functional.one_hot(outputs, 12).double() * 10
    with torch.no_grad():
        tokens = student.forward_features(images)
        for head, token in ((student.head, tokens[:, 0]), (student.head_dist, tokens[:, 1])):
            features = torch.cat([token, torch.ones(len(token), 1)], dim=1).double()
            solution = torch.linalg.lstsq(features, targets).solution.float()
            head.weight.copy_(solution[:-1].T)
            head.bias.copy_(solution[-1])
        assert (student(images).argmax(1) == outputs).all()
    return student


def init_config(tiny_config, root, init, *extra):
    return tiny_config(*data_overrides(root), f"model.init={init}", *extra, data=[])


def test_model_init_with_named_classes_in_another_order_is_refused_by_name(tiny_config, numbered_folders, tmp_path):
    """An export that names its classes in numeric order, on folders sorted as strings: refused, both lists shown;
    in the folders' order: its heads kept."""
    cfg = init_config(tiny_config, numbered_folders, "unused")
    student = fitted_student(cfg, NUMERIC)
    for order, name in ((NUMERIC, "numeric"), (AS_STRINGS, "strings")):
        export = tmp_path / name
        export.mkdir()
        save_safetensors(student, export / "model.safetensors")
        config = {"architecture": "deit_tiny_distilled_patch16_224", "num_classes": 12, "label_names": order}
        (export / "config.json").write_text(json.dumps(config))
    with pytest.raises(DeitTrainError) as refused:
        Classify().build(init_config(tiny_config, numbered_folders, tmp_path / "numeric"))
    message = str(refused.value)
    assert "its heads lists them in numeric order (2 before 10), the data sorted as strings (10 before 2)" in message
    assert "12 classes ['0', '1', '2', '3', '4', ..., '11']" in message  # its list
    assert "12 classes ['0', '1', '10', '11', '2', ..., '9']" in message  # the data's
    assert "2: '2' against '10'" in message and "\n" not in message
    built = Classify().build(init_config(tiny_config, numbered_folders, tmp_path / "strings"))
    torch.testing.assert_close(built.module.student.head.weight, student.head.weight, rtol=0, atol=0)


def test_model_init_without_names_is_checked_on_the_data(tiny_config, numbered_folders, tmp_path, caplog):
    cfg = init_config(tiny_config, numbered_folders, "unused")
    torch.save(fitted_student(cfg, NUMERIC).state_dict(), tmp_path / "numeric.pth")
    with pytest.raises(DeitTrainError, match=r"model.init=.*numeric.pth \(weights without class names\) cannot be "
                                             r"checked by name.* 16.7% on 48 validation images .*100.0% if its outputs "
                                             r"are read in numeric order.*model.init_unchecked_order=true"):  # fmt: skip
        Classify().build(init_config(tiny_config, numbered_folders, tmp_path / "numeric.pth"))
    torch.save(fitted_student(cfg, AS_STRINGS).state_dict(), tmp_path / "strings.pth")
    with caplog.at_level(logging.INFO, logger="deit_train"):
        Classify().build(init_config(tiny_config, numbered_folders, tmp_path / "strings.pth"))
    assert "model.init: top-1 100.0% on 48 validation images (chance: 8.3%)" in caplog.text
