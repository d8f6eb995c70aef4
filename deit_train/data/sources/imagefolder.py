"""data=imagefolder: any folder in the ImageNet layout, root/train/<class>/<image> and root/val/<class>/<image>
(torchvision's ImageFolder, without hidden folders or files, each real file once). The demo data (demo.py) is one,
generated. task=mim reads any folder of images below root, with or without train/ and val/.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from deit_train.data.images import (
    DECODE_MODES,
    IMAGE_EXTENSIONS,
    check_classes_hold_images,
    class_folders,
    image_files,
    unreadable,
)
from deit_train.data.sources.base import DataSource, StoredSplit
from deit_train.errors import DeitTrainError
from deit_train.labels import check_same_classes, normalisation_hint, shortened
from deit_train.schema import OneOf, checked

if TYPE_CHECKING:
    from torch.utils.data import Dataset


HOLDOUT_EVERY = 20  # task=mim on a folder without val/ keeps every 20th image (5 %) for validation


@dataclass
class FolderSource(DataSource):
    """A folder with train/ and val/, one sub-folder per class: what ImageFolderSource is given, what DemoSource
    writes."""

    # exact: every image decoded in full; reduced: a large JPEG decoded at 1/2, 1/4 or 1/8 where the crop stays at
    # least the output size (data/decode.py; about 3x faster on 12-megapixel photos, 47.6 dB from exact)
    decode: str = checked("exact", OneOf(*DECODE_MODES))

    def folder(self) -> Path:
        """The folder holding train/ and val/, checked."""
        raise NotImplementedError

    def images_folder(self) -> Path:
        """task=mim: the folder below which the images are (any layout)."""
        return self.folder()

    def class_names(self) -> list[str]:
        root = self.folder()
        train_classes, val_classes = class_folders(root / "train"), class_folders(root / "val")
        check_same_classes(
            val_classes,
            train_classes,
            f"{root}/val",
            "val/",
            "train/",
            "Labels would not match: give val/ the class folders of train/",
        )
        for split in ("train", "val"):  # listed until an image is found: an empty class refused before torch
            check_classes_hold_images(root / split, train_classes)
        return train_classes

    def split(self, split: str, transform) -> Dataset:
        from deit_train.data.folder import ImageFolder

        return self.skipping(ImageFolder(self.folder() / split, transform, self.max_image_pixels, self.decode))

    def images_only(self, split: str, transform) -> Dataset:
        """The `split` images below the folder, without labels: those of split/ where there are train/ and split/,
        else every HOLDOUT_EVERY-th image of train/ (or of a flat folder) held out for validation, the same ones
        in every run."""
        root = self.images_folder()
        if (root / "train").is_dir() and (root / split).is_dir():
            files = image_files(root / split)
        else:
            every = image_files(root / "train" if (root / "train").is_dir() else root)
            held_out = set(every[::HOLDOUT_EVERY])
            files = sorted(held_out) if split == "val" else [f for f in every if f not in held_out]
        if not files:
            raise DeitTrainError(
                f"no {split} images under {root} (extensions: {', '.join(IMAGE_EXTENSIONS)}); masked image modeling "
                f"needs at least {HOLDOUT_EVERY + 1} images in a flat folder, or train/ and val/ folders"
            )
        from deit_train.data.folder import ImageFiles

        return ImageFiles(files, transform, self.max_image_pixels, self.decode)

    def evaluation(self, split: str, transform, class_names: list[str]) -> Dataset:
        """deit-eval: the folder's `split`/ (or the folder itself, one sub-folder per class), its class folders
        matched to the model's `class_names` by name (a subset of them, in any order). No pixel limit: images one
        chose to score."""
        from deit_train.data.folder import ImageFolder

        root = self.images_folder()
        folder = root / split if (root / split).is_dir() else root
        splits = sorted(name for name in ("train", "val", "validation", "test") if (root / name).is_dir())
        if folder == root and splits:  # a dataset with splits, but not this one: not a folder of classes
            raise DeitTrainError(f"{root} has no {split}/ folder (it has {', '.join(splits)}): pass --split NAME")
        dataset = ImageFolder(folder, transform, max_pixels=None, decode=self.decode)
        unknown = sorted(set(dataset.classes) - set(class_names))
        if unknown:
            raise DeitTrainError(
                f"{folder} has class folders the model does not know: {shortened(unknown)}"
                f"{normalisation_hint(unknown, class_names)}. The model's classes: {shortened(class_names)}"
            )
        # Labels in the model's order: the folder's classes may be a subset, sorted differently.
        model_index = {name: index for index, name in enumerate(class_names)}
        dataset.samples = [(path, model_index[dataset.classes[target]]) for path, target in dataset.samples]
        dataset.targets = [target for _, target in dataset.samples]
        return dataset

    def stored_splits(self) -> tuple[list[StoredSplit], list[str]]:
        """deit-shard: train/ and val/, each file's bytes, every image decoded first (a corrupt one is refused
        before a shard is written)."""
        from deit_train.data.folder import ImageFolder

        classes, root, splits = self.class_names(), self.folder(), []
        for name in ("train", "val"):
            samples = list(ImageFolder(root / name).samples)
            if bad := unreadable([path for path, _ in samples], full=True, max_pixels=None):
                raise DeitTrainError(
                    f"{len(bad)} of {len(samples)} image files in {root / name} cannot be read: "
                    f"{'; '.join(f'{p} ({why})' for p, why in bad[:3])}. Remove or replace them"
                )
            read = lambda i, samples=samples: (Path(samples[i][0]).read_bytes(), samples[i][1])  # noqa: E731
            splits.append(StoredSplit(name, len(samples), read))
        return splits, classes

    def unreadable(self, dataset: Dataset, full: bool) -> tuple[int, list[tuple[str, str]]]:
        paths = [path for path, _ in dataset.samples]
        return len(paths), unreadable(paths, full=full, max_pixels=self.max_image_pixels)

    def identity(self, dataset: Dataset, workers: int) -> str:
        """The files by their resolved folder, paths and labels, without a stat per file."""
        digest = hashlib.sha256(f"{Path(dataset.root).resolve()}\t{self.decode}\n".encode())
        for path, target in dataset.samples:
            digest.update(f"{path}\t{target}\n".encode())
        return digest.hexdigest()


@dataclass
class ImageFolderSource(FolderSource):
    root: str | None = None  # root/train/<class>/*, root/val/<class>/*; task=mim: any folder of images

    reading_keys = (*DataSource.reading_keys, "root")  # the same data moved: a resume compares its classes

    def check(self) -> None:
        super().check()
        if not self.root:  # the default source: no data given at all
            raise DeitTrainError(
                "data=imagefolder (the default) needs data.root=PATH: a folder with train/<class>/* and "
                "val/<class>/* (task=mim: any folder of images); or choose another source (data=cifar10, data=hf "
                "data.dataset=NAME, data=webdataset data.train=...), or experiment=demo (generated images)"
            )
        self.images_folder()  # a folder, whatever the task reads in it: refused before the data module is imported

    def images_folder(self) -> Path:
        return given_root(self.root, "data=imagefolder", "a folder of images (or with train/ and val/)")

    def folder(self) -> Path:
        root = given_root(self.root, "data=imagefolder", "a folder with train/ and val/, one sub-folder per class")
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise DeitTrainError(
                    f"data.root={root} has no {split}/ folder. Expected the ImageNet layout: "
                    f"{root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg."
                )
        return root


def given_root(root: str | None, option: str, expected: str) -> Path:
    """data.root, checked to be set and to be a folder; `expected` tells the user what it should hold."""
    if root in (None, ""):
        raise DeitTrainError(f"{option} needs data.root=PATH: {expected}.")
    path = Path(root).expanduser()
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise DeitTrainError(f"data.root={path} {what}: point it at {expected}.")
    return path


def __getattr__(name: str):
    # the datasets themselves (torchvision) are data/folder.py's, imported where a split is opened
    if name in ("ImageFolder", "ImageFiles"):
        from deit_train.data import folder

        return getattr(folder, name)
    raise AttributeError(name)
