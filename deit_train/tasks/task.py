"""A task: what a run trains. Chosen by conf/task/<name>.yaml (its `task` node names the class with `_target_`): its
fields are its config, `check` adds its rules to the schema's, and `build` returns the data module, the
LightningModule and any callbacks it needs. train.py runs whichever task it is given.
"""

from dataclasses import dataclass, field

import lightning as L
from omegaconf import DictConfig

from deit_train.data import DeiTDataModule
from deit_train.schema import OneOf, check_fields, checked, store_schema


@dataclass
class Built:
    datamodule: DeiTDataModule
    module: L.LightningModule
    callbacks: list[L.Callback] = field(default_factory=list)


@dataclass
class Task:
    # what the app returns to sweeps, and what best.ckpt and Optuna follow
    optimized_metric: str = "val/acc1"
    optimized_mode: str = checked("max", OneOf("max", "min"))

    def check(self, cfg: DictConfig) -> None:
        """The rules of this task's fields (`checked`); subclasses add rules across groups."""
        check_fields(cfg.task, type(self), "task")

    def build(self, cfg: DictConfig) -> Built:
        raise NotImplementedError


def register(name: str, task: type[Task]) -> None:
    """conf/task/<name>.yaml's schema, `<name>_schema`: the task's fields, typed, and its `_target_`."""
    store_schema("task", name, task)
