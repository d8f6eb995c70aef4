"""A task: what a run trains. Chosen by conf/task/<name>.yaml (its `task` node names the class with `_target_`): its
fields are its config, `check` adds its rules to the schema's, `datamodule` serves the run's data source (built once
by the run, or handed in by a test or the benchmark) as the task needs it, and `build` returns the LightningModule
and any callbacks it needs on that data. train.py runs whichever task it is given. A run's checkpoint records its
task (the run config's task._target_), and that task rebuilds the network it trained for inference
(`inference_model`: deit-eval, deit-predict and deit-export, through models/trained_model.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from deit_train.errors import DeitTrainError
from deit_train.schema import OneOf, check_fields, checked, store_schema

if TYPE_CHECKING:
    from deit_train.data.datamodule import DeiTDataModule
    from deit_train.data.sources import DataSource
    from deit_train.models.checkpoints import RunCheckpoint
    from deit_train.models.trained_model import TrainedModel


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

    @classmethod
    def inference_model(cls, run: RunCheckpoint, path: Path, ema: bool, classifier: bool) -> TrainedModel:
        """The network this task trained, rebuilt from its run's checkpoint `path` and in eval mode: its EMA weights
        with `ema`; `classifier=False` where a network without classifier heads serves (deit-export). A class
        method: the recorded task's fields are not needed, and an older run's may no longer all exist."""
        raise DeitTrainError(
            f"{path} is a checkpoint of a {cls.__name__} run, which says no network to infer with: its task class "
            f"defines no inference_model (tasks/task.py)"
        )


def task_class(target: object) -> type[Task] | None:
    """The Task subclass a task._target_ names, located without calling it; None where it names none (a module or
    class that is not there, a callable that is not a task): a run's config and a checkpoint's record alike."""
    from deit_train.targets import locate_class

    found = locate_class(target)
    return found if found is not None and issubclass(found, Task) else None


def task_of(run: RunCheckpoint, path: Path) -> type[Task]:
    """The task class a run's checkpoint records (its config's task._target_), or one line saying why none."""
    if run.task is None:
        raise DeitTrainError(
            f"{path} records no task (its run config has no task._target_): a checkpoint of an older deit-train, "
            f"which this one cannot rebuild; load it with the version that wrote it, or train from it again "
            f"(deit-train model.init={path} ...)"
        )
    task = task_class(run.task)
    if task is None:
        raise DeitTrainError(
            f"{path} was trained by task {run.task}, which is not a deit-train task here (task=classify, mim, ...): "
            f"load it where that task is installed"
        )
    return task


def register(name: str, task: type[Task]) -> None:
    """conf/task/<name>.yaml's schema, `<name>_schema`: the task's fields, typed, and its `_target_`."""
    store_schema("task", name, task)
