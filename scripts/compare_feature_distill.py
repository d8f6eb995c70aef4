"""Feature distillation in miniature on the demo data, over seeds: a DeiT student without distillation, with hard
distillation, and with hard distillation plus the feature term (losses.py FeatureLoss), each at every seed, from
one convnet teacher; the report (deit-report: mean and standard deviation over the seeds) goes to --out.

    python scripts/compare_feature_distill.py [--epochs 35] [--seeds 0 1 2] [--teacher-checkpoint CKPT] [overrides]

The feature term is the presets' (conf/experiment/deit_feature_distilled.yaml), ViTKD's mimicking, scaled to the demo:
the student's block 1 mimics the teacher's stage on its own 8x8 patch grid (ResNet-18's layer1, stride 4, 64
channels) with a weight that makes the term about the size of the label loss at the start (the summed squared
error over 64 tokens x 64 channels is about 10^3 there; ViTKD's 3e-5 does the same for 196 x 384-1024).
"""

import argparse
from pathlib import Path

from demo import TEACHER, run  # scripts/demo.py: one run of deit-train, its metrics and time

from deit_train.tools.report import report

FEATURES = [
    "loss.feature_weight=1e-3",
    "loss.feature_target=tokens",
    "loss.feature_block=1",
    "loss.feature_teacher_layer=1",  # resnet18's layer1: stride 4, the student's patch size: the same 8x8 grid
]
STUDENTS = {
    "ce": ["loss=ce"],
    "hard": ["loss=hard_distill"],
    "hard_features": ["loss=hard_distill", *FEATURES],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/feature_distill"))
    parser.add_argument("--epochs", type=int, default=35, help="for the teacher and every student (the demo's 35)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teacher-checkpoint", type=Path, help="a trained demo teacher (else one is trained first)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run")
    args = parser.parse_args()
    common = ["callbacks.progress_bar=null", f"trainer.max_epochs={args.epochs}", *args.overrides]

    teacher = args.teacher_checkpoint
    if teacher is None:  # the demo's teacher recipe (scripts/demo.py)
        run("teacher", args.out, ["model=timm", f"model.name={TEACHER}", "loss=ce", "optim.lr=8e-3", *common])
        teacher = args.out / "teacher" / "checkpoints" / "best.ckpt"
    teacher_overrides = ["teacher=timm", f"teacher.name={TEACHER}", f"teacher.checkpoint={teacher}"]
    for seed in args.seeds:  # seed by seed: a run stopped early still compares the three at the seeds it finished
        for name, overrides in STUDENTS.items():
            with_teacher = teacher_overrides if name != "ce" else []
            run(f"{name}/seed{seed}", args.out / "students", [*overrides, *with_teacher, f"seed={seed}", *common])
    written = report(args.out / "students")
    print(f"\n{written['table']}\nreport: {args.out / 'students' / 'report.md'}")


if __name__ == "__main__":
    main()
