"""End to end on tiny configs: a run writes metrics.json and checkpoints whose numbers we re-derive."""

import csv
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from deit_train.data.pixels import model_input
from deit_train.data.sources import build_source
from deit_train.data.transforms import eval_transform
from deit_train.models.checkpoints import load_weights
from deit_train.models.student import build_student
from deit_train.train import train

from .conftest import hard_distill_from, save_safetensors

TEACHER = ["model=timm", "model.name=resnet10t", "loss=ce"]


def evaluate(model: torch.nn.Module, cfg) -> tuple[float, torch.Tensor]:
    """Top-1 of `model` on the val split, computed here without Lightning or torchmetrics."""
    dataset = build_source(cfg.data).split("val", eval_transform(cfg.augment, cfg.model.img_size))
    images = model_input(torch.stack([dataset[i][0] for i in range(len(dataset))]))
    labels = torch.tensor(dataset.targets)
    with torch.no_grad():
        logits = model.eval()(images)
    return (logits.argmax(dim=1) == labels).float().mean().item(), logits


def teacher_forwards(monkeypatch) -> list[int]:
    """The batch sizes the (first) teacher network is run on, from here on: build_teacher wrapped where the task
    imports it from when it builds (deit_train.teacher)."""
    from deit_train import teacher as teacher_package

    calls: list[int] = []
    original = teacher_package.build_teacher

    def counted_teacher(*args, **kwargs):
        teacher = original(*args, **kwargs)
        teacher.members[0].register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
        return teacher

    monkeypatch.setattr(teacher_package, "build_teacher", counted_teacher)
    return calls


