"""An image folder read as a dataset: torchvision's ImageFolder without hidden folders or files, each real file once,
each image read by data/images.py; and image files without labels (task=mim). The data sources open these when a
split is opened (data/sources/imagefolder.py), so that composing a config imports no torchvision."""

import os
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets

from deit_train.data.images import (
    EncodedImage,
    check_classes_hold_images,
    class_folders,
    find_images,
    load_image,
    open_image,
)
from deit_train.errors import DeitTrainError


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
        check_classes_hold_images(Path(directory), list(class_to_idx), empty)
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
