"""The README's first command: the DeiT result in miniature on the generated demo data, on a CPU.

(a) trains a small convnet teacher, (b) a DeiT student without distillation, (c) the same student with
hard distillation from that teacher; then prints their validation accuracies side by side and writes the report of
the three runs (deit-report: report.md, report.csv, report.png in --out).

    python scripts/demo.py [--out outputs/demo] [extra overrides for every run ...]
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from deit_train.cli import layered
from deit_train.tools.report import report

TEACHER = "resnet18"


def run(name: str, out: Path, overrides: list[str]) -> tuple[dict, float]:
    run_dir = out / name
    command = [
        sys.executable,
        "-m",
        "deit_train",
        *layered(["experiment=demo", f"hydra.run.dir={run_dir}", *overrides]),  # the later value of a key wins
    ]
    print(f"\n=== {name}: {' '.join(command[2:])}", flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    last_epoch = json.loads((run_dir / "metrics.json").read_text())["last_epoch"]  # accuracies in percent
    return last_epoch, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run")
    args = parser.parse_args()
    common = ["callbacks.progress_bar=null", *args.overrides]

    # The teacher has its own recipe, as the paper's RegNetY had: a convnet takes a higher learning rate.
    teacher_recipe = ["optim.lr=8e-3"]
    teacher, teacher_s = run(
        "teacher", args.out, ["model=timm", f"model.name={TEACHER}", "loss=ce", *teacher_recipe, *common]
    )
    plain, plain_s = run("deit_ce", args.out, ["loss=ce", *common])
    teacher_ckpt = args.out / "teacher" / "checkpoints" / "best.ckpt"
    distilled, distilled_s = run(
        "deit_hard_distill",
        args.out,
        [
            "loss=hard_distill",
            "teacher=timm",
            f"teacher.name={TEACHER}",
            f"teacher.checkpoint={teacher_ckpt}",
            *common,
        ],
    )

    rows = [
        (f"teacher {TEACHER} (loss=ce)", teacher, teacher_s),
        ("DeiT student, no distillation (loss=ce)", plain, plain_s),
        ("DeiT student, hard distillation", distilled, distilled_s),
    ]
    fmt = lambda m, k: f"{m[k + '_percent']:6.2f}" if k + "_percent" in m else "     -"  # noqa: E731
    print(f"\n{'run':42s} {'acc1':>6s} {'cls':>6s} {'dist':>6s} {'agree':>6s} {'time':>6s}")
    for label, metrics, seconds in rows:
        print(
            f"{label:42s} {fmt(metrics, 'val/acc1')} {fmt(metrics, 'val/acc1_cls')} "
            f"{fmt(metrics, 'val/acc1_dist')} {fmt(metrics, 'val/agreement')} {seconds:5.0f}s"
        )
    gain = distilled["val/acc1_percent"] - plain["val/acc1_percent"]
    print(f"\nhard distillation vs none: {gain:+.2f} points top-1 (DeiT-Ti on ImageNet: +2.3, paper Table 5)")
    total = sum(seconds for _, _, seconds in rows)
    print(f"the three runs took {total:.0f} s ({total / 60:.0f} minutes): the README's demo time is their sum")
    summary = {"runs": {name: {**m, "seconds": s} for name, m, s in rows}, "total_seconds": total}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    # The three runs side by side: a table (report.md, report.csv) and their validation curves (report.png).
    written = report(args.out)
    print(f"\n{written['table']}\nreport of the three runs: {args.out / 'report.md'}, figure: {written['figure']}")


if __name__ == "__main__":
    main()