def test_tiny_run_writes_metrics_and_checkpoints_that_reproduce_them(tiny_config):
    cfg = tiny_config()
    metrics = train(cfg).metrics
    run_dir = Path(cfg.paths.output_dir)
    written = json.loads((run_dir / "metrics.json").read_text())["last_epoch"]
    in_percent = {f"{k}_percent": 100 * v for k, v in metrics.items() if "/acc" in k}  # accuracies; the loss as is
    assert written == pytest.approx({"epoch": 0, **in_percent, "val/loss": metrics["val/loss"]})
    assert {"val/acc1_percent", "val/acc5_percent", "val/acc1_cls_percent", "val/acc1_dist_percent", "val/loss"} <= set(
        written
    )
    assert {"last.ckpt", "best.ckpt"} <= {p.name for p in (run_dir / "checkpoints").iterdir()}

    checkpoint = torch.load(f"{run_dir}/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["class_names"] == sorted(checkpoint["class_names"]) and len(checkpoint["class_names"]) == 10
    assert checkpoint["epoch"] == 0 and checkpoint["global_step"] == 80 // 16
    student = build_student(cfg.model, 10)
    student.load_state_dict(load_weights(f"{run_dir}/checkpoints/last.ckpt").state)
    acc1, _ = evaluate(student, cfg)  # timm's eval forward: the average of the two heads
    assert 100 * acc1 == pytest.approx(written["val/acc1_percent"], abs=1e-4)


def test_teacher_trained_with_model_timm_teaches_through_its_checkpoint(tiny_config):
    teacher_cfg = tiny_config(*TEACHER, run="teacher", student=[])
    teacher_metrics = train(teacher_cfg).metrics
    teacher_ckpt = f"{teacher_cfg.paths.output_dir}/checkpoints/best.ckpt"

    cfg = tiny_config(
        "loss=hard_distill", "teacher=timm", "teacher.name=resnet10t", f"teacher.checkpoint={teacher_ckpt}"
    )
    metrics = train(cfg).metrics
    # The teacher is scored on the same val data with the same eval transform: the same accuracy.
    assert metrics["val/teacher_acc1"] == pytest.approx(teacher_metrics["val/acc1"], abs=1e-6)
    # Agreement recomputed outside Lightning: how often the saved student's prediction is the teacher's.
    student = build_student(cfg.model, 10)
    student.load_state_dict(load_weights(f"{cfg.paths.output_dir}/checkpoints/last.ckpt").state)
    teacher = build_student(teacher_cfg.model, 10)
    teacher.load_state_dict(load_weights(teacher_ckpt).state)
    _, student_logits = evaluate(student, cfg)
    _, teacher_logits = evaluate(teacher, cfg)
    agreement = (student_logits.argmax(1) == teacher_logits.argmax(1)).float().mean().item()
    assert metrics["val/agreement"] == pytest.approx(agreement, abs=1e-6)

    student_ckpt = torch.load(f"{cfg.paths.output_dir}/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("teacher.") for k in student_ckpt["state_dict"])
    assert OmegaConf.create(student_ckpt["hyper_parameters"]["config"]).loss.distillation_type == "hard"


@pytest.mark.parametrize("loss", ["soft_distill", "hard_distill"])
def test_distillation_from_a_frozen_teacher_leaves_it_unchanged(tiny_config, tmp_path, loss):
    """Training with mixup and a BatchNorm teacher: the teacher's weights and running stats stay as loaded."""
    import timm

    state = save_safetensors(timm.create_model("resnet10t", num_classes=10), tmp_path / "teacher.safetensors")
    cfg = tiny_config(
        f"loss={loss}",
        "teacher=timm",
        "teacher.name=resnet10t",
        f"teacher.checkpoint={tmp_path / 'teacher.safetensors'}",
        "teacher.unchecked_order=true",  # a random teacher: at chance on the data
        "augment.mixup=0.8",
        "augment.cutmix=1.0",
    )
    run = train(cfg)
    after = run.module.teacher.members[0].network.state_dict()
    for key, tensor in state.items():
        torch.testing.assert_close(after[key], tensor, rtol=0, atol=0, msg=key)
    assert not [name for name, module in run.module.teacher.named_modules() if module.training]
    assert "val/teacher_acc1" in run.metrics


def test_teacher_runs_once_per_batch_in_training_and_validation(tiny_config, random_teacher_checkpoint, monkeypatch):
    calls = teacher_forwards(monkeypatch)
    cfg = tiny_config(
        *hard_distill_from(random_teacher_checkpoint),
        "+trainer.num_sanity_val_steps=0",
    )
    train(cfg)
    # Before training, its accuracy on the 40 validation images in one batch (labels.py); then 80 training images
    # in full batches of 16, 40 validation images in batches of 16: 5 + 3 forward passes.
    assert calls == [40] + [16] * 5 + [16, 16, 8]


def test_the_teachers_validation_outputs_are_computed_once_for_every_epoch(
    tiny_config, random_teacher_checkpoint, monkeypatch
):
    """The frozen teacher ran over every validation image every epoch, though its outputs never change: over 3 epochs
    (and Lightning's 2 sanity batches) it now meets each validation batch once, and every epoch's teacher accuracy
    is still the teacher's own, computed here without Lightning."""
    import timm
    from safetensors.torch import load_file

    calls = teacher_forwards(monkeypatch)
    cfg = tiny_config(
        *hard_distill_from(random_teacher_checkpoint),
        "trainer.max_epochs=3",
    )
    train(cfg)
    # the order check's 40 images; the sanity check's 2 batches of 16; then each epoch 5 training batches, and the
    # third validation batch (8 images) once, in the first epoch
    assert calls == [40, 16, 16] + [16] * 5 + [8] + [16] * 10
    teacher = timm.create_model("resnet10t", num_classes=10)
    teacher.load_state_dict(load_file(random_teacher_checkpoint))
    expected, _ = evaluate(teacher, cfg)
    with open(Path(cfg.paths.output_dir, "csv", "version_0", "metrics.csv")) as file:
        per_epoch = [float(row["val/teacher_acc1"]) for row in csv.DictReader(file) if row.get("val/teacher_acc1")]
    assert per_epoch == pytest.approx([expected] * 3, abs=1e-6)


def test_a_teacher_the_loss_does_not_use_is_refused_or_kept_for_the_metrics(
    tiny_config, random_teacher_checkpoint, monkeypatch
):
    """teacher=... with loss=ce trained without distillation, with a warning: now refused in one line naming the
    distillation losses; teacher.keep_for_metrics=true keeps it for val/teacher_acc1 and val/agreement, never run in
    training."""
    from deit_train.errors import DeitTrainError
    from deit_train.train import check_config

    teacher = ["teacher=timm", "teacher.name=resnet10t", f"teacher.checkpoint={random_teacher_checkpoint}"]
    with pytest.raises(DeitTrainError, match="uses no teacher: distil with loss=hard_distill or loss=soft_distill"):
        check_config(tiny_config("loss=ce", *teacher))
    calls = teacher_forwards(monkeypatch)
    cfg = tiny_config("loss=ce", *teacher, "teacher.keep_for_metrics=true", "teacher.unchecked_order=true")
    metrics = train(cfg).metrics
    assert {"val/teacher_acc1", "val/agreement"} <= set(metrics)
    assert calls == [40, 16, 16, 8]  # the order check, then validation only (sanity batches kept): no training


def test_repeated_augmentation_run_keeps_the_epoch_length(tiny_config):
    cfg = tiny_config(
        "augment.repeated_aug=3", "augment.repeated_aug_single_process=true", "augment.mixup=0.8", "augment.cutmix=1.0"
    )
    train(cfg)
    checkpoint = torch.load(
        Path(cfg.paths.output_dir, "checkpoints", "last.ckpt"), map_location="cpu", weights_only=True
    )
    assert checkpoint["global_step"] == 80 // 16  # len(dataset) draws an epoch, as without repeats


def test_last_checkpoint_follows_every_epoch_even_without_improvement(tiny_config):
    """Lightning's save_last writes only when val/acc1 improves; our last.ckpt must be the latest epoch."""
    cfg = tiny_config("trainer.max_epochs=3", "optim.lr=0", "optim.warmup_lr=0", "optim.min_lr=0")  # never improves
    train(cfg)
    checkpoints = Path(cfg.paths.output_dir, "checkpoints")
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    best = torch.load(checkpoints / "best.ckpt", map_location="cpu", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (2, 15)
    assert best["global_step"] == 5  # the first epoch's score was never beaten


def test_one_checkpoint_write_per_epoch_and_best_is_the_improving_epochs_file(tiny_config, monkeypatch):
    """best.ckpt and last.ckpt were two full writes (and fsyncs) per improving epoch; now best.ckpt is a hard link to
    the last.ckpt of the epoch that improved the metric, and later epochs' last.ckpt replace only last.ckpt."""
    from deit_train.checkpoint_io import AtomicCheckpointIO

    writes: list[str] = []
    save = AtomicCheckpointIO.save_checkpoint

    def counted(self, checkpoint, path, *args, **kwargs):
        writes.append(Path(path).name)
        return save(self, checkpoint, path, *args, **kwargs)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", counted)
    cfg = tiny_config(
        "trainer.max_epochs=3", "callbacks.checkpoints.monitor=val/loss", "callbacks.checkpoints.mode=min"
    )
    train(cfg)
    assert writes == ["last.ckpt"] * 3  # one write an epoch
    checkpoints = Path(cfg.paths.output_dir, "checkpoints")
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    best = torch.load(checkpoints / "best.ckpt", map_location="cpu", weights_only=True)
    with open(checkpoints.parent / "csv" / "version_0" / "metrics.csv") as file:
        losses = {int(row["epoch"]): float(row["val/loss"]) for row in csv.DictReader(file) if row.get("val/loss")}
    best_epoch = min(losses, key=losses.get)
    state = last["callbacks"][next(k for k in last["callbacks"] if k.startswith("EpochCheckpoints"))]
    assert best["epoch"] == best_epoch == state["best_epoch"]  # best.ckpt holds the best epoch, as last.ckpt records
    assert state["best_score"] == pytest.approx(losses[best_epoch])
    same_file = (checkpoints / "best.ckpt").stat().st_ino == (checkpoints / "last.ckpt").stat().st_ino
    assert same_file == (best_epoch == 2)


def test_interrupted_checkpoint_write_leaves_the_previous_one_intact(tmp_path):
    from deit_train.checkpoint_io import AtomicCheckpointIO

    class CrashWhileSaving:
        def __reduce__(self):
            raise KeyboardInterrupt("killed while writing")

    io = AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(1000)}, "epoch": 1}, target)
    before = target.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "crash": CrashWhileSaving()}, target)
    assert target.read_bytes() == before
    assert torch.load(target, weights_only=True)["epoch"] == 1
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]  # no staging file left behind


