"""One label space: class lists compared by name and order by every reader, and on the data where a network has no
names. The teacher and model.init of the red team's cases: weights trained with the classes in numeric order
(0, 1, 2, ..., 11) on data whose folders sort as strings (0, 1, 10, 11, 2, ...)."""

import io
import json
import logging
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from PIL import Image

from deit_train.data import DeiTDataModule
from deit_train.data.pixels import model_input
from deit_train.data.sources import build_source
from deit_train.data.sources.hf import HFSource
from deit_train.data.sources.imagefolder import ImageFolderSource
from deit_train.data.sources.locate import locate
from deit_train.data.sources.webdataset import ShardSource
from deit_train.errors import DeitTrainError
from deit_train.labels import natural_key
from deit_train.models.init import initialize_from, settle_heads
from deit_train.schema import TeacherConfig
from deit_train.tasks.classify import Classify
from deit_train.teacher import build_teacher_network

from .conftest import save_safetensors

datasets = pytest.importorskip("datasets")

NUMERIC = [str(i) for i in range(12)]  # the order a network trained on labels 0..11 has
AS_STRINGS = sorted(NUMERIC)  # the order the class folders sort in: 0, 1, 10, 11, 2, ...


def build_classify(cfg):
    """task=classify's module, built on the config's own data source, as a run builds it (run.Run.build)."""
    task = Classify()
    return task.build(cfg, task.datamodule(cfg, build_source(cfg.data)))


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
    return [
        "data=imagefolder",
        f"data.root={root}",
        "data.batch_size=16",
        "data.num_workers=0",
        "data.pin_memory=false",
    ]


def fitted_resnet(cfg, order: list[str], tmp_path: Path) -> Path:
    """A resnet10t teacher that knows the colours: its classifier fitted (least squares) to its features of the
    validation images, output i meaning the class named order[i]; saved as a state dict, without names."""
    torch.manual_seed(0)
    network = timm.create_model("resnet10t", num_classes=12).eval()
    datamodule = DeiTDataModule(cfg.data, cfg.augment, img_size=cfg.model.img_size, seed=0)
    batches = datamodule.validation_sample(10_000)
    images, labels = model_input(torch.cat([b[0] for b in batches])), torch.cat([b[1] for b in batches])
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
    return tiny_config(
        *data_overrides(root),
        "loss=hard_distill",
        "teacher=timm",
        "teacher.name=resnet10t",
        f"teacher.checkpoint={checkpoint}",
        *extra,
        data=[],
    )


def test_a_teacher_without_names_in_another_order_is_refused_with_its_accuracy(
    tiny_config, numbered_folders, tmp_path, caplog
):
    base = teacher_config(tiny_config, numbered_folders, "unused")
    numeric = fitted_resnet(base, NUMERIC, tmp_path)
    with pytest.raises(DeitTrainError) as refused:
        build_classify(teacher_config(tiny_config, numbered_folders, numeric))
    message = str(refused.value)
    # classes 0 and 1 sit at the same index in both orders: 8 of the 48 images right, 100% in numeric order, which
    # moves the other 10 classes: what it calls '10' (the data's third class) is class '2', ...
    assert (
        "top-1 16.7% on 48 validation images" in message
        and "100.0% with its outputs read in another order (the data's names in numeric order (2 before 10)), "
        "which moves 10 of 12 classes: '10' as '2' (4 images against 0)"
        in message
    )
    assert "teacher.unchecked_order=true" in message and "\n" not in message
    # the same weights with their outputs in the folders' order: accepted, and the accuracy logged
    right = fitted_resnet(base, AS_STRINGS, tmp_path)
    with caplog.at_level(logging.INFO, logger="deit_train"):
        build_classify(teacher_config(tiny_config, numbered_folders, right))
    assert "teacher resnet10t: top-1 100.0% on 48 validation images (chance: 8.3%)" in caplog.text
    # teacher.unchecked_order=true: trained with anyway, with a warning
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="deit_train"):
        build_classify(teacher_config(tiny_config, numbered_folders, numeric, "teacher.unchecked_order=true"))
    assert "teacher.unchecked_order=true: training with it anyway" in caplog.text


def test_task_teacher_cache_refuses_the_misordered_teacher_its_students_would(tiny_config, numbered_folders, tmp_path):
    """task=teacher_cache fills the cache for the students of a sweep: a teacher they would refuse is refused
    before it fills a cache nobody can use (it filled it, without its accuracy in the log)."""
    from deit_train.tasks.teacher_cache import FillTeacherCache

    base = teacher_config(tiny_config, numbered_folders, "unused")
    numeric = fitted_resnet(base, NUMERIC, tmp_path)
    cfg = teacher_config(
        tiny_config, numbered_folders, numeric, "task=teacher_cache", f"teacher.cache={tmp_path / 'cache'}"
    )
    task = FillTeacherCache()
    with pytest.raises(DeitTrainError, match="top-1 16.7% on 48 validation images"):
        task.build(cfg, task.datamodule(cfg, build_source(cfg.data)))


