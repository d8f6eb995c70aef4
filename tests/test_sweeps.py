"""Sweeps: a 2x2 multirun, an Optuna search, the SLURM and joblib launcher options. The plugins are the
`sweeps` extra; tests that need one skip cleanly without it."""

import json
import subprocess
import sys

import pytest
import yaml
from hydra import compose, initialize_config_dir

from deit_train.cli import layered
from deit_train.train import CONFIG_DIR

from .conftest import TINY_DEMO, TINY_RUN, assert_metrics_reproduce

TINY_STUDENT = ["model.patch_size=4", "model.embed_dim=32", "model.num_heads=2"]


def run_sweep(*overrides: str, tmp_path, cache_dir) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "deit_train.train",
        "--multirun",
        *layered([*TINY_RUN, *TINY_DEMO, *TINY_STUDENT, f"paths.cache_dir={cache_dir}",
                  f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides]),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)


@pytest.mark.slow
def test_multirun_gives_each_job_its_own_directory_and_metrics(tmp_path, cache_dir, demo_data):
    result = run_sweep("model.depth=1,2", "seed=0,1", tmp_path=tmp_path, cache_dir=cache_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    for job in jobs:
        assert_metrics_reproduce(job, demo_data)  # each job's metrics are its own weights'
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        assert any(o.startswith("model.depth=") for o in overrides)
    depths = {yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["model"]["depth"] for job in jobs}
    assert depths == {1, 2}


@pytest.mark.slow
def test_ddp_inside_a_multirun_spawns_and_keeps_each_job_in_its_directory(tmp_path, cache_dir):
    result = run_sweep(
        "model.depth=1,2",
        "trainer=ddp_cpu",
        "trainer.strategy=ddp_spawn",
        tmp_path=tmp_path,
        cache_dir=cache_dir,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]
    for job in ("0", "1"):
        assert (tmp_path / "sweep" / job / "metrics.json").is_file()
        assert sorted(p.name for p in (tmp_path / "sweep" / job / "checkpoints").iterdir()) == [
            "best.ckpt",
            "last.ckpt",
        ]


def test_relaunching_ddp_inside_a_local_multirun_is_refused(tmp_path, cache_dir):
    result = run_sweep("model.depth=1", "trainer=ddp_cpu", tmp_path=tmp_path, cache_dir=cache_dir)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Use trainer=ddp_spawn" in output, output
    assert "Traceback" not in output


@pytest.mark.slow
def test_optuna_search_reports_the_best_val_acc1(tmp_path, cache_dir):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    result = run_sweep(
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.sampler.n_startup_trials=2",
        "model.depth=1",
        tmp_path=tmp_path,
        cache_dir=cache_dir,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    trials = [
        json.loads((tmp_path / "sweep" / str(i) / "metrics.json").read_text())["val/acc1"] for i in range(3)
    ]
    assert results["best_value"] == pytest.approx(max(trials))
    assert set(results["best_params"]) == {"optim.lr", "optim.weight_decay"}


def compose_with_hydra(overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_slurm_launcher_asks_one_task_per_gpu():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_with_hydra(
        ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2"]
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (8, 8, 2)


def test_joblib_launcher_runs_jobs_in_parallel_processes():
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    cfg = compose_with_hydra(["hydra/launcher=local_parallel", "hydra.launcher.n_jobs=3"])
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 3


@pytest.mark.parametrize("task,metric,mode,direction", [("classify", "val/acc1", "max", "maximize"),
                                                        ("mim", "val/loss", "min", "minimize")])  # fmt: skip
def test_each_task_optimizes_its_own_metric_in_checkpoints_and_optuna(task, metric, mode, direction):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose_with_hydra([f"task={task}", "hparams_search=optuna"])
    assert (cfg.task.optimized_metric, cfg.task.optimized_mode) == (metric, mode)
    assert (cfg.callbacks.best_checkpoint.monitor, cfg.callbacks.best_checkpoint.mode) == (metric, mode)
    assert cfg.hydra.sweeper.direction == direction