def test_trainer_config_uses_the_atomic_checkpoint_writer(tiny_config):
    from hydra.utils import instantiate

    from deit_train.checkpoint_io import AtomicCheckpointIO
    from deit_train.run import choose_precision

    cfg = tiny_config()
    choose_precision(cfg)  # trainer.precision=auto, as the run decides it
    trainer = instantiate(cfg.trainer, logger=False)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_config, monkeypatch):
    from deit_train.errors import DeitTrainError
    from deit_train.losses import DistillationLoss

    original, calls = DistillationLoss.combine, []

    def diverging(self, *args, **kwargs):
        calls.append(1)
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if len(calls) > 7 else loss  # NaN from step 8, in the second epoch

    monkeypatch.setattr(DistillationLoss, "combine", diverging)
    cfg = tiny_config("trainer.max_epochs=3", "trainer.log_every_n_steps=50")  # checked before the save at least
    with pytest.raises(DeitTrainError, match="NaN or inf"):
        train(cfg)
    last = torch.load(Path(cfg.paths.output_dir, "checkpoints", "last.ckpt"), map_location="cpu", weights_only=True)
    assert last["global_step"] == 5  # the first epoch's, written before the divergence
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())
    assert not Path(cfg.paths.output_dir, "metrics.json").exists()


def test_ema_with_decay_zero_is_the_student_itself(tiny_config):
    """Closed form: an EMA with decay 0 equals the latest weights, so its accuracy equals the student's."""
    cfg = tiny_config("ema.decay=0.0")
    metrics = train(cfg).metrics
    assert metrics["val_ema/acc1"] == pytest.approx(metrics["val/acc1"], abs=1e-6)
    state = torch.load(Path(cfg.paths.output_dir, "checkpoints", "last.ckpt"), weights_only=True)["state_dict"]
    for key in (k for k in state if k.startswith("student.")):
        torch.testing.assert_close(state["ema.module." + key.removeprefix("student.")], state[key])


