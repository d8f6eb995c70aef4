"""Data: the demo set, class discovery, clear errors, and the DeiT eval transform."""

import hashlib
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torchvision import transforms as T

from deit_train.data import DeiTDataModule
from deit_train.data.images import load_image
from deit_train.data.pixels import model_input
from deit_train.data.sources import build_source
from deit_train.data.sources.demo import CLASS_NAMES, ensure_demo_dataset
from deit_train.data.transforms import VIEW_DTYPE, eval_transform
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


SOURCES = {
    "imagefolder": "deit_train.data.sources.imagefolder.ImageFolderSource",
    "cifar10": "deit_train.data.sources.cifar.CIFAR10Source",
}


def data_config(name: str, **values):
    """A data node as conf/data/<name>.yaml composes it, with `values`."""
    return OmegaConf.create({"_target_": SOURCES[name], **values})


def imagefolder_config(root):
    return data_config(name="imagefolder", root=str(root))


def make_folder(root, classes, split_classes=None):
    for split in ("train", "val"):
        for name in (split_classes or {}).get(split, classes):
            (root / split / name).mkdir(parents=True)
            Image.new("RGB", (10, 7), (10, 20, 30)).save(root / split / name / "x.png")


def test_class_names_come_from_the_folders(tmp_path):
    make_folder(tmp_path, ["zebra", "ant", "moth"])
    assert build_source(imagefolder_config(tmp_path)).class_names() == ["ant", "moth", "zebra"]


@pytest.mark.parametrize("root,message", [(None, "needs data.root"), ("/nonexistent/imagenet", "does not exist")])
def test_missing_data_root_is_a_clear_error(root, message):
    with pytest.raises(DeitTrainError, match=message):
        build_source(data_config(name="imagefolder", root=root)).class_names()


def test_missing_val_split_is_a_clear_error(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DeitTrainError, match="has no val/ folder"):
        build_source(imagefolder_config(tmp_path)).class_names()


def test_train_and_val_with_different_classes_are_refused(tmp_path):
    make_folder(tmp_path, [], {"train": ["a", "b"], "val": ["a", "c"]})
    with pytest.raises(
        DeitTrainError,
        match=r"val: its classes are not the data's, label for label: other names at 1 "
        r"of 2 positions \(1: 'c' against 'b'; val/: \['a', 'c'\]; train/: "
        r"\['a', 'b'\]\)",
    ):
        build_source(imagefolder_config(tmp_path)).class_names()


