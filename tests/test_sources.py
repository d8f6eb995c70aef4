"""A data source is one object (deit_train/data/sources/): a new one, defined here in the test, trains through the
unchanged train() with the teacher cache, Mixup and the scan, as tests/test_tasks.py does for tasks."""

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict
from torch.utils.data import Dataset

from deit_train.data.images import load_image, unreadable
from deit_train.data.sources import DataSource, build_source, register
from deit_train.errors import DeitTrainError
from deit_train.tasks.classify import Classify
from deit_train.train import check_config, train

from .conftest import hard_distill_from
from .test_data_sources import folder_split
from .test_teacher_cache import assert_same_weights, student_weights


class Rows(Dataset):
    def __init__(self, rows: list[tuple[str, int]], transform, max_pixels: int | None) -> None:
        self.samples, self.transform, self.max_pixels = rows, transform, max_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return self.transform(load_image(path, self.max_pixels)), label


@dataclass
class CSVSource(DataSource):
    """train.csv and val.csv in `folder`: one `path,class` row per image."""

    folder: str | None = None

    def check(self) -> None:
        super().check()
        if not self.folder:
            raise DeitTrainError("data=csv needs data.folder=PATH: a folder with train.csv and val.csv")

    def rows(self, split: str) -> list[tuple[str, str]]:
        with open(Path(self.folder) / f"{split}.csv", newline="") as file:
            return [(path, name) for path, name in csv.reader(file)]

    def class_names(self) -> list[str]:
        return sorted({name for _, name in self.rows("train")})

    def split(self, split: str, transform) -> Dataset:
        index = {name: i for i, name in enumerate(self.class_names())}
        rows = [(path, index[name]) for path, name in self.rows(split)]
        return self.skipping(Rows(rows, transform, self.max_image_pixels))

    def unreadable(self, dataset: Dataset, full: bool) -> tuple[int, list[tuple[str, str]]]:
        paths = [path for path, _ in dataset.samples]
        return len(paths), unreadable(paths, full, self.max_image_pixels)

    def identity(self, dataset: Dataset, workers: int) -> str:
        return hashlib.sha256(repr(dataset.samples).encode()).hexdigest()


register("csv", CSVSource)  # conf/data/csv_schema: data=csv_schema on the command line


def write_csv(root: Path, out: Path) -> Path:
    """The ImageFolder's images as CSV rows, in its own order."""
    out.mkdir()
    for split in ("train", "val"):
        files, labels, classes = folder_split(root, split)
        with open(out / f"{split}.csv", "w", newline="") as file:
            csv.writer(file).writerows((str(path), classes[label]) for path, label in zip(files, labels, strict=True))
    return out


@pytest.mark.slow
def test_a_new_source_defined_in_a_test_trains_as_the_same_images_in_an_imagefolder(
    tiny_config, demo_data, random_teacher_checkpoint, tmp_path
):
    """The CSV source's run, distilled with the teacher cache, Mixup and random erasing on, holds the same weights as
    the ImageFolder's: the data module, the cache and the checks asked the source, not its name."""
    table = write_csv(demo_data, tmp_path / "table")
    distilled = [
        *hard_distill_from(random_teacher_checkpoint),
        f"teacher.cache={tmp_path / 'cache'}",
        "augment.reprob=0.25",
        "trainer.max_epochs=2",
    ]
    folder = tiny_config(*distilled, run="folder")
    table_cfg = tiny_config(
        "data=csv_schema", f"data.folder={table}", "data.batch_size=16", "data.num_workers=0", *distilled, run="csv"
    )
    folder_run, table_run = train(folder), train(table_cfg)
    assert table_run.datamodule.class_names == folder_run.datamodule.class_names
    assert_same_weights(student_weights(folder), student_weights(table_cfg))
    assert table_run.metrics == folder_run.metrics
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 4  # 2 epochs each, one fingerprint apiece


def test_a_new_source_checks_its_own_keys(tiny_config):
    with pytest.raises(DeitTrainError, match="data=csv needs data.folder=PATH"):
        check_config(tiny_config("data=csv_schema"))
    with pytest.raises(DeitTrainError, match=r"data.scan=sometimes: expected one of header, full, off"):
        check_config(tiny_config("data=csv_schema", "data.folder=/x", "data.scan=sometimes"))


def test_a_source_whose_yaml_lists_only_its_own_keys_keys_the_teacher_cache_by_the_source(
    tiny_config, demo_data, random_teacher_checkpoint, tmp_path
):
    """conf/data/<name>.yaml with `_target_` and the keys the user sets (docs/data.md): the keys every source has
    (skip_corrupt, ...) come from its class, and the teacher cache asks the source for them, not the config."""
    table = write_csv(demo_data, tmp_path / "table")
    cfg = tiny_config(
        *hard_distill_from(random_teacher_checkpoint),
        f"teacher.cache={tmp_path / 'cache'}",
    )
    yaml = {"_target_": f"{CSVSource.__module__}.CSVSource", "folder": str(table), "batch_size": 16, "num_workers": 0}
    with open_dict(cfg):
        cfg.data = OmegaConf.create(yaml)
    assert "skip_corrupt" not in cfg.data
    task = Classify()
    [callback] = task.build(cfg, task.datamodule(cfg, build_source(cfg.data))).callbacks
    assert callback.settings.config["skip_corrupt"] is False and callback.settings.config["global_batch"] == 16
