"""Where the images come from: the demo set, any ImageFolder (ImageNet layout), CIFAR-10/100, a Hugging Face dataset
(data/hf.py) or WebDataset shards (data/webdataset.py)."""

import os
import warnings
from pathlib import Path

from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets

from deit_train.data.demo import ensure_demo_dataset
from deit_train.data.hf import hf_class_names, open_hf_split
from deit_train.data.images import IMAGE_EXTENSIONS, class_folders, find_images, load_image
from deit_train.data.webdataset import Shards, shard_class_names
from deit_train.errors import DataError, DeitTrainError
from deit_train.labels import check_same_classes

CIFAR = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}


def given_root(cfg: DictConfig, expected: str) -> Path:
    """data.root, checked to be set and to be a folder; `expected` tells the user what it should hold."""
    if cfg.root in (None, ""):
        raise DeitTrainError(f"data={cfg.name} needs data.root=PATH: {expected}.")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise DeitTrainError(f"data.root={root} {what}: point it at {expected}.")
    return root


class ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder (ImageNet layout: root/<class>/<image>) without hidden folders as classes or hidden
    files as samples, each real file once (data/images.py: find_images), reading each image with load_image."""

    def __init__(self, root: str | Path, transform=None, max_pixels: int | None = Image.MAX_IMAGE_PIXELS) -> None:
        self.max_pixels = max_pixels
        super().__init__(str(root), transform=transform, loader=self.read)

    def read(self, path: str) -> Image.Image:
        return load_image(path, self.max_pixels)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = class_folders(Path(directory))
        if not classes:
            raise DeitTrainError(f"{directory} holds no class folders: expected {directory}/<class>/<image files>")
        return classes, {name: index for index, name in enumerate(classes)}

    def make_dataset(self, directory: str, class_to_idx: dict[str, int], *args, **kwargs) -> list[tuple[str, int]]:
        """(path, class index) for each class folder's image files; a class without any, or one file in two classes
        (a link into another class's folder), is refused in one line."""
        samples, owners = [], {}
        unreadable = [name for name in class_to_idx if not os.access(Path(directory, name), os.R_OK | os.X_OK)]
        if unreadable:
            raise DeitTrainError(f"{directory}: cannot read the class folder(s) {unreadable[:5]} (permission "
                                 f"denied); make them readable (chmod -R a+rX) or remove them")  # fmt: skip
        empty = []
        for name, index in class_to_idx.items():
            files = find_images(Path(directory, name))
            if not files:
                empty.append(name)
            for path, real in files:
                other, first = owners.setdefault(real, (name, path))
                if other != name:
                    raise DeitTrainError(
                        f"{path} (class {name!r}) and {first} (class {other!r}) are the same file, through a link: "
                        f"it would be trained with two labels. Remove the link, or keep the image in one class"
                    )
                samples.append((str(path), index))
        if empty:
            raise DeitTrainError(
                f"{directory}: the class folder(s) {empty[:5]} hold no images (extensions: "
                f"{', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder(s)"
            )
        return samples


def imagefolder_root(cfg: DictConfig) -> Path:
    """The folder holding train/ and val/, checked before anything is built."""
    if cfg.name == "demo":
        return ensure_demo_dataset(
            cfg.cache_dir, cfg.image_size, cfg.train_per_class, cfg.val_per_class, cfg.seed
        )
    root = given_root(cfg, "a folder with train/ and val/, one sub-folder per class")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DeitTrainError(
                f"data.root={root} has no {split}/ folder. Expected the ImageNet layout: "
                f"{root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg."
            )
    return root


def find_class_names(cfg: DictConfig) -> list[str]:
    """The data's classes, in label order, read from the data itself."""
    if cfg.name in CIFAR:
        dataset = open_cifar(cfg, train=False, transform=None)
        return list(dataset.classes)
    if cfg.name == "hf":
        return hf_class_names(cfg)
    if cfg.name == "webdataset":
        return shard_class_names(cfg)
    root = imagefolder_root(cfg)
    train_classes, val_classes = class_folders(root / "train"), class_folders(root / "val")
    check_same_classes(val_classes, train_classes, f"{root}/val", "val/", "train/",
                       "Labels would not match: give val/ the class folders of train/")  # fmt: skip
    return train_classes


def open_split(cfg: DictConfig, split: str, transform) -> Dataset:
    if cfg.name in CIFAR:
        return open_cifar(cfg, train=split == "train", transform=transform)
    if cfg.name == "webdataset":  # streamed: the data module deals its shards to ranks and workers
        return Shards(cfg, split, transform)
    if cfg.name == "hf":
        dataset = open_hf_split(cfg, split, transform)
    else:
        dataset = ImageFolder(imagefolder_root(cfg) / split, transform, cfg.max_image_pixels)
    return SkipCorrupt(dataset) if cfg.skip_corrupt else dataset


class SkipCorrupt(Dataset):
    """Opt-in (data.skip_corrupt=true): a corrupt image is replaced by the next readable one, with a warning
    that names it and counts the skips so far in this process."""

    def __init__(self, dataset: datasets.ImageFolder) -> None:
        self.dataset = dataset
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):  # classes, samples, targets, ... of the wrapped ImageFolder
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int):
        for offset in range(len(self.dataset)):
            try:
                return self.dataset[(index + offset) % len(self.dataset)]
            except DataError as error:
                self.skipped += 1
                warnings.warn(
                    f"skipped {error} ({self.skipped} skipped so far in this process)", stacklevel=2
                )
        raise DataError(f"no readable image in {self.dataset.root}")


def open_cifar(cfg: DictConfig, train: bool, transform) -> Dataset:
    root = Path(cfg.root).expanduser()
    try:
        return CIFAR[cfg.name](str(root), train=train, transform=transform, download=cfg.download)
    except RuntimeError as error:
        raise DeitTrainError(
            f"{cfg.name} not found under data.root={root}: {error}. Pass data.download=true (needs network) "
            f"or point data.root at the extracted dataset."
        ) from error
