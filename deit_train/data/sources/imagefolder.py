"""data=imagefolder: any folder in the ImageNet layout, root/train/<class>/<image> and root/val/<class>/<image>
(torchvision's ImageFolder, without hidden folders or files, each real file once). The demo data (demo.py) is one,
generated. task=mim reads any folder of images below root, with or without train/ and val/.
"""

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets

from deit_train.data.decode import DECODE_MODES
from deit_train.data.images import (
    IMAGE_EXTENSIONS,
    EncodedImage,
    class_folders,
    find_images,
    image_files,
    load_image,
    open_image,
    unreadable,
)
from deit_train.data.sources.base import DataSource
from deit_train.errors import DeitTrainError
from deit_train.labels import check_same_classes
from deit_train.schema import OneOf, checked

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
        return train_classes

    def split(self, split: str, transform) -> Dataset:
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
        return ImageFiles(files, transform, self.max_image_pixels, self.decode)

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

    def check(self) -> None:
        super().check()
        if not self.root:
            raise DeitTrainError(
                "data=imagefolder needs data.root=PATH: a folder with train/ and val/, one sub-folder "
                "per class (task=mim: any folder of images)"
            )

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


class ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder (ImageNet layout: root/<class>/<image>) without hidden folders as classes or hidden
    files as samples, each real file once (data/images.py: find_images), reading each image with load_image."""

    def __init__(
        self, root: str | Path, transform=None, max_pixels: int | None = Image.MAX_IMAGE_PIXELS, decode: str = "exact"
    ) -> None:
        self.max_pixels, self.decode = max_pixels, decode
        super().__init__(str(root), transform=transform, loader=self.read)

    def read(self, path: str) -> Image.Image | EncodedImage:
        """The image decoded, or for data.decode=reduced read and checked but left for the transform's first step to
        decode at the scale its crop allows (data/decode.py)."""
        if self.decode == "reduced":
            return open_image(path, self.max_pixels)
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
            raise DeitTrainError(
                f"{directory}: cannot read the class folder(s) {unreadable[:5]} (permission "
                f"denied); make them readable (chmod -R a+rX) or remove them"
            )
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


class ImageFiles(Dataset):
    """Image files without labels (task=mim), each read as ImageFolder reads it."""

    def __init__(self, files: list[Path], transform, max_pixels: int | None, decode: str = "exact") -> None:
        self.files = files
        self.transform = transform
        self.max_pixels, self.decode = max_pixels, decode

    def __len__(self) -> int:
        return len(self.files)

    @property
    def samples(self) -> list[tuple[str, int]]:  # as ImageFolder's, for data.scan: no labels (-1)
        return [(str(path), -1) for path in self.files]

    def __getitem__(self, index: int):
        path = self.files[index]
        image = open_image(path, self.max_pixels) if self.decode == "reduced" else load_image(path, self.max_pixels)
        return self.transform(image)