TINY_DEIT = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2, img_size=16)


def fitted_student(cfg, order: list[str]) -> torch.nn.Module:
    """A tiny distilled DeiT whose two heads are fitted (least squares) to its tokens on the validation images,
    output i meaning the class named order[i]."""
    torch.manual_seed(0)
    student = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=12, **TINY_DEIT).eval()
    datamodule = DeiTDataModule(cfg.data, cfg.augment, img_size=cfg.model.img_size, seed=0)
    batches = datamodule.validation_sample(10_000)
    images, labels = model_input(torch.cat([b[0] for b in batches])), torch.cat([b[1] for b in batches])
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


def validation_top1(student: torch.nn.Module, cfg) -> float:
    datamodule = DeiTDataModule(cfg.data, cfg.augment, img_size=cfg.model.img_size, seed=0)
    batches = datamodule.validation_sample(10_000)
    images, labels = model_input(torch.cat([b[0] for b in batches])), torch.cat([b[1] for b in batches])
    with torch.no_grad():
        return float((student.eval()(images).argmax(1) == labels).float().mean())


def test_model_init_with_named_classes_in_another_order_takes_its_rows_by_name(
    tiny_config, numbered_folders, tmp_path, caplog
):
    """An export that names its classes in numeric order, on folders sorted as strings: each class takes the row of
    its name, so the student is as right on the data as the export was on its own order; in the folders' order:
    its heads kept as they are."""
    cfg = init_config(tiny_config, numbered_folders, "unused")
    student = fitted_student(cfg, NUMERIC)
    for order, name in ((NUMERIC, "numeric"), (AS_STRINGS, "strings")):
        export = tmp_path / name
        export.mkdir()
        save_safetensors(student, export / "model.safetensors")
        config = {"architecture": "deit_tiny_distilled_patch16_224", "num_classes": 12, "label_names": order}
        (export / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.INFO, logger="deit_train"):
        built = build_classify(init_config(tiny_config, numbered_folders, tmp_path / "numeric"))
    assert "its heads' rows taken by class name (12 of its 12 classes, in the data's order)" in caplog.text
    rows = [NUMERIC.index(name) for name in AS_STRINGS]
    torch.testing.assert_close(built.module.student.head.weight, student.head.weight[rows], rtol=0, atol=0)
    assert validation_top1(built.module.student, cfg) == 1.0
    built = build_classify(init_config(tiny_config, numbered_folders, tmp_path / "strings"))
    torch.testing.assert_close(built.module.student.head.weight, student.head.weight, rtol=0, atol=0)


def test_model_init_without_names_in_another_order_starts_the_heads_fresh(
    tiny_config, numbered_folders, tmp_path, caplog
):
    """Nameless weights whose outputs the data shows in another order: both heads start fresh (one line naming the
    moves), the backbone is kept; model.init_unchecked_order=true keeps them; in the data's order: kept."""
    cfg = init_config(tiny_config, numbered_folders, "unused")
    numeric = fitted_student(cfg, NUMERIC)
    torch.save(numeric.state_dict(), tmp_path / "numeric.pth")
    with caplog.at_level(logging.INFO, logger="deit_train"):
        built = build_classify(init_config(tiny_config, numbered_folders, tmp_path / "numeric.pth"))
    fresh = [r.getMessage() for r in caplog.records if "both heads start fresh" in r.getMessage()]
    assert len(fresh) == 1 and "\n" not in fresh[0]
    assert (
        "numeric.pth (weights without class names) cannot be checked by name, and on the data its outputs fit "
        "another class order than the data's: top-1 16.7% on 48 validation images"
        in fresh[0]
        and "model.init_unchecked_order=true keeps them" in fresh[0]
    )
    student = built.module.student
    assert not torch.equal(student.head.weight, numeric.head.weight)
    torch.testing.assert_close(student.blocks[0].attn.qkv.weight, numeric.blocks[0].attn.qkv.weight, rtol=0, atol=0)
    kept = build_classify(
        init_config(tiny_config, numbered_folders, tmp_path / "numeric.pth", "model.init_unchecked_order=true")
    )
    torch.testing.assert_close(kept.module.student.head.weight, numeric.head.weight, rtol=0, atol=0)
    torch.save(fitted_student(cfg, AS_STRINGS).state_dict(), tmp_path / "strings.pth")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="deit_train"):
        built = build_classify(init_config(tiny_config, numbered_folders, tmp_path / "strings.pth"))
    assert "model.init: top-1 100.0% on 48 validation images (chance: 8.3%)" in caplog.text
    assert validation_top1(built.module.student, cfg) == 1.0


