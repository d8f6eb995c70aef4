"""Data: the demo set, class discovery, clear errors, and the DeiT eval transform."""

import hashlib

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torchvision import transforms as T

from deit_train.data import DeiTDataModule
from deit_train.data.datasets import find_class_names, load_rgb, open_split
from deit_train.data.demo import CLASS_NAMES, ensure_demo_dataset
from deit_train.data.transforms import eval_transform
from deit_train.errors import DeitTrainError


def folder_digest(root) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.png")):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_demo_dataset_is_deterministic_and_complete(tmp_path):
    first = ensure_demo_dataset(tmp_path / "a", image_size=16, train_per_class=3, val_per_class=2, seed=1)
    second = ensure_demo_dataset(tmp_path / "b", image_size=16, train_per_class=3, val_per_class=2, seed=1)
    assert folder_digest(first) == folder_digest(second)
    assert sorted(p.name for p in (first / "train").iterdir()) == sorted(CLASS_NAMES)
    assert len(list((first / "train").rglob("*.png"))) == 3 * len(CLASS_NAMES)
    assert Image.open(next((first / "val").rglob("*.png"))).size == (16, 16)


def imagefolder_config(root):
    return OmegaConf.create({"name": "imagefolder", "root": str(root)})


def make_folder(root, classes, split_classes=None):
    for split in ("train", "val"):
        for name in (split_classes or {}).get(split, classes):
            (root / split / name).mkdir(parents=True)
            Image.new("RGB", (10, 7), (10, 20, 30)).save(root / split / name / "x.png")


def test_class_names_come_from_the_folders(tmp_path):
    make_folder(tmp_path, ["zebra", "ant", "moth"])
    assert find_class_names(imagefolder_config(tmp_path)) == ["ant", "moth", "zebra"]


@pytest.mark.parametrize(
    "root,message", [(None, "needs data.root"), ("/nonexistent/imagenet", "does not exist")]
)
def test_missing_data_root_is_a_clear_error(root, message):
    with pytest.raises(DeitTrainError, match=message):
        find_class_names(OmegaConf.create({"name": "imagefolder", "root": root}))


def test_missing_val_split_is_a_clear_error(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DeitTrainError, match="has no val/ folder"):
        find_class_names(imagefolder_config(tmp_path))


def test_train_and_val_with_different_classes_are_refused(tmp_path):
    make_folder(tmp_path, [], {"train": ["a", "b"], "val": ["a", "c"]})
    with pytest.raises(DeitTrainError, match="different class folders"):
        find_class_names(imagefolder_config(tmp_path))


def test_corrupt_image_is_reported_by_path(tmp_path):
    make_folder(tmp_path, ["a", "b"])
    bad = tmp_path / "train" / "b" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    dataset = open_split(imagefolder_config(tmp_path), "train", transform=None)
    index = [i for i, (path, _) in enumerate(dataset.samples) if path.endswith("broken.jpg")][0]
    with pytest.raises(DeitTrainError, match="corrupt image .*broken.jpg"):
        dataset[index]
    assert load_rgb(str(tmp_path / "train" / "a" / "x.png")).mode == "RGB"


def test_cifar_without_files_says_how_to_get_them(tmp_path):
    cfg = OmegaConf.create({"name": "cifar10", "root": str(tmp_path), "download": False})
    with pytest.raises(DeitTrainError, match="data.download=true"):
        find_class_names(cfg)


@pytest.mark.parametrize("size", [(333, 251), (97, 410), (224, 224)])
def test_eval_transform_is_the_official_deit_one(size):
    """Resize the short side to int(img_size / 0.875) bicubic, center crop, ImageNet normalisation."""
    image = Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8).numpy())
    official = T.Compose(
        [
            T.Resize(int(224 / 0.875), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    ours = eval_transform(OmegaConf.create({"eval_crop_pct": 0.875}), 224)
    torch.testing.assert_close(ours(image), official(image))


def test_global_batch_is_split_over_devices(tmp_path):
    class FakeTrainer:
        world_size = 4
        accumulate_grad_batches = 1

    module = DeiTDataModule(OmegaConf.create({"batch_size": 64}), OmegaConf.create({}), 16)
    module.trainer = FakeTrainer()
    assert module.per_device_batch_size == 16
    FakeTrainer.accumulate_grad_batches = 2  # two micro-batches per optimizer step
    assert module.per_device_batch_size == 8
    FakeTrainer.world_size = 3
    with pytest.raises(DeitTrainError, match="must divide evenly"):
        _ = module.per_device_batch_size


def test_corrupt_image_can_be_skipped_with_a_counted_warning(tmp_path):
    make_folder(tmp_path, ["a", "b"])
    (tmp_path / "train" / "b" / "broken.jpg").write_bytes(b"not an image")
    cfg = OmegaConf.create({"name": "imagefolder", "root": str(tmp_path), "skip_corrupt": True})
    dataset = open_split(cfg, "train", transform=None)
    index = [i for i, (path, _) in enumerate(dataset.samples) if path.endswith("broken.jpg")][0]
    with pytest.warns(UserWarning, match=r"corrupt image .*broken.jpg.*\(1 skipped so far"):
        image, label = dataset[index]
    replacement_path, replacement_label = dataset.samples[(index + 1) % len(dataset)]
    assert label == replacement_label and image.size == Image.open(replacement_path).size
    assert len(dataset) == 3 and dataset.classes == ["a", "b"]
