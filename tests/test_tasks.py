"""A task is one object: a new one, defined here in a few lines, runs end to end through the unchanged train()."""

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import DictConfig, open_dict

from deit_train.errors import DeitTrainError
from deit_train.models.student import build_student
from deit_train.tasks.classify import Classify
from deit_train.tasks.task import Built
from deit_train.train import check_config, train

from .conftest import assert_metrics_reproduce, hard_distill_from


@dataclass
class LinearProbe(Classify):
    """A linear probe: the student's features stay as they are, only its heads learn the labels. A classifier
    (Classify's network, rebuilt for deit-eval by Classify.inference_model), trained otherwise."""

    def check(self, cfg: DictConfig) -> None:
        super().check(cfg)
        if cfg.loss.distillation_type != "none":
            raise DeitTrainError("a linear probe learns the labels alone: loss=ce")

    def build(self, cfg: DictConfig, datamodule) -> Built:
        built = super().build(cfg, datamodule)
        for name, parameter in built.module.student.named_parameters():
            parameter.requires_grad_(name.startswith(("head.", "head_dist.")))
        return built


def with_task(cfg: DictConfig, target: str) -> DictConfig:
    with open_dict(cfg):
        cfg.task = {"_target_": target, "optimized_metric": "val/acc1", "optimized_mode": "max"}
    return cfg


def test_a_new_task_defined_in_a_test_runs_end_to_end(tiny_config, demo_data):
    cfg = with_task(tiny_config("trainer.max_epochs=2"), f"{__name__}.LinearProbe")
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # as train() does before the task builds
    start = build_student(cfg.model, 10).state_dict()
    run = train(cfg)
    after = run.module.student.state_dict()
    changed = {key for key, tensor in start.items() if not torch.equal(after[key], tensor)}
    assert changed == {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}
    assert_metrics_reproduce(Path(cfg.paths.output_dir), demo_data)


def test_a_task_checks_its_own_rules(tiny_config, random_teacher_checkpoint):
    cfg = tiny_config(
        *hard_distill_from(random_teacher_checkpoint),
    )
    with pytest.raises(DeitTrainError, match="a linear probe learns the labels alone"):
        check_config(with_task(cfg, f"{__name__}.LinearProbe"))
    with pytest.raises(DeitTrainError, match="task._target_=tests.nowhere.Probe is not a deit-train task"):
        check_config(with_task(cfg, "tests.nowhere.Probe"))