def test_links_are_followed_once_and_pipes_are_not_samples(tmp_path):
    """A subset made of links is read; a link back up (a loop) adds nothing; a named pipe with an image's name is no
    sample (opening it would block the loader)."""
    make_folder(tmp_path, ["a", "b"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.new("RGB", (5, 5)).save(elsewhere / "linked.png")
    (tmp_path / "train" / "a" / "linked.png").symlink_to(elsewhere / "linked.png")
    (tmp_path / "train" / "a" / "loop").symlink_to(tmp_path / "train" / "a")  # a/loop/loop/... is a
    (tmp_path / "train" / "b" / "self").symlink_to(".")
    os.mkfifo(tmp_path / "train" / "b" / "pipe.png")
    dataset = build_source(imagefolder_config(tmp_path)).split("train", transform=None)
    assert sorted(
        (Path(path).relative_to(tmp_path / "train").as_posix(), label) for path, label in dataset.samples
    ) == [("a/linked.png", 0), ("a/x.png", 0), ("b/x.png", 1)]


def test_an_image_in_two_classes_is_refused(tmp_path):
    make_folder(tmp_path, ["a", "b"])
    (tmp_path / "train" / "a" / "up").symlink_to(tmp_path / "train")  # a/up/b/x.png: b's image labelled a as well
    with pytest.raises(
        DeitTrainError, match="b/x.png \\(class 'b'\\) and .*a/up/b/x.png \\(class 'a'\\) are the same file"
    ):
        build_source(imagefolder_config(tmp_path)).split("train", transform=None)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder")
def test_an_unreadable_class_folder_is_named(tmp_path):
    make_folder(tmp_path, ["a", "b"])
    (tmp_path / "train" / "b").chmod(0)
    try:
        with pytest.raises(DeitTrainError, match="cannot read the class folder.*'b'.*permission denied"):
            build_source(imagefolder_config(tmp_path)).split("train", transform=None)
    finally:
        (tmp_path / "train" / "b").chmod(0o755)


def test_corrupt_image_is_reported_by_path(tmp_path):
    make_folder(tmp_path, ["a", "b"])
    bad = tmp_path / "train" / "b" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    dataset = build_source(imagefolder_config(tmp_path)).split("train", transform=None)
    index = [i for i, (path, _) in enumerate(dataset.samples) if path.endswith("broken.jpg")][0]
    with pytest.raises(DeitTrainError, match="corrupt image .*broken.jpg"):
        dataset[index]
    assert load_image(tmp_path / "train" / "a" / "x.png").mode == "RGB"


def test_cifar_without_files_says_how_to_get_them(tmp_path):
    cfg = data_config(name="cifar10", root=str(tmp_path))
    with pytest.raises(DeitTrainError, match="data.download=true"):
        build_source(cfg).class_names()


def official_deit_eval(center_crop):
    """The official DeiT eval transform with a given center crop step."""
    return T.Compose(
        [
            T.Resize(int(224 / 0.875), interpolation=T.InterpolationMode.BICUBIC),
            center_crop,
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )


def random_image(width, height):
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), dtype=torch.uint8).numpy())


@pytest.mark.parametrize("size", [(333, 251), (97, 410), (224, 224), (300, 257)])
def test_eval_transform_is_the_official_deit_one_with_the_crop_at_floor_offsets(size):
    """Resize the short side to int(img_size / 0.875) bicubic, center crop at floor((side - 224) / 2), ImageNet
    normalisation."""

    def floor_crop(image):
        top, left = (image.height - 224) // 2, (image.width - 224) // 2
        return T.functional.crop(image, top, left, 224, 224)

    image = random_image(*size)
    ours = on_device(eval_transform(OmegaConf.create({"eval_crop_pct": 0.875}), 224)(image))
    torch.testing.assert_close(ours, official_deit_eval(floor_crop)(image), rtol=0, atol=0)


def on_device(pixels: torch.Tensor) -> torch.Tensor:
    """The loader's uint8 pixels as the training module normalises them after the copy (data/pixels.py)."""
    assert pixels.dtype == torch.uint8
    return model_input(pixels[None])[0]


@pytest.mark.parametrize("size,same_as_torchvision", [((97, 410), True), ((224, 224), True), ((333, 251), False)])
def test_eval_crop_moves_one_pixel_from_torchvision_only_when_its_rounding_differs(size, same_as_torchvision):
    """333x251 resizes to 339x256: torchvision's CenterCrop starts at round(115 / 2) = 58, ours at 57."""
    image = random_image(*size)
    ours = on_device(eval_transform(OmegaConf.create({"eval_crop_pct": 0.875}), 224)(image))
    torchvision = official_deit_eval(T.CenterCrop(224))(image)
    assert torch.equal(ours, torchvision) == same_as_torchvision
    if not same_as_torchvision:
        torch.testing.assert_close(ours[:, :, 1:], torchvision[:, :, :-1], rtol=0, atol=0)


