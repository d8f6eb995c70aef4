"""data=cifar10, data=cifar100: torchvision's CIFAR, held in memory; data.download=true fetches it (needs network)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from deit_train.data.sources.base import DataSource
from deit_train.errors import DeitTrainError

if TYPE_CHECKING:
    from torch.utils.data import Dataset


@dataclass
class CIFAR10Source(DataSource):
    root: str | None = None  # the folder holding (or receiving) cifar-10-batches-py / cifar-100-python
    download: bool = False  # fetch with torchvision (needs network)

    dataset_name = "CIFAR10"  # torchvision's class (a class attribute, not a config key)
    # root: the same arrays moved (a resume compares the classes); download: fetches the same files where missing
    reading_keys = (*DataSource.reading_keys, "root", "download")

    @property
    def dataset(self) -> type[Dataset]:
        from torchvision import datasets  # here: composing a config imports no torchvision

        return getattr(datasets, self.dataset_name)

    def check(self) -> None:
        super().check()
        if not self.root:
            raise DeitTrainError(
                f"data={self.dataset_name.lower()} needs data.root=PATH: where the dataset is (or "
                f"is downloaded to, with data.download=true)"
            )

    def open(self, train: bool, transform) -> Dataset:
        root = Path(self.root).expanduser()
        try:
            return self.dataset(str(root), train=train, transform=transform, download=self.download)
        except RuntimeError as error:
            raise DeitTrainError(
                f"data={self.dataset.__name__.lower()}: {self.dataset.__name__} not found under data.root={root}: "
                f"{error}. Pass data.download=true (needs network) or point data.root at the extracted dataset."
            ) from error

    def class_names(self) -> list[str]:
        return list(self.open(train=False, transform=None).classes)

    def split(self, split: str, transform) -> Dataset:
        return self.open(train=split == "train", transform=transform)

    def identity(self, dataset: Dataset, workers: int) -> str:
        """The arrays and labels themselves (in memory already)."""
        digest = hashlib.sha256(memoryview(dataset.data).tobytes())
        digest.update(json.dumps(list(map(int, dataset.targets))).encode())
        return digest.hexdigest()


@dataclass
class CIFAR100Source(CIFAR10Source):
    dataset_name = "CIFAR100"
