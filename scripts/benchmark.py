"""Throughput of deit-train against the floor of any framework and the official DeiT step, side by side in one run.

Every row uses the same student, teacher, batch, image size, precision and in-memory batches (on the device, so
that no row pays for a host-to-device copy). Per student:
  train    images/s of deit-train: the task's module (Classify.build_module), the trainer, callbacks and loggers
           the app builds from the config groups (run.build_trainer, into a temporary run directory), the
           teacher cache's callback; hard distillation. Against (a) the same math as a bare PyTorch loop (the
           app's student and teacher builders, the loss inline, the app's AdamW; framework_overhead =
           1 - deit-train / bare) and (b) the official DeiT training step written the official way (timm models,
           DistillationLoss running the teacher under no_grad, autocast, NativeScaler, a host sync per step).
           The teacher's share of the bare step, and peak memory (CUDA max allocated, or the process's peak RSS)
           of deit-train and of the bare loop, per image too.
  eval     images/s of our prediction path against the raw timm model under torch.inference_mode
  cache    a heavy convnet teacher (RegNetY-16GF, random weights) run online against read from teacher.cache,
           and the student alone (loss=ce): what the cache buys, and the teacher's share of deit-train's step
  compile  deit-train with compile=true: images/s against eager, and the seconds of its first (compiling) step
Shared:
  teacher_layout  the teacher's forward images/s, plain (NCHW, no_grad) against ours (channels_last, inference_mode)
  pipeline        input pipeline images/s per data-loader worker (JPEG decode + augment=deit) for ImageFolder, HF
                  Arrow and WebDataset shards (raw and re-encoded), each against the official DeiT pipeline in the
                  same run: scripts/benchmark_data.py's rows

A row is one module of scripts/bench/ (train_rows.py, eval_rows.py, ...): a function from a Bench (one
student's setting, bench/setting.py) to {figure: value}, and its figures' labels and units; bench/run.py lists
the rows and runs them, bench/report.py prints the report (Markdown, and pytest's JUnit counts), and
bench/official.py is the official DeiT loss.

    python scripts/benchmark.py [--preset cpu|gpu|dry] [--students deit_small ...] [--skip cache compile]
                                [--json out.json] [--markdown out.md]

Presets: cpu (the default without CUDA: DeiT-Ti, ResNet-18 teacher, batch 32, fp32, a few minutes on 2 cores), gpu
(the default with CUDA: the paper's DeiT-S and DeiT-B distilled, RegNetY-16GF teacher, the official per-GPU
batches, bf16-mixed), dry (the gpu preset's steps at tiny sizes, any machine, seconds: scripts/gpu_check.sh's dry
run, tested by tests/test_benchmark.py).
"""

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

# bench/ and benchmark_data.py lie beside this script; tests/tiny.py (the suite's tiny settings, which the dry
# preset uses) under the repository's root.
SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
if str(SCRIPTS.parent) not in sys.path:
    sys.path.append(str(SCRIPTS.parent))

from bench.presets import PRESETS  # noqa: E402
from bench.report import gpu_test_counts, markdown  # noqa: E402
from bench.run import FIGURES, SHARED_ROWS, STUDENT_ROWS, run_benchmark  # noqa: E402

from deit_train.console import quiet_console  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--students", nargs="+", help="model configs to measure (default: the preset's)")
    parser.add_argument("--batch", type=int, help="batch per device for every student")
    parser.add_argument("--precision", help="32-true, bf16-mixed or 16-mixed")
    parser.add_argument("--img-size", type=int)
    parser.add_argument("--teacher", help="timm name of the train rows' teacher")
    parser.add_argument("--cache-teacher", help="timm name of the cache rows' heavy teacher")
    parser.add_argument("--num-classes", type=int)
    parser.add_argument("--steps", type=int, help="timed steps")
    parser.add_argument("--repeats", type=int)
    rows = [*STUDENT_ROWS, *SHARED_ROWS]
    parser.add_argument("--rows", nargs="+", choices=rows, help="rows to run (default: all, less the preset's skips)")
    parser.add_argument("--skip", nargs="*", default=[], choices=rows, help="rows to leave out")
    parser.add_argument("--json", type=Path, help="write the report as JSON")
    parser.add_argument("--markdown", type=Path, help="write the report as a Markdown table")
    parser.add_argument("--gpu-tests", type=Path, help="pytest -m gpu's --junitxml report, counted in the report")
    args = parser.parse_args(argv)

    preset = PRESETS[args.preset]
    students = args.students or list(preset.students)
    batch = {s: args.batch or preset.students.get(s) or next(iter(preset.students.values())) for s in students}
    changes = {"students": batch}
    for name in ("precision", "img_size", "teacher", "cache_teacher", "num_classes", "steps", "repeats"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    preset = replace(preset, **changes)

    quiet_console()  # as the app: Lightning's notices off
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":  # as train() sets them
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.benchmark = True
    tests = gpu_test_counts(args.gpu_tests) if args.gpu_tests else None

    def save(report: dict) -> None:
        if tests is not None:
            report["gpu_tests"] = tests
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        if args.markdown:
            args.markdown.write_text(markdown(report, args.preset, FIGURES))

    report = run_benchmark(preset, args.rows, args.skip, device, save)
    save(report)
    print("\n" + markdown(report, args.preset, FIGURES))
    if report["errors"]:
        raise SystemExit(f"benchmark: {len(report['errors'])} row(s) failed: {', '.join(report['errors'])}")
    return report


if __name__ == "__main__":
    main()
