"""A task: what a run trains. Chosen by conf/task/<name>.yaml (its `task` node names the class with `_target_`): its
fields are its config, `check` adds its rules to the schema's, `datamodule` serves the run's data source (built once
by the run, or handed in by a test or the benchmark) as the task needs it, and `build` returns the LightningModule
and any callbacks it needs on that data. train.py runs whichever task it is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from deit_train.schema import OneOf, check_fields, checked, store_schema

if TYPE_CHECKING:
    from deit_train.data.datamodule import DeiTDataModule
    from deit_train.data.sources import DataSource


@dataclass
class Built:
    datamodule: DeiTDataModule
    module: Any  # the LightningModule
    callbacks: list = field(default_factory=list)  # Lightning callbacks the task needs


@dataclass
class Task:
    # what the app returns to sweeps, and what best.ckpt and Optuna follow
    optimized_metric: str = "val/acc1"
    optimized_mode: str = checked("max", OneOf("max", "min"))

    def check(self, cfg: DictConfig) -> None:
        """The rules of this task's fields (`checked`); subclasses add rules across groups."""
        check_fields(cfg.task, type(self), "task")

    def check_data(self, source: DataSource) -> None:
        """The data's rules this task can check before its data module is imported (Lightning): by default the
        classes (a folder's train/ and val/ class folders, a dataset's label names), which need no image read."""
        source.labelled_classes()

    def datamodule(self, cfg: DictConfig, source: DataSource) -> DeiTDataModule:
        """The loaders of `source` for this task (labelled images and DeiT's transforms by default)."""
        from deit_train.data.datamodule import DeiTDataModule

        return DeiTDataModule(source, cfg.augment, img_size=cfg.model.img_size, seed=cfg.seed)

    def build(self, cfg: DictConfig, datamodule: DeiTDataModule) -> Built:
        raise NotImplementedError


def register(name: str, task: type[Task]) -> None:
    """conf/task/<name>.yaml's schema, `<name>_schema`: the task's fields, typed, and its `_target_`."""
    store_schema("task", name, task)
