"""The rows, in the order they run and print, and the run over a preset's students: each row's figures,
seconds and the machine's load, saved after every row; a row that fails is recorded and the others still
run."""

import os
import platform
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import lightning as L
import timm
import torch

from bench import (
    cache_rows,
    compile_rows,
    eval_rows,
    pipeline_rows,
    real_run_rows,
    teacher_layout_rows,
    train_rows,
)
from bench.presets import Preset
from bench.setting import Bench, make_batches
from bench.timing import free_memory

Row = Callable[[Bench], dict[str, float]]
STUDENT_ROWS: dict[str, Row] = {
    "train": train_rows.train_rows,
    "eval": eval_rows.eval_rows,
    "cache": cache_rows.cache_rows,
    "compile": compile_rows.compile_rows,
}
# run once, with the first student's batch
SHARED_ROWS: dict[str, Row] = {
    "teacher_layout": teacher_layout_rows.teacher_layout_rows,
    "pipeline": pipeline_rows.pipeline_rows,
    "real_run": real_run_rows.real_run_rows,
}
# figure -> (label in the Markdown table, unit), in the rows' order
FIGURES: dict[str, tuple[str, str]] = {
    key: label
    for module in (train_rows, eval_rows, cache_rows, compile_rows, teacher_layout_rows, pipeline_rows, real_run_rows)
    for key, label in module.FIGURES.items()
}


def run_benchmark(
    preset: Preset,
    rows: list[str] | None,
    skip: list[str],
    device: torch.device,
    save=lambda report: None,
    student_rows: dict[str, Row] = STUDENT_ROWS,
    shared_rows: dict[str, Row] = SHARED_ROWS,
) -> dict:
    """{"setup", "students": {student: {figure: value}}, "shared": {figure: value}, "seconds": {row: seconds},
    "errors": {row: error}, "load": {row: load average}}. `rows`: the rows to run (None: all but the preset's
    skips for a student), less `skip`; `save(report)` after each row, so that a row that fails or a run cut
    short keeps the rows before it. `student_rows`, `shared_rows`: which rows there are (a test passes its own)."""
    report = {
        "setup": setup(preset, device),
        "students": {},
        "shared": {},
        "seconds": {},
        "errors": {},
        "load": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for index, (student, batch) in enumerate(preset.students.items()):
            count = max(preset.warmup + preset.steps + 1, preset.eval_batches)
            batches = make_batches(preset, batch, device, count)
            bench = Bench(preset, student, batch, device, Path(tmp), batches)
            # the shared rows run once, with the first student's batch
            chosen = {**student_rows, **(shared_rows if index == 0 else {})}
            wanted = rows if rows is not None else [r for r in chosen if r not in preset.skip.get(student, ())]
            figures = report["students"].setdefault(student, {})
            for name, row in chosen.items():
                if name not in wanted or name in skip:
                    continue
                key = f"{student}/{name}" if name in student_rows else name
                start = time.perf_counter()
                try:
                    values = row(bench)
                except Exception as error:  # the other rows still run; the exit status says it failed
                    traceback.print_exc()
                    report["errors"][key] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
                    values = {}
                seconds = time.perf_counter() - start
                (figures if name in student_rows else report["shared"]).update(values)
                report["seconds"][key] = seconds
                if hasattr(os, "getloadavg"):  # other work on the machine: lower, noisier numbers
                    report["load"][key] = os.getloadavg()[0]
                print(
                    f"{key}: {seconds:.1f} s  " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()),
                    flush=True,
                )
                save(report)
            del bench, batches
            free_memory(device)
    return report


def setup(preset: Preset, device: torch.device) -> dict:
    return {
        "students": preset.students,
        "teacher": preset.teacher,
        "cache_teacher": preset.cache_teacher,
        "img_size": preset.img_size,
        "precision": preset.precision,
        "num_classes": preset.num_classes,
        "timed_steps": preset.steps,
        "repeats": preset.repeats,
        "device": device_name(device),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "lightning": L.__version__,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        model = next(
            (
                line.split(":", 1)[1].strip()
                for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")
            ),
            model,
        )
    return f"{model} CPU, {os.cpu_count()} cores"
