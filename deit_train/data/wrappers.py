"""Datasets that wrap a source's split: the opt-in skipping of corrupt images (data.skip_corrupt) and a split's
images without their labels (task=mim). A source returns them (data/sources/base.py: skipping, images_only)."""

import warnings

from torch.utils.data import Dataset

from deit_train.errors import DataError


class SkipCorrupt(Dataset):
    """Opt-in (data.skip_corrupt=true): a corrupt image is replaced by the next readable one, with a warning
    that names it and counts the skips so far in this process."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):  # classes, samples, targets, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int):
        for offset in range(len(self.dataset)):
            try:
                return self.dataset[(index + offset) % len(self.dataset)]
            except DataError as error:
                self.skipped += 1
                warnings.warn(f"skipped {error} ({self.skipped} skipped so far in this process)", stacklevel=2)
        raise DataError(f"no readable image in {getattr(self.dataset, 'root', 'the data')}")


class WithoutLabels(Dataset):
    """A labelled split's images alone (task=mim)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):  # samples, root, ... of the wrapped dataset (data.scan)
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int):
        return self.dataset[index][0]
