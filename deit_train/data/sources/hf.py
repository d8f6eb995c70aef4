"""data=hf (HFSource): a Hugging Face `datasets` image-classification dataset, map-style, so that it serves every
feature an ImageFolder does (seeded views, repeated augmentation, exact DDP validation, teacher cache, skip_corrupt).

data.dataset is a Hub name (load_dataset: the network the first time, then Hugging Face's cache, also offline) or
a local path: a save_to_disk folder (load_from_disk), a folder of Parquet or Arrow files whose names give the splits
(train-*.parquet, validation-*.parquet; load_dataset's own rules), or one .parquet/.arrow file (the train split).
The image column is read undecoded (its bytes, or the file it names) and decoded as an image file is
(data/images.py: EXIF orientation, 16-bit and transparent images, data.max_image_pixels), so a corrupt image is a
DataError naming the split and row. Class names come from the label column's ClassLabel feature.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from deit_train.data.extras import datasets_module, require
from deit_train.data.images import DECODE_MODES
from deit_train.data.sources.base import DataSource, StoredSplit
from deit_train.errors import DeitTrainError
from deit_train.labels import check_same_classes, normalisation_hint, shortened
from deit_train.schema import OneOf, checked

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from deit_train.data.hf_images import HFImages

log = logging.getLogger(__name__)

VAL_SPLITS = ("validation", "val", "valid", "test")  # data.val_split=null: the first of these the dataset has


@dataclass
class HFSource(DataSource):
    # a Hub dataset (imagenet-1k: the network once, then Hugging Face's cache) or a local path: a save_to_disk
    # folder, a folder of Parquet/Arrow files (split in the file names), or one .parquet file (docs/data.md)
    dataset: str | None = None
    subset: str | None = None  # the dataset's configuration, load_dataset(dataset, subset)
    image_column: str | None = None  # null: the first Image feature
    label_column: str | None = None  # null: the first ClassLabel feature
    # rows labelled -1 (datasets' mark of an unlabelled row): refuse the data, or skip them (counted in the log)
    unlabelled: str = checked("refuse", OneOf("refuse", "skip"))
    train_split: str = "train"
    val_split: str | None = None  # null: validation, val, valid or test, the first the dataset has
    cache_dir: str | None = None  # the datasets cache; null: its own default
    decode: str = checked("exact", OneOf(*DECODE_MODES))  # as data=imagefolder's (data/decode.py)

    reading_keys = (*DataSource.reading_keys, "cache_dir")  # where datasets keeps its Arrow files, not what they hold

    def check(self) -> None:
        super().check()
        if not self.dataset:
            raise DeitTrainError(
                "data=hf needs data.dataset=NAME_OR_PATH: a Hugging Face Hub dataset (imagenet-1k) "
                "or a local save_to_disk folder or folder of Parquet files"
            )

    def splits(self) -> dict:
        """{split name: datasets.Dataset} of data.dataset (opened once per process)."""
        return open_splits(self.dataset, self.subset, self.cache_dir)

    def table(self, split: str):
        """(split name, datasets.Dataset) for split 'train' or 'val'."""
        if split == "train":
            return pick_split(self.splits(), self.train_split, "data.train_split", self.dataset)
        return pick_split(self.splits(), self.val_split, "data.val_split", self.dataset)

    def class_names(self) -> list[str]:
        """The ClassLabel's names, the same in both splits; for a plain integer column "0".."N-1", N from both
        (classes without a training row named in a warning)."""
        names, labels = [], []
        for split in ("train", "val"):
            name, table = self.table(split)
            _, label_column = find_columns(table, self.image_column, self.label_column, f"{self.dataset}[{name}]")
            names.append(label_names(table, label_column))
            labels.append(table[label_column])
        train, val = names
        if train is None and val is None:
            return integer_class_names(f"data.dataset={self.dataset}", *labels, label_column)
        if train is None or val is None:
            plain, named = ("train", "validation") if train is None else ("validation", "train")
            raise DeitTrainError(
                f"data.dataset={self.dataset}: the {plain} split's labels are plain integers but the "
                f"{named} split's a ClassLabel: encode both alike (datasets' "
                f"dataset.cast_column(column, ClassLabel(names=...)))"
            )
        check_same_classes(
            val,
            train,
            f"data.dataset={self.dataset}",
            "the validation split's ClassLabel",
            "the training split's",
            "Labels would not match: map the validation labels to the training "
            "split's by name (datasets' validation.align_labels_with_mapping({name: i for i, name in "
            "enumerate(train.features[column].names)}, column)) and save it again",
        )
        return train

    def split(self, split: str, transform) -> Dataset:
        name, table = self.table(split)
        where = f"{self.dataset}[{name}]"
        image_column, label_column = find_columns(table, self.image_column, self.label_column, where)
        key = "data.train_split" if split == "train" else "data.val_split"
        others = [other for other in self.splits() if other not in (name, self.train_split)]  # training is no fix
        choose = f"pick a labelled split with {key}=NAME ({', '.join(others)})" if others else NO_OTHER_SPLIT
        skip = self.unlabelled == "skip"
        table = labelled_rows(table, label_column, where, skip, choose[0].upper() + choose[1:], "data.unlabelled=skip")
        from deit_train.data.hf_images import HFImages

        images = HFImages(table, image_column, label_column, where, transform, self.max_image_pixels, self.decode)
        return self.skipping(images)

    def evaluation(self, split: str, transform, class_names: list[str]) -> HFImages:
        """deit-eval on a split ("val": the validation split found by name), its labels matched to the model's
        classes by name (a ClassLabel's names; integer labels k as class "k", as training names them); unlabelled
        rows (-1) left out, with a warning."""
        splits = self.splits()
        if split not in splits and (split != "val" or not any(name in splits for name in VAL_SPLITS)):
            asked = f"split {split!r}" if split != "val" else f"validation split ({', '.join(VAL_SPLITS)})"
            raise DeitTrainError(f"{self.dataset} has no {asked}: its splits are {sorted(splits)}; pass --split NAME")
        name, table = pick_split(splits, split if split in splits else None, "--split", self.dataset)
        where = f"{self.dataset}[{name}]"
        image_column, label_column = find_columns(
            table, self.image_column, self.label_column, where, ("--image-column", "--label-column")
        )
        others = [other for other in splits if other != name]
        choose = (
            f"evaluate a labelled split (--split {' or '.join(others)})" if others else "evaluate labelled images"
        ) + ", or get its predictions with deit-predict"
        table = labelled_rows(table, label_column, where, True, choose[0].upper() + choose[1:])
        from deit_train.data.hf_images import HFImages

        dataset = HFImages(table, image_column, label_column, where, transform, max_pixels=None)
        names = label_names(table, label_column) or [str(i) for i in range(max(table[label_column]) + 1)]
        present = (
            names if label_names(table, label_column) is None else [names[i] for i in sorted(set(table[label_column]))]
        )
        unknown = sorted(set(present) - set(class_names))
        if unknown:
            raise DeitTrainError(
                f"{where} has classes the model does not know: {shortened(unknown)}"
                f"{normalisation_hint(unknown, class_names)}. The model's classes: "
                f"{shortened(class_names)}"
            )
        model_index = {label: index for index, label in enumerate(class_names)}
        dataset.label_map = {i: model_index.get(label, -1) for i, label in enumerate(names)}
        return dataset

    def stored_splits(self) -> tuple[list[StoredSplit], list[str]]:
        """deit-shard: the training split and the validation split found by name, labelled rows only, each image's
        stored bytes (or the file its row names); and the class names (a ClassLabel's, or "0".."N-1")."""
        datasets = require("datasets", "hf", "deit-shard from a Hugging Face dataset")
        splits, names, labels = [], [], []
        image_column, label_column = self.image_column, self.label_column
        for split, wanted in (("train", "train"), ("val", None)):
            split_name, table = pick_split(self.splits(), wanted, None, self.dataset)
            where = f"{self.dataset}[{split_name}]"
            image_column, label_column = find_columns(
                table, image_column, label_column, where, ("--image-column", "--label-column")
            )
            table = labelled_rows(table, label_column, where, False, "write labelled splits only")
            names.append(label_names(table, label_column))
            labels.append(table[label_column])
            table = table.select_columns([image_column, label_column]).cast_column(
                image_column, datasets.Image(decode=False)
            )

            def read(i: int, table=table, image_column=image_column, label_column=label_column):
                row = table[i]
                stored = row[image_column]
                data = stored["bytes"] if stored.get("bytes") is not None else Path(stored["path"]).read_bytes()
                return data, int(row[label_column])

            splits.append(StoredSplit(split, len(table), read))
        train, val = names
        if train is not None and val is not None:  # the shards hold labels: they must mean the same in both splits
            check_same_classes(
                val,
                train,
                f"SRC {self.dataset}",
                "the validation split's ClassLabel",
                "the training split's",
                "The validation labels would be read as other classes: map them to the training split's by "
                "name (datasets' validation.align_labels_with_mapping({name: i for i, name in "
                "enumerate(train.features[column].names)}, column)) and save it again",
            )
        elif (train is None) != (val is None):
            raise DeitTrainError(
                f"SRC {self.dataset}: one split's labels are a ClassLabel, the other's plain integers: encode "
                f"both alike (datasets' cast_column(column, ClassLabel(names=...)))"
            )
        return splits, train or integer_class_names(f"SRC {self.dataset}", *labels, label_column)

    def unreadable(self, dataset: Dataset, full: bool) -> tuple[int, list[tuple[str, str]]]:
        return len(dataset), dataset.unreadable(full, self.max_image_pixels)

    def identity(self, dataset: Dataset, workers: int) -> str:
        return f"{dataset.fingerprint()}\t{self.decode}"


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


NO_OTHER_SPLIT = (
    "make a validation split from it (datasets' dataset['train'].train_test_split(test_size=0.1, seed=0), "
    "renaming its 'test' to 'validation') and save it again"
)


def pick_split(splits: dict, wanted: str | None, key: str | None, dataset: str):
    """(name, table) of split `wanted`, or of the first of VAL_SPLITS the dataset has; `key` is the option that
    chooses it (None: the tool has none)."""
    names = [wanted] if wanted else [name for name in VAL_SPLITS if name in splits][:1]
    if not names or names[0] not in splits:
        asked = (
            (f"split for {key}={wanted}" if key else f"{wanted} split")
            if wanted
            else f"split for {key}=null (one of {', '.join(VAL_SPLITS)})"
            if key
            else f"validation split ({', '.join(VAL_SPLITS)})"
        )
        others = [name for name in splits if name != "train" or wanted == "train"]
        fix = (
            f"Set {key}=NAME"
            if key and others
            else f"Save the dataset with a {wanted} split"
            if wanted and not key  # a tool that reads a split by its name (deit-shard: train)
            else NO_OTHER_SPLIT[0].upper() + NO_OTHER_SPLIT[1:]
        )
        named = f"data.dataset={dataset}" if key and key.startswith("data.") else dataset
        raise DeitTrainError(f"{named} has no {asked}; its splits: {', '.join(splits)}. {fix}")
    return names[0], splits[names[0]]


LABEL_FIX = "encode it as class labels (datasets' dataset.class_encode_column(COLUMN), which names them)"


def find_columns(
    table,
    image_column: str | None,
    label_column: str | None,
    where: str,
    options: tuple[str, str] = ("data.image_column", "data.label_column"),
) -> tuple[str, str]:
    """The image and label columns: as given, else the first Image and the first ClassLabel feature. `options` name
    the tool's options that choose them, for the messages."""
    datasets = datasets_module()
    features = table.features
    image_option, label_option = options
    found = {
        image_option: image_column or next((k for k, f in features.items() if isinstance(f, datasets.Image)), None),
        label_option: label_column
        or next((k for k, f in features.items() if isinstance(f, datasets.ClassLabel)), None),
    }
    for key, column in found.items():
        if column is None and key == label_option:
            integers = [
                k for k, f in features.items() if isinstance(f, datasets.Value) and f.dtype.startswith(("int", "uint"))
            ]
            hint = f" (integer labels: {label_option}={integers[0]})" if integers else f"; or {LABEL_FIX}"
            raise DeitTrainError(
                f"{where} has no ClassLabel feature; its columns: {', '.join(features)}. Name the "
                f"label column: {label_option}=COLUMN{hint}"
            )
        if column is None or column not in features:
            what = f"has no column {column}" if column else "has no Image feature"
            raise DeitTrainError(f"{where} {what}; its columns: {', '.join(features)}. Set {key}=COLUMN")
    image, label = found[image_option], found[label_option]
    if not isinstance(features[image], datasets.Image):
        raise DeitTrainError(
            f"{where}: column {image!r} holds {features[image]}, not images (datasets.Image); its "
            f"columns: {', '.join(features)}. Set {image_option}=COLUMN"
        )
    label_type = features[label]
    if not (
        isinstance(label_type, datasets.ClassLabel)
        or (isinstance(label_type, datasets.Value) and label_type.dtype.startswith(("int", "uint")))
    ):
        raise DeitTrainError(
            f"{where}: column {label!r} holds {label_type}, not class labels (ClassLabel or "
            f"integers): {LABEL_FIX.replace('COLUMN', repr(label))}"
        )
    return image, label


def labelled_rows(table, label_column: str, where: str, skip: bool, choose: str, skip_option: str | None = None):
    """The table without its unlabelled rows (label -1, datasets' mark of a row without a label: most Hub test
    splits) where `skip`; refused in one line otherwise (`skip_option` names the option that skips them), and always
    when no row has a label. `choose` says how to pick another split."""
    labels = table[label_column]
    missing = [i for i, label in enumerate(labels) if label is None or label < 0]
    if not missing:
        return table
    if len(missing) == len(table):
        raise DeitTrainError(
            f"{where} is unlabelled (all {len(table)} rows have label -1, datasets' mark of a row "
            f"without a label, as in most Hub test splits): {choose}"
        )
    if not skip:
        leave_out = (
            f"set {skip_option} to leave them out"
            if skip_option
            else f"leave them out (datasets' dataset.filter(lambda row: row['{label_column}'] >= 0))"
        )
        raise DeitTrainError(
            f"{where}: {len(missing)} of its {len(table)} rows are unlabelled (label -1, datasets' "
            f"mark of a row without a label): {leave_out}, or {choose[0].lower() + choose[1:]}"
        )
    log.warning(
        "%s: %d of its %d rows are unlabelled (label -1): left out%s",
        where,
        len(missing),
        len(table),
        f" ({skip_option})" if skip_option else "",
    )
    skipped = set(missing)
    return table.select([i for i in range(len(table)) if i not in skipped])


def label_names(table, label_column: str) -> list[str] | None:
    """The ClassLabel's names, or None for a plain integer column."""
    feature = table.features[label_column]
    return list(feature.names) if hasattr(feature, "names") else None


def integer_class_names(where: str, train_labels, val_labels, column: str) -> list[str]:
    """ "0".."N-1" for plain integer labels, N from both splits; classes without a training row are named in a
    warning, not refused: the names stay right (label k is class "k" in every tool) and an empty class's output is
    only never trained. 1-based labels are the common case."""
    trained = {label for label in train_labels if label is not None and label >= 0}
    largest = max([*trained, *(label for label in val_labels if label is not None)], default=0)
    empty = [str(i) for i in range(largest + 1) if i not in trained]
    if empty:
        log.warning(
            "%s: its integer labels run 0..%d but %d class(es) have no training rows (%s%s; 1-based labels?): "
            "the model gets an output for each, never trained. To drop them, renumber the labels from 0 "
            "(datasets' dataset.map(lambda row: {'%s': row['%s'] - 1}) for 1-based ones) or encode them "
            "(dataset.class_encode_column('%s'))",
            where,
            largest,
            len(empty),
            ", ".join(empty[:5]),
            ", ..." if len(empty) > 5 else "",
            column,
            column,
            column,
        )
    return [str(i) for i in range(largest + 1)]
