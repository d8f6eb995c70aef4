"""Each task learns: its training loss falls over a few optimizer steps on a toy set of demo images, trained through
the real `train(cfg)` and read back from what the run logged (the CSV logger's metrics.csv). The same runs with the
learning rate at 0 (warm-up and floor too) leave the weights where they started, and the same check must then say
"did not fall": that shows it can fail."""

import csv
from pathlib import Path
from statistics import mean

import pytest
import torch

from deit_train.train import train

# The toy set: 2 demo images per class (20 images, 16x16), trained full-batch, so each step sees the same images
# and the only change from step to step is the weights (and, for MIM, the drawn masks). What would hide learning
# in 24 steps is off: no augmentation (augment=none: resize and centre crop; no Mixup, CutMix, label smoothing,
# random erasing or repeated augmentation), no drop path, no weight decay; a constant rate from the first step (no
# warm-up, no cosine), taken as given (lr_batch_ref=null: the DeiT rule lr x batch / 512 would shrink it 25-fold).
TOY_DATA = ["data.image_size=16", "data.train_per_class=2", "data.val_per_class=1"]
STEPS = 24
LEARNABLE = [
    "augment=none",
    "model.drop_path_rate=0.0",
    "optim.weight_decay=0.0",
    "optim.lr_batch_ref=null",
    "optim.schedule=constant",
    "optim.warmup_epochs=0",
    "data.batch_size=20",
    f"trainer.max_epochs={STEPS}",  # one step an epoch
    f"trainer.check_val_every_n_epoch={STEPS}",  # validated once, at the end: the steps are what is measured
]
LEARNING = ["optim.lr=5e-3", "optim.warmup_lr=5e-3", "optim.min_lr=5e-3"]
FROZEN = ["optim.lr=0.0", "optim.warmup_lr=0.0", "optim.min_lr=0.0"]
# Seeds 0-2 end at 0.31-0.56 of where they start for the classification losses (0.11-0.42 for the distillation
# term alone) and 0.74-0.78 for MIM, whose masks are drawn afresh each step; at learning rate 0 the classification
# losses repeat exactly (ratio 1.000) and MIM's stay within 0.5 % (0.996-1.002).
WINDOW = 5
FALLS_TO = 0.85

TASKS = {
    "classify": ["loss=ce"],
    "hard_distill": ["loss=hard_distill"],
    "soft_distill": ["loss=soft_distill"],
    # hard distillation plus the feature term: the student's features learn the teacher's (losses.py FeatureLoss)
    "feature_pre_logits": ["loss=hard_distill", "loss.feature_weight=1", "loss.feature_target=pre_logits"],
    "feature_tokens": ["loss=hard_distill", "loss.feature_weight=0.01", "loss.feature_target=tokens"],
    "mim": ["task=mim", "task.mask_patch_size=4", "task.pictures=0"],
}
# A frozen resnet10t with random weights: its answers are a fixed function of the image, which the student's
# distillation head can learn (it names no classes and is not above chance: unchecked_order).
TEACHER = ["teacher=timm", "teacher.name=resnet10t", "teacher.unchecked_order=true"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads spin against each other and make these tiny
    steps about ten times slower; the numbers do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def logged_losses(run_dir: Path, key: str = "train/loss") -> list[float]:
    """`key` at every optimizer step, in order, from the run's CSV log (trainer.log_every_n_steps=1)."""
    (metrics,) = Path(run_dir).glob("csv/version_*/metrics.csv")
    with metrics.open() as file:
        rows = [row for row in csv.DictReader(file) if row.get(key)]
    assert [int(row["step"]) for row in rows] == list(range(len(rows))), "one value per step, every step"
    return [float(row[key]) for row in rows]


def assert_loss_falls(losses: list[float], window: int = WINDOW, falls_to: float = FALLS_TO) -> None:
    """The mean of the last `window` losses is below `falls_to` x the mean of the first `window`."""
    assert len(losses) >= 2 * window, f"only {len(losses)} steps logged"
    first, last = mean(losses[:window]), mean(losses[-window:])
    assert last < falls_to * first, (
        f"the loss did not fall: mean of the first {window} steps {first:.4f}, of the last {window} {last:.4f} "
        f"(ratio {last / first:.3f}, needs < {falls_to}); every step: {[round(x, 3) for x in losses]}"
    )


def train_toy(tiny_config, task: str, rates: list[str], teacher_checkpoint: Path) -> Path:
    """Trains `task` on the toy set at `rates`; returns the run directory."""
    overrides = [*LEARNABLE, *TASKS[task], *rates]
    if TASKS[task][0].endswith("distill"):
        overrides += [*TEACHER, f"teacher.checkpoint={teacher_checkpoint}"]
    cfg = tiny_config(*overrides, data=TOY_DATA)
    train(cfg)
    return Path(cfg.paths.output_dir)


@pytest.mark.parametrize("task", list(TASKS))
def test_the_loss_falls(task, tiny_config, random_teacher_checkpoint):
    run_dir = train_toy(tiny_config, task, LEARNING, random_teacher_checkpoint)
    losses = logged_losses(run_dir)
    assert len(losses) == STEPS
    assert_loss_falls(losses)
    if task.endswith("distill"):  # the distillation head learns the teacher's answers, not only the labels
        assert_loss_falls(logged_losses(run_dir, "train/loss_dist"))
    if task.startswith("feature"):  # and the student's features the teacher's
        assert_loss_falls(logged_losses(run_dir, "train/loss_feature"))


@pytest.mark.parametrize("task", list(TASKS))
def test_the_loss_does_not_fall_at_learning_rate_zero(task, tiny_config, random_teacher_checkpoint):
    """The check above, on a run whose optimizer steps change nothing: it must fail."""
    losses = logged_losses(train_toy(tiny_config, task, FROZEN, random_teacher_checkpoint))
    assert len(losses) == STEPS
    with pytest.raises(AssertionError, match="the loss did not fall"):
        assert_loss_falls(losses)


def test_debug_overfit_fits_its_batches(tiny_config):
    """debug=overfit, as a user runs it to check the step: Lightning puts a sequential sampler in place of ours
    (plain indices, not our (index, epoch, repeat) keys) and the loss on its 2 fixed batches falls."""
    epochs = 12  # 2 batches an epoch
    cfg = tiny_config(
        "debug=overfit",
        *LEARNING,
        "optim.lr_batch_ref=null",
        f"trainer.max_epochs={epochs}",
        f"trainer.check_val_every_n_epoch={epochs}",
    )
    train(cfg)
    losses = logged_losses(Path(cfg.paths.output_dir))
    assert len(losses) == 2 * epochs
    assert_loss_falls(losses)