# ---- every reader of a class list: the same names in the same order, or one line naming the difference -----------

NAME_POOL = [str(i) for i in range(13)] + ["café", "naïve", "Ångström", "cat", "dog", "Zebra", "ant"]


def nfd(name: str) -> str:
    return unicodedata.normalize("NFD", name)


@st.composite
def class_lists(draw) -> tuple[list[str], list[str], str]:
    """(the data's classes, another reader's classes, how they differ): the same list, a permutation, numeric
    against string order, NFD spellings, a name dropped or renamed."""
    names = draw(st.lists(st.sampled_from(NAME_POOL), min_size=2, max_size=8, unique=True))
    ours = sorted(names)  # as class folders sort
    change = draw(st.sampled_from(["same", "permuted", "numeric", "nfd", "dropped", "renamed"]))
    theirs = list(ours)
    if change == "permuted":
        theirs = draw(st.permutations(ours))
    elif change == "numeric":
        theirs = sorted(ours, key=natural_key)
    elif change == "nfd":
        theirs = [nfd(name) for name in ours]
    elif change == "dropped":
        theirs = ours[:-1]
    elif change == "renamed":
        theirs = [*ours[:-1], ours[-1] + "_x"]
    return ours, theirs, change


def assert_named(refusal: str, ours: list[str], theirs: list[str]) -> None:
    """One line that says what differs: normalisation, numeric order, or the lists themselves."""
    assert "\n" not in refusal
    if Counter(unicodedata.normalize("NFC", n) for n in theirs) == Counter(ours) and Counter(theirs) != Counter(ours):
        assert "Unicode normalisation (NFC/NFD)" in refusal, refusal
    elif (
        sorted(theirs, key=natural_key) == theirs
        and sorted(ours, key=natural_key) != ours
        and sorted(theirs) == sorted(ours)
    ):
        assert "numeric order (2 before 10)" in refusal, refusal
    else:
        assert ascii(ours[0]) in refusal and ascii(theirs[0]) in refusal, refusal


def read_by_teacher(ours, theirs, tmp):
    """teacher.checkpoint: a deit-train checkpoint of a resnet10t trained on `theirs`."""
    network = timm.create_model("resnet10t", num_classes=len(theirs))
    config = {"model": {"name": "resnet10t"}, "loss": {}, "task": {"_target_": "deit_train.tasks.classify.Classify"}}
    checkpoint = {
        "state_dict": {f"student.{k}": v for k, v in network.state_dict().items()},
        "class_names": theirs,
        "pytorch-lightning_version": "2.5",
        "hyper_parameters": {"config": config},
    }
    torch.save(checkpoint, tmp / "teacher.ckpt")
    cfg = OmegaConf.merge(
        OmegaConf.structured(TeacherConfig), {"name": "resnet10t", "checkpoint": str(tmp / "teacher.ckpt")}
    )
    build_teacher_network(cfg, ours)


def read_by_init(ours, theirs, tmp):
    """model.init: a timm export directory whose label_names are `theirs`: never refused; each of our classes takes
    the row of its name (NFC) when all of them have one, else both heads start fresh."""
    source = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=len(theirs), **TINY_DEIT)
    (tmp / "export").mkdir()
    save_safetensors(source, tmp / "export" / "model.safetensors")
    config = {"architecture": "deit_tiny_distilled_patch16_224", "num_classes": len(theirs), "label_names": theirs}
    (tmp / "export" / "config.json").write_text(json.dumps(config))
    student = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=len(ours), **TINY_DEIT)
    fresh = student.head_dist.weight.detach().clone()
    initialize_from(student, str(tmp / "export"))
    settle_heads(student, ours)
    nfc = [unicodedata.normalize("NFC", name) for name in theirs]
    if all(name in nfc for name in ours):
        rows = [nfc.index(name) for name in ours]
        torch.testing.assert_close(student.head_dist.weight, source.head_dist.weight[rows], rtol=0, atol=0)
    else:
        torch.testing.assert_close(student.head_dist.weight, fresh, rtol=0, atol=0)


def read_by_shards(ours, theirs, tmp):
    """data.val: validation shards written apart, with their own _info.json listing `theirs`."""
    for split, classes in (("train", ours), ("val", theirs)):
        (tmp / split).mkdir()
        (tmp / split / f"{split}-000000.tar").touch()
        (tmp / split / "_info.json").write_text(json.dumps({"classes": classes}))
    cfg = ShardSource(
        **{
            "train_samples": 1,
            "train": str(tmp / "train" / "train-000000.tar"),
            "val": str(tmp / "val" / "val-000000.tar"),
        }
    )
    cfg.split("val", None)


