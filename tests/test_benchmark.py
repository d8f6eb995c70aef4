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
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from lightning.pytorch.loggers import CSVLogger

from deit_train.checkpoint_io import EpochCheckpoints
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
    real_run = json.loads((tmp_path / "real_run.json").read_text())
    # Every GPU test was collected and skipped, none passed without a GPU; each skip says why.
    counts = report["gpu_tests"]
    assert counts["skipped"] >= 19 and counts["passed"] == counts["failed"] == 0, counts
    assert "needs CUDA" in (tmp_path / "pytest.txt").read_text()

    # Every figure of every row but the CPU's pipeline row (scripts/benchmark_data.py's), finite; throughputs
    # positive; the real run's in its own report.
    (student,) = report["students"]
    figures = {**report["students"][student], **report["shared"], **real_run["shared"]}
    pipeline = importlib.import_module("bench.pipeline_rows").FIGURES
    expected = set(benchmark.FIGURES) - {"peak_train_memory_kib_per_image"} - set(pipeline)  # per image: a GPU's
    assert expected <= set(figures), expected - set(figures)
    assert all(math.isfinite(value) for value in figures.values()), figures
    assert all(value > 0 for key, value in figures.items() if "_ips_" in key)
    rows = {f"{student}/{row}" for row in benchmark.STUDENT_ROWS} | set(benchmark.SHARED_ROWS) - {"pipeline"}
    assert set(report["seconds"]) | set(real_run["seconds"]) == rows
    assert real_run["shared"]["run_checkpoint_writes_per_epoch"] >= 1 and real_run["shared"]["run_val_s_per_epoch"] > 0

    table = (tmp_path / "gpu_check.md").read_text()
    assert f"| figure | {student} |" in table and "--preset dry" in table
    for key in figures:
        assert benchmark.FIGURES[key][0] in table
    assert "s in all; tests exit 0, benchmark exit 0, real run exit 0" in output


STAND_IN_NVIDIA_SMI = """#!/bin/sh
case "$*" in
  *--query-gpu*) echo "NVIDIA H100 80GB HBM3, 550.54.15" ;;
  *) echo "| NVIDIA-SMI 550.54.15    Driver Version: 550.54.15    CUDA Version: 12.4 |" ;;
esac
"""


def gpu_check(tmp_path: Path, timeout: float, **env_changes: str) -> tuple[subprocess.CompletedProcess, float]:
    """scripts/gpu_check.sh into tmp_path/out, with a stand-in nvidia-smi listing an H100 first on PATH."""
    import time

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "nvidia-smi").write_text(STAND_IN_NVIDIA_SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.update(env_changes)
    start = time.monotonic()
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), str(tmp_path / "out")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done, time.monotonic() - start


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine whose torch sees no GPU")
def test_gpu_check_fails_in_one_line_when_nvidia_smi_lists_a_gpu_torch_cannot_see(tmp_path):
    """A wheel built for a newer driver sees no GPU: the check must not take that for a machine without one (a dry
    run, exit 0). One line names the GPU, the driver's CUDA and the wheel's, and the fix."""
    done, seconds = gpu_check(tmp_path, timeout=180)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 2, done.stdout + done.stderr
    assert len(lines) == 1, lines
    (line,) = lines
    assert line.startswith("gpu_check: error: nvidia-smi lists 1 GPU(s) (NVIDIA H100 80GB HBM3, 550.54.15;")
    assert "driver CUDA 12.4" in line and f"built for CUDA {torch.version.cuda}" in line
    assert seconds < 180
    assert not (tmp_path / "out" / "pytest.txt").exists()  # no section ran


@pytest.mark.slow  # waits out a section's time limit: the whole suite runs it, the quick loop does not
def test_gpu_check_fails_a_section_that_runs_past_its_limit(tmp_path):
    """Each section runs under its own limit; past it, the check fails (timeout's 124), saying which."""
    limits = {f"GPU_CHECK_{name}_S": "1" for name in ("TESTS", "BENCH", "RUN")}
    done, seconds = gpu_check(tmp_path, timeout=120, CUDA_VISIBLE_DEVICES="", **limits)
    output = done.stdout + done.stderr
    assert done.returncode == 124, output
    for section in ("tests", "benchmark", "real run"):
        assert f"gpu_check: {section} ran past its 1 s limit" in output, output
    assert seconds < 60


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
        "shared": {"ips_per_worker_loader_hf": 210.0, "run_loader_wait_ms": 3.14159, "run_cuda_syncs_per_step": 1.0},
        "seconds": {"deit_small/train": 10.0, "deit_base/train": 5.0},
        "gpu_tests": {"passed": 18, "skipped": 1, "failed": 0},
    }
    table = benchmark.markdown(report, "gpu", benchmark.FIGURES)
    assert "| figure | deit_small | deit_base |" in table
    assert "| train images/s, deit-train (the app's trainer, callbacks, loggers) | 1234.6 | 345.6 |" in table
    assert "| framework overhead, 1 - deit-train / bare | 3.1 % |  |" in table
    assert "| teacher.cache speed-up, cached / online |  | 5.25x |" in table
    assert "| input images/s per worker, deit-train, HF Arrow (save_to_disk) | 210.0 |" in table
    assert "| real run: host ms between steps (loader wait, copy, input finish), per step | 3.1 |" in table
    assert "| real run: CUDA synchronizing calls per step (profiler, whole steps) | 1 |" in table
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
    kinds = (EpochCheckpoints, LearningRateMonitor, ProgressBar, EpochSummary, parts.timing.TimerCallback)
    assert all(any(isinstance(c, kind) for c in trainer.callbacks) for kind in kinds), trainer.callbacks
    assert any(type(c).__name__ == "TeacherCacheCallback" for c in trainer.callbacks)  # the task's own
    assert any(isinstance(logger, CSVLogger) for logger in trainer.loggers)
    assert trainer.global_step == preset.warmup + preset.steps + 1 and run.ips > 0


def test_the_bare_loop_holds_the_teacher_in_the_precision_deit_train_holds_it_in(benchmark, monkeypatch, tmp_path):
    """bf16-mixed: deit-train casts the frozen teacher's weights to bf16 once (Teacher.hold_in, in the module's
    setup); the bare loop must run the same teacher, or its forward (and the overhead figure) is another's."""
    train_rows = importlib.import_module("bench.train_rows")
    setting = importlib.import_module("bench.setting")
    teachers = []
    original = train_rows.build_teacher_network
    monkeypatch.setattr(train_rows, "build_teacher_network", lambda *a: teachers.append(original(*a)) or teachers[-1])
    preset = benchmark.PRESETS["dry"]
    assert preset.precision == "bf16-mixed"
    device = torch.device("cpu")
    bench = setting.Bench(preset, "deit_small", 8, device, tmp_path, setting.make_batches(preset, 8, device, 4))
    cfg = bench.config()
    train_rows.bare_train(bench, cfg)
    (teacher,) = teachers
    convolutions = [m for m in teacher.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convolutions and all(m.weight.dtype == torch.bfloat16 for m in convolutions)
    norms = [m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.weight.dtype == torch.float32 for m in norms)  # as hold_in keeps them
