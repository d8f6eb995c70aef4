"""The callbacks people use, as config: early stopping (callbacks=early_stopping), Lightning's tuners refused in one
line, and the model summary's FLOPs against the closed form of a ViT's multiply-adds."""

import json
from pathlib import Path

import pytest
from lightning.pytorch.utilities.model_summary import ModelSummary

from deit_train.errors import error_boundary
from deit_train.run import Run
from deit_train.train import check_config, train

from .tiny import TINY_VIT_SIZES


@pytest.mark.parametrize(
    "target,named",
    [
        ("lightning.pytorch.callbacks.LearningRateFinder", "deit-train -m optim.lr="),
        ("lightning.pytorch.callbacks.BatchSizeFinder", "Set data.batch_size"),
    ],
)
def test_lightnings_tuners_are_refused_in_one_line_naming_what_to_do(tiny_config, capsys, target, named):
    cfg = tiny_config(f"+callbacks.tuner._target_={target}")
    with pytest.raises(SystemExit) as exit_status, error_boundary("deit-train"):
        check_config(cfg)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_status.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("deit-train: error: callbacks.tuner (") and named in lines[0]


def test_early_stopping_ends_a_run_that_stops_improving(tiny_config):
    """min_delta=1.0 (100 points) is never reached: the run stops after epoch 0 and `patience` more epochs."""
    cfg = tiny_config(
        "callbacks=early_stopping",
        "callbacks.early_stopping.patience=1",
        "callbacks.early_stopping.min_delta=1.0",
        "trainer.max_epochs=5",
    )
    assert cfg.callbacks.early_stopping.monitor == "val/acc1" and "checkpoints" in cfg.callbacks
    train(cfg)
    record = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert record["last_epoch"]["epoch"] == 1


def test_the_model_summary_counts_a_vit_predictions_flops(tiny_config):
    """FLOPs = 2 x multiply-adds (torch's counter) of one 16x16 image through the tiny distilled DeiT: patch
    embedding, per block qkv, attention (QK^T and AV), projection and MLP, then both heads."""
    cfg = tiny_config()
    run = Run(cfg)
    module = run.check().build(cfg, run.datamodule).module
    summary = ModelSummary(module, max_depth=1)
    patch, dim, depth = TINY_VIT_SIZES["patch_size"], TINY_VIT_SIZES["embed_dim"], TINY_VIT_SIZES["depth"]
    patches = (16 // patch) ** 2
    tokens = patches + 2  # class and distillation tokens
    per_block = tokens * dim * 3 * dim + 2 * tokens * tokens * dim + tokens * dim * dim + 2 * tokens * dim * 4 * dim
    multiply_adds = patches * 3 * patch * patch * dim + depth * per_block + 2 * dim * 10
    assert summary.total_flops == 2 * multiply_adds
    assert dict(zip(summary.layer_names, summary.flop_counts, strict=True))  # rows named
    student_row = sum(summary.flop_counts["student"].values())
    assert student_row == summary.total_flops  # the row of the network that predicts holds them


def test_a_run_without_loggers_trains_and_leaves_out_the_learning_rate_monitor(tiny_config, caplog):
    """~logger (no CSV, TensorBoard or W&B): Lightning's LearningRateMonitor refuses a trainer without a logger, which
    ended the run as "a bug" before it trained; now the monitor is left out, said, and the run's own records stay."""
    caplog.set_level("INFO", logger="deit_train")
    run = train(tiny_config("~logger", run="no_logger"))
    assert not run.trainer.loggers and "callbacks.lr_monitor) has nothing to write to" in caplog.text
    assert (Path(run.trainer.default_root_dir) / "metrics.json").is_file()
    assert not (Path(run.trainer.default_root_dir) / "csv").exists()


def test_epoch_checkpoints_are_saved_whole_as_resume_needs_them(tiny_config, caplog):
    """last.ckpt holds what resume=true continues from (the optimizer, the loops, the callbacks' states), saved so
    explicitly: Lightning's default said "`weights_only` was not set, defaulting to `False`" at every epoch."""
    import torch

    caplog.set_level("INFO")
    run = train(tiny_config(run="whole"))
    assert "`weights_only` was not set" not in caplog.text
    stored = torch.load(Path(run.trainer.default_root_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert {"optimizer_states", "lr_schedulers", "loops", "callbacks", "state_dict"} <= set(stored)
