"""scripts/gpu_check.sh and scripts/benchmark.py, dry: the GPU check's every step on the CPU at tiny sizes, so that the
first machine with a GPU runs a script that has run before."""

import importlib.util
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import CSVLogger

from deit_train.console import EpochSummary

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def benchmark():
    """scripts/benchmark.py, loaded as the command line runs it (it puts scripts/, and so its bench/ package,
    on sys.path)."""
    spec = importlib.util.spec_from_file_location("benchmark", REPO / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def parts(benchmark):
    """scripts/bench/'s modules, importable once scripts/benchmark.py is: setting (the Bench the rows get),
    run, timing."""
    names = ("setting", "run", "timing")
    return types.SimpleNamespace(**{name: importlib.import_module(f"bench.{name}") for name in names})


@pytest.mark.slow
def test_gpu_check_dry_run_skips_every_gpu_test_and_writes_every_figure(tmp_path, benchmark):
    # No CUDA for the script, even on a machine with a GPU: the dry run is what the suite tests.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    env.pop("DEIT_TRAIN_GPU_TEST_DEVICE", None)
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "a dry run" in output

    report = json.loads((tmp_path / "gpu_check.json").read_text())
    # Every GPU test was collected and skipped, none passed without a GPU; each skip says why.
    counts = report["gpu_tests"]
    assert counts["skipped"] >= 19 and counts["passed"] == counts["failed"] == 0, counts
    assert "needs CUDA" in (tmp_path / "pytest.txt").read_text()

    # Every figure of every row, finite; throughputs positive.
    (student,) = report["students"]
    figures = {**report["students"][student], **report["shared"]}
    expected = set(benchmark.FIGURES) - {"peak_train_memory_kib_per_image"}  # per image: a GPU's figure only
    assert expected <= set(figures), expected - set(figures)
    assert all(math.isfinite(value) for value in figures.values()), figures
    assert all(value > 0 for key, value in figures.items() if "_ips_" in key)
    assert set(report["seconds"]) == {f"{student}/{row}" for row in benchmark.STUDENT_ROWS} | set(benchmark.SHARED_ROWS)

    table = (tmp_path / "gpu_check.md").read_text()
    assert f"| figure | {student} |" in table and "--preset dry" in table
    for key in figures:
        assert benchmark.FIGURES[key][0] in table


def test_default_preset_is_one_of_the_choices(benchmark, monkeypatch):
    parser_defaults = {}

    def stop(preset, *args):
        parser_defaults["preset"] = preset
        raise SystemExit(0)

    monkeypatch.setattr(benchmark, "run_benchmark", stop)
    with pytest.raises(SystemExit):
        benchmark.main([])
    assert parser_defaults["preset"] in benchmark.PRESETS.values()


def test_a_failing_row_is_reported_and_the_other_rows_still_run_and_are_saved(benchmark):
    def broken(bench):
        raise RuntimeError("CUDA error: an illegal memory access\nmore detail")

    rows = {
        "first": lambda bench: {"train_ips_deit_train": 1.0},
        "broken": broken,
        "last": lambda bench: {"eval_ips_timm": 2.0},
    }
    saved = []
    preset = benchmark.PRESETS["dry"]
    report = benchmark.run_benchmark(preset, None, [], benchmark.torch.device("cpu"), saved.append, rows, {})
    assert report["errors"] == {"deit_small/broken": "RuntimeError: CUDA error: an illegal memory access"}
    assert report["students"]["deit_small"] == {"train_ips_deit_train": 1.0, "eval_ips_timm": 2.0}
    assert len(saved) == 3  # after every row, the failed one included
    table = benchmark.markdown(report, "dry", benchmark.FIGURES)
    assert "- deit_small/broken: `RuntimeError: CUDA error" in table


def test_markdown_has_a_column_per_student_and_formats_each_unit(benchmark, parts):
    report = {
        "setup": parts.run.setup(benchmark.PRESETS["gpu"], torch.device("cpu")),
        "students": {
            "deit_small": {"train_ips_deit_train": 1234.56, "framework_overhead": 0.031},
            "deit_base": {"train_ips_deit_train": 345.6, "cached_over_online": 5.25},
        },
        "shared": {"ips_per_worker_loader_hf": 210.0},
        "seconds": {"deit_small/train": 10.0, "deit_base/train": 5.0},
        "gpu_tests": {"passed": 18, "skipped": 1, "failed": 0},
    }
    table = benchmark.markdown(report, "gpu", benchmark.FIGURES)
    assert "| figure | deit_small | deit_base |" in table
    assert "| train images/s, deit-train (the app's trainer, callbacks, loggers) | 1234.6 | 345.6 |" in table
    assert "| framework overhead, 1 - deit-train / bare | 3.1 % |  |" in table
    assert "| teacher.cache speed-up, cached / online |  | 5.25x |" in table
    assert "| input images/s per worker, deit-train, HF Arrow (save_to_disk) | 210.0 |" in table
    assert "18 passed, 1 skipped, 0 failed" in table and "Measured in 15 s" in table


def test_the_deit_train_row_runs_the_trainer_callbacks_and_loggers_the_app_builds(
    benchmark, parts, monkeypatch, tmp_path
):
    built = []
    setting = parts.setting
    original = setting.build_trainer
    monkeypatch.setattr(setting, "build_trainer", lambda *args: built.append(original(*args)) or built[-1])
    preset = benchmark.PRESETS["dry"]
    device = torch.device("cpu")
    batches = setting.make_batches(preset, 8, device, 4)
    bench = setting.Bench(preset, "deit_small", 8, device, tmp_path, batches)
    run = bench.deit_train(bench.config(cache=True))
    (trainer,) = built
    kinds = (ModelCheckpoint, LearningRateMonitor, ProgressBar, EpochSummary, parts.timing.TimerCallback)
    assert all(any(isinstance(c, kind) for c in trainer.callbacks) for kind in kinds), trainer.callbacks
    assert any(type(c).__name__ == "TeacherCacheCallback" for c in trainer.callbacks)  # the task's own
    assert any(isinstance(logger, CSVLogger) for logger in trainer.loggers)
    assert trainer.global_step == preset.warmup + preset.steps + 1 and run.ips > 0