def write_hf(ours, theirs, tmp) -> Path:
    """A dataset whose validation ClassLabel names `theirs`, the training one `ours`."""
    image = {"bytes": PNG, "path": None}
    splits = {}
    for split, classes in (("train", ours), ("validation", theirs)):
        features = datasets.Features({"label": datasets.ClassLabel(names=classes), "image": datasets.Image()})
        splits[split] = datasets.Dataset.from_dict({"label": [0], "image": [image]}, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(tmp / "hf"))
    return tmp / "hf"


def read_by_hf(ours, theirs, tmp):
    """data=hf."""
    cfg = HFSource(**{"dataset": str(write_hf(ours, theirs, tmp))})
    assert cfg.class_names() == ours


def read_by_deit_shard(ours, theirs, tmp):
    """deit-shard of an HF dataset whose validation ClassLabel names `theirs`: one list for both splits' shards."""
    assert locate(str(write_hf(ours, theirs, tmp))).stored_splits()[1] == ours


def read_by_folders(ours, theirs, tmp):
    """data=imagefolder: train/ with folders `ours`, val/ with folders `theirs` (both read sorted)."""
    for split, classes in (("train", ours), ("val", theirs)):
        for name in classes:
            (tmp / split / name).mkdir(parents=True)
            (tmp / split / name / "0.png").write_bytes(PNG)  # a class folder holds an image (else refused)
    cfg = ImageFolderSource(**{"root": str(tmp)})
    assert cfg.class_names() == ours


READERS = [read_by_teacher, read_by_init, read_by_shards, read_by_hf, read_by_deit_shard, read_by_folders]
PNG = (lambda out: (Image.new("RGB", (4, 4)).save(out, "PNG"), out.getvalue())[1])(io.BytesIO())


@pytest.mark.parametrize("reader", READERS, ids=lambda reader: reader.__name__)
@given(lists=class_lists())
@settings(max_examples=25, derandomize=True, deadline=None)
def test_every_reader_takes_the_same_classes_or_names_the_difference(reader, lists, tmp_path_factory):
    ours, theirs, change = lists
    if reader is read_by_folders:  # folders are listed sorted: only their names can differ, not their order
        theirs = sorted(theirs)
    same = ours == theirs
    tmp = tmp_path_factory.mktemp("reader")
    try:
        reader(ours, theirs, tmp)
    except DeitTrainError as error:
        assert not same, f"refused the same list {ours}: {error}"
        assert_named(str(error), ours, theirs)
        return
    assert same or reader is read_by_init, f"accepted {theirs} for {ours} ({change})"  # init: by name, or fresh


def test_a_transformers_teacher_with_placeholder_labels_is_checked_on_the_data(tiny_config, tmp_path, caplog):
    """id2label LABEL_0, LABEL_1, ... names nothing: a random teacher at chance shows no other order, so it is
    accepted, with a line that its top-1 is not above chance."""
    pytest.importorskip("transformers")
    from .test_transformers import transformers_classifier

    directory = transformers_classifier(tmp_path / "hf", [f"LABEL_{i}" for i in range(10)], size=16)
    with caplog.at_level(logging.INFO, logger="deit_train"):
        build_classify(tiny_config("loss=hard_distill", "teacher=hf", f"teacher.name={directory}"))
    assert "hf: top-1 not clearly above chance on the data: was it trained on it?" in caplog.text


def test_an_ensemble_member_in_another_order_is_refused_by_its_checkpoint(
    tiny_config, numbered_folders, tmp_path, caplog
):
    base = teacher_config(tiny_config, numbered_folders, "unused")
    right, numeric = fitted_resnet(base, AS_STRINGS, tmp_path), fitted_resnet(base, NUMERIC, tmp_path)
    members = f"teacher.members=[{{name:resnet10t,checkpoint:{right}}},{{name:resnet10t,checkpoint:{numeric}}}]"
    overrides = [*data_overrides(numbered_folders), "loss=hard_distill", "teacher=ensemble", members]
    with pytest.raises(
        DeitTrainError,
        match=rf"teacher.checkpoint={numeric} \(weights without class names\) cannot be "
        r"checked by name.*100.0% with its outputs read in another order \(the data's names in numeric order",
    ):
        build_classify(tiny_config(*overrides, data=[]))
    with caplog.at_level(logging.INFO, logger="deit_train"):
        build_classify(tiny_config(*overrides, "teacher.unchecked_order=true", data=[]))
    assert "teacher resnet10t: top-1 100.0% on 48 validation images" in caplog.text
    assert "teacher resnet10t: top-1 16.7% on 48 validation images" in caplog.text
    assert "teacher ensemble: top-1 " in caplog.text