def test_precision_accumulation_and_clipping_come_from_config(tiny_config):
    """Observed in the step: bf16 autocast, two micro-batches of 8 per optimizer step, gradients clipped."""
    cfg = tiny_config(
        "trainer.precision=bf16-mixed",
        "trainer.accumulate_grad_batches=2",
        "trainer.gradient_clip_val=0.001",  # far below the gradients' norm: clipping must act at every step
        "ema.decay=0.99",
        "+callbacks.probe._target_=tests.probes.StepProbe",
    )
    run = train(cfg)
    probe = next(c for c in run.trainer.callbacks if type(c).__name__ == "StepProbe")
    assert probe.logit_dtypes == {torch.bfloat16}
    assert probe.micro_batches == [8] * 10  # a global batch of 16 as 2 micro-batches of 8, 80 images
    assert len(probe.norms_at_step) == run.trainer.global_step == 5
    assert min(probe.norms_before_clipping) > 0.01
    assert max(probe.norms_at_step) <= 0.001 * (1 + 1e-4)
    assert {"val/acc1", "val_ema/acc1"} <= set(run.metrics)


def test_wandb_logger_works_offline_and_keeps_its_run_id_on_resume(tiny_config, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    overrides = (
        "logger=wandb",
        "logger.wandb.project=deit-tests",
        "+logger.wandb.tags=[tiny]",
        "resume=true",
    )
    cfg = tiny_config(*overrides)
    train(cfg)
    runs = sorted(Path(cfg.paths.output_dir, "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # Each offline run's folder holds run-<id>.wandb (its folder's name may carry a suffix after the id: wandb adds
    # "-1" when a second run starts within the same second).
    (record_file,) = runs[0].glob("run-*.wandb")
    run_id = record_file.stem.removeprefix("run-")
    # The offline run's record holds the hyperparameters, the validation metrics, the project and the tag.
    record = record_file.read_bytes()
    for expected in (b"distillation_type", b"val/acc1", b"deit-tests", b"tiny"):
        assert expected in record, expected

    cfg = tiny_config(*overrides, "trainer.max_epochs=2")  # resume=true in the same directory
    train(cfg)
    run_ids = {
        p.stem.removeprefix("run-") for p in Path(cfg.paths.output_dir, "wandb").glob("offline-run-*/run-*.wandb")
    }
    assert run_ids == {run_id}


def test_a_deit_train_run_teaches_as_the_network_its_checkpoint_records(tiny_config):
    """A distilled DeiT of custom sizes trained by deit-train, as the teacher of another run: built from the model
    config its checkpoint records (timm's deit_tiny by name alone has other sizes), at its image size, teaching with
    the average of its heads: the teacher scores what the first run scored. Another name or size is refused naming
    both; before, the weights went into teacher.name's network ("missing tensors")."""
    from deit_train.errors import DeitTrainError

    first_cfg = tiny_config(run="first")
    first = train(first_cfg).metrics
    best = f"{first_cfg.paths.output_dir}/checkpoints/best.ckpt"
    name, size = first_cfg.model.name, first_cfg.model.img_size
    teacher = ["loss=hard_distill", "teacher=timm", f"teacher.checkpoint={best}", "trainer.max_epochs=1"]

    recorded = f"teacher.checkpoint={best} is a deit-train run of {name} at {size} px"
    with pytest.raises(DeitTrainError) as refused:
        train(tiny_config(*teacher, run="other_name"))  # teacher=timm's own name, resnet50
    assert str(refused.value) == (
        f"{recorded}, not teacher.name=resnet50: set teacher.name={name} (a teacher.members entry: its name)"
    )
    with pytest.raises(DeitTrainError) as refused:
        train(tiny_config(*teacher, f"teacher.name={name}", f"teacher.img_size={size + 8}", run="other_size"))
    assert (
        str(refused.value) == f"{recorded}, but would see {size + 8} px views: set teacher.img_size={size} (a "
        "teacher.members entry: its img_size)"
    )

    metrics = train(tiny_config(*teacher, f"teacher.name={name}", run="second")).metrics
    assert metrics["val/teacher_acc1"] == pytest.approx(first["val/acc1"], abs=1e-6)


def test_loss_terms_are_logged_and_add_up_to_the_loss(tiny_config, random_teacher_checkpoint):
    """train/loss_cls, train/loss_dist and the KL of soft distillation beside train/loss, at every log step:
    loss = (1 - alpha) cls + alpha dist and dist = tau^2 KL (losses.py)."""
    import csv

    cfg = tiny_config(
        "loss=soft_distill",
        "loss.alpha=0.3",
        "loss.tau=2.0",
        "teacher=timm",
        "teacher.name=resnet10t",
        f"teacher.checkpoint={random_teacher_checkpoint}",
        "teacher.unchecked_order=true",
        "augment.mixup=0.8",
        "augment.cutmix=1.0",
    )
    train(cfg)
    (metrics_file,) = Path(cfg.paths.output_dir).glob("csv/version_0/metrics.csv")
    rows = [row for row in csv.DictReader(metrics_file.open()) if row.get("train/loss")]
    assert len(rows) == 5  # log_every_n_steps=1, 5 steps
    for row in rows:
        loss, cls, dist, kl = (float(row[f"train/{k}"]) for k in ("loss", "loss_cls", "loss_dist", "loss_kl"))
        assert loss == pytest.approx(0.7 * cls + 0.3 * dist, rel=1e-5)
        assert dist == pytest.approx(4.0 * kl, rel=1e-5)


def test_debug_fast_dev_run_takes_one_step(tiny_config):
    run = train(tiny_config("debug=fdr"))
    assert run.trainer.global_step == 1
    assert "val/acc1" in run.metrics


def test_optimizer_arguments_the_optimizer_refuses_are_named(tiny_config):
    from deit_train.errors import DeitTrainError

    with pytest.raises(DeitTrainError, match=r"optim.name=adamw refused its settings: .*beta.*optim.kwargs: "):
        train(tiny_config("+optim.kwargs.betas=[2,3]"))
    assert not Path(tiny_config().paths.output_dir).exists()  # refused before it trained: no run directory left


@pytest.mark.slow
def test_compile_with_ema_evaluates_the_emas_own_weights(tiny_config, demo_data):
    """compile=true with an EMA (on in the distilled presets): after a run, the EMA module the run validated gives
    the logits of its own weights evaluated uncompiled (it gave the student's backbone under the EMA's heads), and
    metrics.json holds what the saved EMA scores outside Lightning."""
    from deit_train.models.student import forward_heads

    from .conftest import assert_metrics_reproduce

    cfg = tiny_config("compile=true", "ema.decay=0.9", "optim.lr=5e-3", "trainer.max_epochs=2")
    run = train(cfg)
    ema = run.module.ema.module.eval()
    uncompiled = build_student(cfg.model, run.module.num_classes).eval()
    uncompiled.load_state_dict(ema.state_dict())
    val = build_source(cfg.data).split("val", eval_transform(cfg.augment, 16))
    images = model_input(torch.stack([val[i][0] for i in range(8)]))
    with torch.no_grad():
        torch.testing.assert_close(forward_heads(ema, images), forward_heads(uncompiled, images))
    assert_metrics_reproduce(Path(cfg.paths.output_dir), demo_data, ema=True)
