"""Where the images come from: the demo set, any ImageFolder (ImageNet layout) or CIFAR-10/100."""

import warnings
from pathlib import Path

from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS

from deit_train.data.demo import ensure_demo_dataset
from deit_train.errors import DeitTrainError

CIFAR = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}


def load_rgb(path: str) -> Image.Image:
    """PIL loader that names the file when an image cannot be decoded."""
    try:
        with open(path, "rb") as file:
            return Image.open(file).convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise DeitTrainError(
            f"corrupt image {path}: {error}. Remove or replace the file, or set data.skip_corrupt=true to skip such "
            f"files with a warning."
        ) from error


def given_root(cfg: DictConfig, expected: str) -> Path:
    """data.root, checked to be set and to exist; `expected` tells the user what it should hold."""
    if cfg.root in (None, ""):
        raise DeitTrainError(f"data={cfg.name} needs data.root=PATH: {expected}.")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DeitTrainError(f"data.root={root} does not exist: point it at {expected}.")
    return root


def image_files(folder: Path) -> list[Path]:
    """Every image file below `folder`, in a fixed (sorted) order."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())


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
    root = imagefolder_root(cfg)
    train_classes, _ = datasets.folder.find_classes(str(root / "train"))
    val_classes, _ = datasets.folder.find_classes(str(root / "val"))
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))[:5]
        only_val = sorted(set(val_classes) - set(train_classes))[:5]
        raise DeitTrainError(
            f"{root}: train/ and val/ hold different class folders (only in train: {only_train}, "
            f"only in val: {only_val}). Labels would not match."
        )
    return train_classes


def open_split(cfg: DictConfig, split: str, transform) -> Dataset:
    if cfg.name in CIFAR:
        return open_cifar(cfg, train=split == "train", transform=transform)
    folder = imagefolder_root(cfg) / split
    try:
        dataset = datasets.ImageFolder(str(folder), transform=transform, loader=load_rgb)
    except FileNotFoundError as error:  # a class folder without images
        raise DeitTrainError(f"{folder}: {error}") from error
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
            except DeitTrainError as error:
                self.skipped += 1
                warnings.warn(
                    f"skipped {error} ({self.skipped} skipped so far in this process)", stacklevel=2
                )
        raise DeitTrainError(f"no readable image in {self.dataset.root}")


def open_cifar(cfg: DictConfig, train: bool, transform) -> Dataset:
    root = Path(cfg.root).expanduser()
    try:
        return CIFAR[cfg.name](str(root), train=train, transform=transform, download=cfg.download)
    except RuntimeError as error:
        raise DeitTrainError(
            f"{cfg.name} not found under data.root={root}: {error}. Pass data.download=true (needs network) "
            f"or point data.root at the extracted dataset."
        ) from error
