"""data=hf: a Hugging Face `datasets` image-classification dataset, map-style, so that it serves every feature an
ImageFolder does (seeded views, repeated augmentation, exact DDP validation, the teacher cache, skip_corrupt).

data.dataset is a Hub name (load_dataset: the network the first time, then Hugging Face's cache, also offline) or
a local path: a save_to_disk folder (load_from_disk), a folder of Parquet or Arrow files whose names give the splits
(train-*.parquet, validation-*.parquet; load_dataset's own rules), or one .parquet/.arrow file (the train split).
The image column is read undecoded (its bytes, or the file it names) and decoded as an image file is
(data/images.py: EXIF orientation, 16-bit and transparent images, data.max_image_pixels), so a corrupt image is a
DataError naming the split and row. Class names come from the label column's ClassLabel feature.
"""

import io
import logging
from functools import lru_cache
from pathlib import Path

from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import Dataset

from deit_train.data.extras import require
from deit_train.data.images import READ_ERRORS, read_rgb, reason
from deit_train.errors import DataError, DeitTrainError

log = logging.getLogger(__name__)

VAL_SPLITS = ("validation", "val", "valid", "test")  # data.val_split=null: the first of these the dataset has


def datasets_module():
    return require("datasets", "hf", "data=hf")


@lru_cache(maxsize=4)
def open_splits(dataset: str, subset: str | None = None, cache_dir: str | None = None) -> dict:
    """{split name: datasets.Dataset} of a Hub name or a local path (module docstring), opened once per process."""
    datasets = datasets_module()
    path = Path(dataset).expanduser()
    try:
        if path.is_dir() and any((path / name).exists() for name in ("dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_file():
            builder = "arrow" if path.suffix == ".arrow" else "parquet"
            loaded = datasets.load_dataset(builder, data_files=str(path), cache_dir=cache_dir)
        else:
            loaded = datasets.load_dataset(str(path) if path.exists() else dataset, subset, cache_dir=cache_dir)
    except (OSError, ValueError, ConnectionError) as error:  # not found, offline and not cached, unknown subset
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DeitTrainError(
            f"data.dataset={dataset}: {detail}. Give a Hub dataset name (it needs the network once, or Hugging "
            f"Face's cache), a save_to_disk folder, or a folder of Parquet files named by split"
        ) from error
    if isinstance(loaded, datasets.Dataset):  # one split saved alone
        loaded = {"train": loaded}
    return dict(loaded)


def pick_split(splits: dict, wanted: str | None, key: str, dataset: str):
    names = [wanted] if wanted else [name for name in VAL_SPLITS if name in splits][:1]
    if not names or names[0] not in splits:
        asked = f"{key}={wanted}" if wanted else f"{key}=null (one of {', '.join(VAL_SPLITS)})"
        raise DeitTrainError(f"data.dataset={dataset} has no split for {asked}; its splits: {', '.join(splits)}. "
                             f"Set {key}=NAME")  # fmt: skip
    return names[0], splits[names[0]]


def find_columns(table, image_column: str | None, label_column: str | None, where: str) -> tuple[str, str]:
    """The image and label columns: as given, else the first Image and the first ClassLabel feature."""
    datasets = datasets_module()
    features = table.features
    found = {
        "data.image_column": image_column or next((k for k, f in features.items() if isinstance(f, datasets.Image)), None),
        "data.label_column": label_column or next(
            (k for k, f in features.items() if isinstance(f, datasets.ClassLabel)), None
        ),
    }
    for key, column in found.items():
        if column is None or column not in features:
            what = f"has no column {column}" if column else "has no " + ("Image" if "image" in key else "ClassLabel") + " feature"
            raise DeitTrainError(f"{where} {what}; its columns: {', '.join(features)}. Set {key}=COLUMN")
    image, label = found["data.image_column"], found["data.label_column"]
    if not isinstance(features[image], datasets.Image):
        raise DeitTrainError(f"{where}: column {image!r} holds {features[image]}, not images (datasets.Image); its "
                             f"columns: {', '.join(features)}. Set data.image_column=COLUMN")  # fmt: skip
    label_type = features[label]
    if not (isinstance(label_type, datasets.ClassLabel) or (isinstance(label_type, datasets.Value) and
                                                           label_type.dtype.startswith(("int", "uint")))):  # fmt: skip
        raise DeitTrainError(f"{where}: column {label!r} holds {label_type}, not class labels (ClassLabel or "
                             f"integers); its columns: {', '.join(features)}. Set data.label_column=COLUMN")  # fmt: skip
    return image, label


def label_names(table, label_column: str) -> list[str] | None:
    """The ClassLabel's names, or None for a plain integer column."""
    feature = table.features[label_column]
    return list(feature.names) if hasattr(feature, "names") else None


class HFImages(Dataset):
    """One split as (transform(image), label) by row; `table` is the datasets.Dataset, its image column undecoded."""

    def __init__(self, table, image_column: str, label_column: str, name: str, transform=None,
                 max_pixels: int | None = Image.MAX_IMAGE_PIXELS) -> None:  # fmt: skip
        datasets = datasets_module()
        table = table.select_columns([image_column, label_column])
        if isinstance(table.features[image_column], datasets.Image):
            table = table.cast_column(image_column, datasets.Image(decode=False))  # its bytes: we decode
        self.table, self.image_column, self.label_column = table, image_column, label_column
        self.root = name  # how messages name it (SkipCorrupt, deit-eval)
        self.transform, self.max_pixels = transform, max_pixels
        self.label_map: dict[int, int] | None = None  # deit-eval: the dataset's labels to the model's

    def __len__(self) -> int:
        return len(self.table)

    def source(self, stored) -> io.BytesIO | str:
        """The stored image as a file: its bytes, or the path the column holds where it has no bytes."""
        if isinstance(stored, dict):
            return io.BytesIO(stored["bytes"]) if stored.get("bytes") is not None else stored["path"]
        return io.BytesIO(stored)

    def decode(self, stored, index: int) -> Image.Image:
        try:
            if stored is None:
                raise ValueError("no image in this row")
            return read_rgb(self.source(stored), self.max_pixels)
        except READ_ERRORS as error:
            raise DataError(f"corrupt image {self.root}[{index}]: {reason(error)}. Replace it in the dataset, or set "
                            f"data.skip_corrupt=true to skip such images with a warning.") from error  # fmt: skip

    def __getitem__(self, index: int):
        row = self.table[index]
        image, label = self.decode(row[self.image_column], index), int(row[self.label_column])
        if self.label_map is not None:
            label = self.label_map[label]
        return (self.transform(image) if self.transform is not None else image), label

    @property
    def targets(self) -> list[int]:
        return list(self.table[self.label_column])

    def fingerprint(self) -> str:
        """datasets' own fingerprint of the table (its files and every transform applied), for the teacher cache."""
        return f"hf\t{self.table._fingerprint}\t{len(self)}\t{self.image_column}\t{self.label_column}"

    def unreadable(self, full: bool, max_pixels: int | None) -> list[tuple[str, str]]:
        """data.scan for images stored in the dataset: (row, problem) of each that cannot be read."""
        problems = []
        for index, stored in enumerate(self.table[self.image_column]):
            try:
                read_rgb(self.source(stored), max_pixels, decode=full)
            except READ_ERRORS as error:
                problems.append((f"{self.root}[{index}]", reason(error)))
        return problems


def open_table(cfg: DictConfig, split: str):
    """(split name, datasets.Dataset) for split 'train' or 'val' of data=hf."""
    splits = open_splits(cfg.dataset, cfg.subset, cfg.cache_dir)
    if split == "train":
        return pick_split(splits, cfg.train_split, "data.train_split", cfg.dataset)
    return pick_split(splits, cfg.val_split, "data.val_split", cfg.dataset)


def hf_class_names(cfg: DictConfig) -> list[str]:
    """The ClassLabel's names, the same in both splits; for a plain integer column "0".."N-1", N from both."""
    names, largest = [], 0
    for split in ("train", "val"):
        name, table = open_table(cfg, split)
        _, label_column = find_columns(table, cfg.image_column, cfg.label_column, f"{cfg.dataset}[{name}]")
        names.append(label_names(table, label_column))
        largest = max(largest, max(table[label_column], default=0))
    train, val = names
    if train is None and val is None:
        return [str(i) for i in range(largest + 1)]
    if train != val:
        raise DeitTrainError(f"data.dataset={cfg.dataset}: the train and validation splits name different classes "
                             f"({len(train or [])} and {len(val or [])} ClassLabel names); labels would not match")  # fmt: skip
    return train


def open_hf_split(cfg: DictConfig, split: str, transform) -> HFImages:
    name, table = open_table(cfg, split)
    where = f"{cfg.dataset}[{name}]"
    image_column, label_column = find_columns(table, cfg.image_column, cfg.label_column, where)
    return HFImages(table, image_column, label_column, where, transform, cfg.max_image_pixels)


def is_hf_dataset(path: Path) -> bool:
    """A save_to_disk folder, or a folder of Parquet/Arrow files (deit-eval's DATA)."""
    return path.is_dir() and (
        any((path / name).exists() for name in ("dataset_dict.json", "state.json"))
        or any(path.glob("*.parquet")) or any(path.glob("*/*.parquet")) or any(path.glob("*.arrow"))
    )


def open_hf_eval(path: Path, split: str, transform, class_names: list[str]) -> HFImages:
    """deit-eval on a split of a local HF dataset, its ClassLabel names matched to the model's classes."""
    splits = open_splits(str(path))
    if split not in splits and split != "val":  # "val", deit-eval's default, finds the validation split by name
        raise DeitTrainError(f"{path} has no split {split!r}: its splits are {sorted(splits)}; pass --split NAME")
    name, table = pick_split(splits, split if split in splits else None, "--split", str(path))
    image_column, label_column = find_columns(table, None, None, f"{path}[{name}]")
    dataset = HFImages(table, image_column, label_column, f"{path}[{name}]", transform, max_pixels=None)
    names = label_names(table, label_column) or [str(i) for i in range(max(table[label_column]) + 1)]
    unknown = sorted(set(names) - set(class_names))
    if unknown:
        raise DeitTrainError(f"{path}[{name}] has classes the model does not know: {unknown[:5]} ({len(unknown)} "
                             f"in all)")  # fmt: skip
    model_index = {label: index for index, label in enumerate(class_names)}
    dataset.label_map = {i: model_index[label] for i, label in enumerate(names)}
    return dataset