def test_global_batch_is_split_over_devices(tmp_path):
    class FakeTrainer:
        world_size = 4
        accumulate_grad_batches = 1

    mixing = OmegaConf.create({"mixup": 0.8, "cutmix": 1.0})
    module = DeiTDataModule(data_config("imagefolder", root=str(tmp_path), batch_size=64), mixing, 16)
    module.trainer = FakeTrainer()
    assert module.per_device_batch_size == 16
    FakeTrainer.accumulate_grad_batches = 2  # two micro-batches per optimizer step
    assert module.per_device_batch_size == 8
    FakeTrainer.world_size = 3
    with pytest.raises(DeitTrainError, match=r"data.batch_size=64: expected a multiple of 6 \(3 devices x 2 acc"):
        _ = module.per_device_batch_size
    FakeTrainer.world_size, FakeTrainer.accumulate_grad_batches = 32, 1  # 2 each: even, as Mixup needs
    assert module.per_device_batch_size == 2
    FakeTrainer.world_size = 64  # 1 each: Mixup would pair an image with itself
    with pytest.raises(DeitTrainError, match="an even number per device and micro-batch for Mixup/CutMix"):
        _ = module.per_device_batch_size


def test_corrupt_image_can_be_skipped_with_a_counted_warning(tmp_path):
    make_folder(tmp_path, ["a", "b"])
    (tmp_path / "train" / "b" / "broken.jpg").write_bytes(b"not an image")
    cfg = data_config(name="imagefolder", root=str(tmp_path), skip_corrupt=True)
    dataset = build_source(cfg).split("train", transform=None)
    index = [i for i, (path, _) in enumerate(dataset.samples) if path.endswith("broken.jpg")][0]
    with pytest.warns(UserWarning, match=r"corrupt image .*broken.jpg.*\(1 skipped so far"):
        image, label = dataset[index]
    replacement_path, replacement_label = dataset.samples[(index + 1) % len(dataset)]
    assert label == replacement_label and image.size == Image.open(replacement_path).size
    assert len(dataset) == 3 and dataset.classes == ["a", "b"]


def test_auto_workers_come_from_the_cpus_this_process_may_use(tmp_path, monkeypatch, caplog):
    class FakeTrainer:
        num_devices, world_size, accumulate_grad_batches = 2, 2, 1

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))  # a container's 16 CPUs, 2 GPUs
    monkeypatch.setattr("deit_train.cluster.CPU_TOPOLOGY", tmp_path / "no-topology")  # logical CPUs as cores
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    no_mixing = OmegaConf.create({"mixup": 0.0, "cutmix": 0.0})
    module = DeiTDataModule(data_config("imagefolder", root=str(tmp_path), num_workers="auto"), no_mixing, 16)
    module.trainer = FakeTrainer()
    with caplog.at_level("INFO"):
        assert module.workers == 7  # 8 CPUs per device, one of them the device's own process
    assert "data.num_workers=auto: 7 data-loader worker(s) for this device (8 CPU core(s) for it)" in caplog.text
    given = DeiTDataModule(data_config("imagefolder", root=str(tmp_path), num_workers=3), OmegaConf.create(), 16)
    assert given.workers == 3


def test_too_little_shared_memory_is_refused_before_the_first_batch(tmp_path, monkeypatch):
    """8 workers x 2 loaders x 2 prefetched batches of 128 fp32 views at 224 px: 1.2 GB, in Docker's 64 MB /dev/shm."""
    import shutil
    from collections import namedtuple

    class FakeTrainer:
        num_devices, world_size, accumulate_grad_batches = 1, 1, 1

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(64 * 2**20, 0, 64 * 2**20))
    monkeypatch.setattr("deit_train.data.datamodule.SHARED_MEMORY", str(tmp_path))
    data = data_config("imagefolder", root=str(tmp_path), num_workers=8, batch_size=128)
    module = DeiTDataModule(data, OmegaConf.create({"mixup": 0.0, "cutmix": 0.0}), 224)
    module.trainer = FakeTrainer()
    view = 3 * 224 * 224 * torch.empty(0, dtype=VIEW_DTYPE).element_size()
    needed = 2 * 8 * 2 * 128 * view
    with pytest.raises(
        DeitTrainError,
        match=rf"keep about {needed / 2**20:.0f} MB of batches in shared memory .* has "
        r"64 MB free: .*--shm-size=\d+g, or --ipc=host",
    ):
        module.check_shared_memory()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2 * needed, 0, 2 * needed))
    module.check_shared_memory()  # room enough
