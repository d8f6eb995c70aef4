"""The CUDA-only paths, each against the same computation on the CPU in fp32: TF32 and cudnn.benchmark, fused AdamW,
pinned memory, bf16-mixed and 16-mixed (the GradScaler, an overflow injected), the teacher in channels_last under
CUDA autocast, compile=true, NCCL DDP on two GPUs, the teacher cache's device copies, EMA on the device, deit-eval,
and peak GPU memory per image.

`python -m pytest -m gpu` runs them (scripts/gpu_check.sh does, then the GPU benchmark); without CUDA each is
skipped with its reason. DEIT_TRAIN_GPU_TEST_DEVICE=cpu runs them with the CPU as the device under test: a way to
work on these tests without a GPU, which proves nothing about CUDA (the CUDA-only assertions then fail).

Tolerances (relative error ||ours - cpu|| / ||cpu|| of the loss and of the student's gradients as the optimizer
applies them): fp32 with TF32 off 1e-4; TF32 (what train() turns on) 1e-2; 16-mixed (10-bit mantissa) 2e-2;
bf16-mixed (7-bit mantissa) 5e-2. AdamW's first update, -lr (g / (|g| + eps) + wd w), turns a gradient's sign into
a full step however small the gradient, so it is checked against that formula on the step's own gradients (1e-4),
not across devices; SGD's update, linear in the gradients, is compared across devices.
"""

import csv
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from deit_train.data import DeiTDataModule
from deit_train.data.pixels import ErasableView, model_input
from deit_train.models.trained_model import load_trained_model
from deit_train.teacher import Encoding, Teacher, TeacherCache, build_teacher
from deit_train.tools.evaluate import evaluate, open_eval_folder
from deit_train.train import train

from .conftest import hard_distill_from, same

DEVICE = torch.device(os.environ.get("DEIT_TRAIN_GPU_TEST_DEVICE", "cuda"))
NO_CUDA = "needs CUDA: torch.cuda.is_available() is False on this machine (scripts/gpu_check.sh runs these on a GPU)"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason=NO_CUDA),
]
ACCELERATOR = "gpu" if DEVICE.type == "cuda" else "cpu"
CLASSES = [f"class{i}" for i in range(10)]


def steps(count: int) -> list[str]:
    """`count` optimizer steps of the tiny demo run, nothing random left but the seeded data views, recorded by
    CaptureSteps. No warm-up and a high rate: an update far above the weights' fp32 rounding, checkable."""
    return [
        "model.drop_path_rate=0.0",
        "optim.warmup_epochs=0",
        "optim.lr=1.0",
        f"+trainer.max_steps={count}",
        "+trainer.limit_val_batches=0",
        "+callbacks.capture._target_=tests.test_gpu.CaptureSteps",
    ]


TOLERANCE = {"exact": 1e-4, "32-true": 1e-2, "16-mixed": 2e-2, "bf16-mixed": 5e-2}


@pytest.fixture(autouse=True)
def restore_backend_flags():
    """train() turns TF32 and cudnn.benchmark on for the process; each test starts from PyTorch's defaults."""
    flags = (
        torch.get_float32_matmul_precision(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.allow_tf32,
    )
    yield
    torch.set_float32_matmul_precision(flags[0])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = flags[1], flags[2]


@pytest.fixture
def exact_fp32(monkeypatch):
    """fp32 as the CPU computes it: no TF32 in matmuls or convolutions, whatever train() asks. The module's setup
    turns TF32 on (tasks/module.py: fast_cuda_math, which sets the flags itself): it keeps only cuDNN's autotuner."""
    import deit_train.tasks.module as module

    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda precision: None)
    monkeypatch.setattr(module, "fast_cuda_math", lambda: setattr(torch.backends.cudnn, "benchmark", True))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32  # kept to the end


class CaptureSteps(L.Callback):
    """Per training step: the loss, the student's gradients as the optimizer applies them (unscaled), its weights
    before and after the step, the EMA's weights after its update, and what the GradScaler did."""

    def __init__(self, break_gradients_at: int | None = None) -> None:
        self.break_gradients_at = break_gradients_at  # an inf in one gradient at this step (an fp16 overflow)
        self.losses, self.grads, self.before, self.after, self.ema, self.scales = [], [], [], [], [], []
        self.hyper: list[dict[str, dict]] = []  # per step and parameter: lr, weight_decay, eps of its group
        self.dtypes: dict[str, set[torch.dtype]] = {"student": set(), "teacher": set()}  # of their layers' outputs

    def on_train_start(self, trainer, pl_module):
        """Record the dtype each Linear of the student and each Conv2d of the teacher computes in (under autocast
        a half type: the mixed-precision steps are checked to be mixed, not fp32 within the tolerance)."""
        networks = {
            "student": (pl_module.student, nn.Linear),
            "teacher": (getattr(pl_module, "teacher", None), nn.Conv2d),
        }
        for name, (network, kind) in networks.items():
            for layer in network.modules() if network is not None else []:
                if isinstance(layer, kind):
                    layer.register_forward_hook(lambda m, i, out, name=name: self.dtypes[name].add(out.dtype))

    @staticmethod
    def weights(module) -> dict[str, torch.Tensor]:
        return {name: p.detach().float().cpu().clone() for name, p in module.named_parameters()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.ema is not None and batch_idx > 0:
            self.ema.append(self.weights(pl_module.ema.module))  # the previous step's EMA update is done
        self.before.append(self.weights(pl_module.student))

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.break_gradients_at:
            next(p for p in pl_module.student.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        # Lightning unscales before this hook, except for an optimizer that unscales inside its step (fused AdamW)
        fused = getattr(optimizer, "_step_supports_amp_scaling", False)
        scale = scaler.get_scale() if scaler is not None and fused else 1.0
        self.grads.append({n: p.grad.float().cpu() / scale for n, p in pl_module.student.named_parameters()})
        self.scales.append(scaler.get_scale() if scaler is not None else None)
        names = {id(p): name for name, p in pl_module.student.named_parameters()}
        self.hyper.append(
            {
                names[id(p)]: {k: group.get(k) for k in ("lr", "weight_decay", "eps")}
                for group in optimizer.param_groups
                for p in group["params"]
                if id(p) in names
            }
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.after.append(self.weights(pl_module.student))

    def on_train_end(self, trainer, pl_module):
        if pl_module.ema is not None:
            self.ema.append(self.weights(pl_module.ema.module))
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.final_scale = scaler.get_scale() if scaler is not None else None


@dataclass
class Step:
    loss: float
    grads: dict[str, torch.Tensor]
    update: dict[str, torch.Tensor]  # weights after the step minus before
    before: dict[str, torch.Tensor]
    capture: CaptureSteps
    run: object


def app_step(tiny_config, device: torch.device, *overrides: str, run: str) -> Step:
    """The first optimizer step of deit-train's own train() (task, module, trainer, callbacks) on `device`."""
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    result = train(tiny_config(f"trainer.accelerator={accelerator}", *steps(1), *overrides, run=run))
    capture = captured(result)
    update = {name: capture.after[0][name] - capture.before[0][name] for name in capture.before[0]}
    return Step(capture.losses[0], capture.grads[0], update, capture.before[0], capture, result)


def captured(result) -> CaptureSteps:
    return next(c for c in result.trainer.callbacks if isinstance(c, CaptureSteps))


def relative_error(ours: dict[str, torch.Tensor] | float, reference: dict[str, torch.Tensor] | float) -> float:
    """||ours - reference|| / ||reference|| over all tensors together (or two numbers)."""
    if isinstance(reference, float):
        return abs(ours - reference) / abs(reference)
    a = torch.cat([ours[name].flatten() for name in reference])
    b = torch.cat([reference[name].flatten() for name in reference])
    return float((a - b).norm() / b.norm())


def assert_step_matches(ours: Step, cpu: Step, tolerance: float) -> None:
    errors = {"loss": relative_error(ours.loss, cpu.loss), "gradients": relative_error(ours.grads, cpu.grads)}
    assert max(errors.values()) < tolerance, errors


def assert_adamw_update(step: Step, clip: float | None = None) -> None:
    """The first AdamW update from the step's own gradients (clipped to norm `clip`): the bias-corrected moments are
    g and g^2, so w <- w (1 - lr wd) - lr g / (|g| + eps) (torch.optim.AdamW, fused or not)."""
    hyper = step.capture.hyper[0]
    grads = step.grads
    if clip is not None:  # torch.nn.utils.clip_grad_norm_, as Lightning calls it
        norm = torch.cat([g.flatten() for g in grads.values()]).norm()
        grads = {name: g * min(1.0, clip / (float(norm) + 1e-6)) for name, g in grads.items()}
    expected = {}
    for name, grad in grads.items():
        lr, decay, eps = hyper[name]["lr"], hyper[name]["weight_decay"], hyper[name]["eps"]
        expected[name] = -lr * decay * step.before[name] - lr * grad / (grad.abs() + eps)
    assert relative_error(step.update, expected) < 1e-4


@pytest.fixture
def distill(tiny_config, random_teacher_checkpoint):
    """tiny_config with hard distillation from a random resnet10t (a BatchNorm convnet, run in channels_last)."""

    def make(*overrides: str, run: str):
        return tiny_config(
            *hard_distill_from(random_teacher_checkpoint),
            *overrides,
            run=run,
        )

    return make


@pytest.fixture
def distill_step(tiny_config, random_teacher_checkpoint):
    """app_step of a soft-distillation run. Soft, not hard: the loss is smooth in the teacher's logits, where the
    argmax of a random teacher's near-tie could flip a target between devices and move a gradient by far more than
    the precision's error."""
    teacher = [
        "loss=soft_distill",
        "teacher=timm",
        "teacher.name=resnet10t",
        f"teacher.checkpoint={random_teacher_checkpoint}",
        "teacher.unchecked_order=true",
        "augment.reprob=1.0",  # every view erased: the device's noise is the CPU's (data/noise.py)
    ]

    def make(device: torch.device, *overrides: str, run: str) -> Step:
        return app_step(tiny_config, device, *teacher, *overrides, run=run)

    return make


# ---- one step against the CPU ----------------------------------------------------------------------------------


def test_fp32_step_with_fused_adamw_equals_the_cpu_step(distill_step, exact_fp32):
    cpu = distill_step(torch.device("cpu"), run="cpu")
    ours = distill_step(DEVICE, run="gpu")
    assert ours.run.trainer.optimizers[0].defaults.get("fused") is True  # tasks/module.py's CUDA default
    assert_step_matches(ours, cpu, TOLERANCE["exact"])
    assert_adamw_update(ours)
    assert_adamw_update(cpu)


def test_train_turns_on_tf32_and_cudnn_benchmark_and_the_step_stays_within_tf32_tolerance(distill_step):
    cpu = distill_step(torch.device("cpu"), run="cpu")
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.benchmark = False
    ours = distill_step(DEVICE, run="gpu")
    assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.benchmark
    assert_step_matches(ours, cpu, TOLERANCE["32-true"])
    assert_adamw_update(ours)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_step_matches_the_cpu_fp32_step(distill_step, precision):
    cpu = distill_step(torch.device("cpu"), run="cpu")
    ours = distill_step(DEVICE, f"trainer.precision={precision}", run="gpu")
    half = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}[precision]
    assert ours.capture.dtypes == {"student": {half}, "teacher": {half}}  # autocast on, the teacher under it too
    assert cpu.capture.dtypes == {"student": {torch.float32}, "teacher": {torch.float32}}
    if precision == "16-mixed":  # the GradScaler's first scale, 2**16
        assert ours.capture.scales[0] == 2.0**16
    assert_step_matches(ours, cpu, TOLERANCE[precision])
    assert_adamw_update(ours)  # not skipped by the scaler, and unscaled as the fused kernel should


def test_16_mixed_skips_an_overflowing_step_halves_the_scale_and_trains_on(tiny_config):
    result = train(
        tiny_config(
            f"trainer.accelerator={ACCELERATOR}",
            "trainer.precision=16-mixed",
            *steps(2),
            "+callbacks.capture.break_gradients_at=0",
        )
    )
    capture = captured(result)
    first, second = (
        {name: capture.after[i][name] - capture.before[i][name] for name in capture.before[i]} for i in (0, 1)
    )
    assert all(not delta.any() for delta in first.values())  # the overflowing step changed nothing
    assert any(delta.any() for delta in second.values())  # the next one trained
    assert capture.scales[0] == 2.0**16 and capture.final_scale == 2.0**15  # halved once, not grown
    assert not bool(result.module.loss_diverged)  # a scaler skip is not a diverged loss


def test_16_mixed_with_gradient_clipping_trains_unfused_and_matches_the_cpu(distill_step):
    clip = "trainer.gradient_clip_val=0.01"  # far below the gradients' norm: the clipping shapes the update
    cpu = distill_step(torch.device("cpu"), clip, "optim=sgd", run="cpu")
    ours = distill_step(DEVICE, clip, "optim=sgd", "trainer.precision=16-mixed", run="gpu")
    assert_step_matches(ours, cpu, TOLERANCE["16-mixed"])
    assert relative_error(ours.update, cpu.update) < TOLERANCE["16-mixed"]  # the clipped gradients, times -lr
    # AdamW: Lightning refuses to clip for a fused optimizer under the GradScaler, so it is left unfused there
    adamw = distill_step(DEVICE, clip, "trainer.precision=16-mixed", run="adamw")
    assert not adamw.run.trainer.optimizers[0].defaults.get("fused")
    assert_adamw_update(adamw, clip=0.01)


def test_compiled_student_gives_the_eager_loss_and_gradients(distill_step):
    """compile=true compiles: dynamo captured the student's graph and AOTAutograd its backward (a compile that did
    nothing would pass the comparison), in one graph without breaks; and the step equals the eager one."""
    from torch._dynamo.utils import counters

    eager = distill_step(DEVICE, run="eager")
    torch._dynamo.reset()
    counters.clear()
    compiled = distill_step(DEVICE, "compile=true", run="compiled")
    assert counters["stats"]["unique_graphs"] >= 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["aot_autograd"]["total"] >= 1, dict(counters["aot_autograd"])
    assert_step_matches(compiled, eager, TOLERANCE["32-true"])


# ---- the pieces on the device ----------------------------------------------------------------------------------


def test_the_training_loader_pins_its_batches_and_they_equal_the_unpinned_ones(tiny_config):
    batches = {}
    for pin in (True, False):
        cfg = tiny_config(f"data.pin_memory={pin}", run=f"pin{pin}")
        datamodule = DeiTDataModule(cfg.data, cfg.augment, cfg.model.img_size, seed=cfg.seed)
        datamodule.setup()
        loader = datamodule.train_dataloader()
        assert loader.pin_memory is pin
        batches[pin] = next(iter(loader))
    assert isinstance(batches[True][0], ErasableView)  # uint8 pixels and random erasing's draws (data/pixels.py)
    assert batches[True][0].pixels.dtype == torch.uint8
    assert batches[True][0].pixels.is_pinned() and not batches[False][0].pixels.is_pinned()
    for pinned, plain in zip(batches[True], batches[False], strict=True):
        assert same(pinned, plain)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_teacher_in_channels_last_under_cuda_autocast_matches_the_cpu_teacher(distill, precision):
    cfg = distill(run="teacher")
    cpu_teacher = build_teacher(cfg, CLASSES)
    teacher = build_teacher(cfg, CLASSES).to(DEVICE)
    convolution = next(m for m in teacher.modules() if isinstance(m, torch.nn.Conv2d))
    assert convolution.weight.device.type == DEVICE.type
    assert convolution.weight.is_contiguous(memory_format=torch.channels_last)  # .to(device) kept the layout
    images = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = cpu_teacher(images).logits
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    with torch.autocast(DEVICE.type, dtype=dtype, enabled=dtype is not None):
        logits = teacher(images.to(DEVICE)).logits
    if dtype is not None:
        assert logits.dtype == dtype  # the teacher ran under autocast
    centred = lambda x: x.float().cpu() - x.float().cpu().mean(dim=1, keepdim=True)  # noqa: E731
    assert relative_error({"z": centred(logits)}, {"z": centred(expected)}) < TOLERANCE[precision]


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_the_cached_step_decodes_on_the_device_without_a_host_sync(tmp_path, kind):
    """1000 classes (soft: the top-k encoding), keys on the host as the training step gets them: computing, storing
    and reading the teacher's outputs makes no device-to-host sync (torch.cuda.set_sync_debug_mode("error") raises
    on one); the epoch's file is written with one copy at its end."""
    encoding = Encoding.choose(kind, num_classes=1000, topk=None, tau=2.0)
    logits = [torch.randn(64, 1000, device=DEVICE) for _ in range(3)]
    keys = [torch.arange(192).view(64, 3) + 192 * i for i in range(3)]
    cache = TeacherCache(tmp_path, {"test": kind}, encoding, rank=0)
    results = []
    for _ in range(2):  # the run that computes, then a run that reads
        cache.start_epoch(0, num_batches=3, device=DEVICE)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")  # CUDA's detector warns at each synchronizing call: list them all
        try:
            with warnings.catch_warnings(record=True) as syncs:
                warnings.simplefilter("always")
                results.append([cache.teacher_logits(i, keys[i], lambda i=i: logits[i]) for i in range(3)])
        finally:
            torch.cuda.set_sync_debug_mode(0)
        syncs = [f"{w.filename}:{w.lineno}: {w.message}" for w in syncs if "synchroniz" in str(w.message)]
        assert not syncs, "\n".join(syncs)
        cache.end_epoch()
    assert all(t.device.type == DEVICE.type for t in results[0] + results[1])
    for computed, read in zip(*results, strict=True):
        assert torch.equal(computed, read)
    stored = load_file(str(cache.epoch_file(0)))
    assert all(t.device.type == "cpu" for t in stored.values())


def test_the_finished_batch_on_the_device_equals_the_cpus_bit_for_bit_without_a_host_sync():
    """Normalisation and random erasing on the device (data/pixels.py, the noise from data/noise.py): the same bits
    as the CPU reference, erased rectangles included, and no synchronizing call (a batch-wide pass, not a loop)."""
    from deit_train.data.pixels import normalize

    from .test_pixels import erased_batch

    batch = erased_batch(64, size=224)
    batch.erase[::4] = 0  # some views not erased
    cpu = model_input(batch)
    assert not torch.equal(cpu, normalize(batch.pixels))  # erased: the check below covers the noise
    pixels = batch.pixels.to(DEVICE)
    model_input(ErasableView(pixels, batch.erase))  # the first call copies its constants there once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_device = model_input(ErasableView(pixels, batch.erase))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert on_device.device.type == DEVICE.type
    assert torch.equal(on_device.cpu(), cpu)


@pytest.fixture
def teacher_calls(monkeypatch):
    """How often the teacher networks ran on training batches."""
    calls = {"train": 0}
    original = Teacher.run_networks

    def counting(self, images):
        calls["train"] += torch.is_grad_enabled()  # Lightning validates without grad
        return original(self, images)

    monkeypatch.setattr(Teacher, "run_networks", counting)
    return calls


@pytest.mark.parametrize("loss", ["hard_distill", "soft_distill"])
def test_teacher_cache_filled_on_the_gpu_holds_the_cpu_teachers_outputs_and_is_read_back(
    tiny_config, random_teacher_checkpoint, tmp_path, teacher_calls, loss
):
    teacher = [
        f"loss={loss}",
        "teacher=timm",
        "teacher.name=resnet10t",
        f"teacher.checkpoint={random_teacher_checkpoint}",
        "teacher.unchecked_order=true",
        f"teacher.cache={tmp_path / 'cache'}",
        f"trainer.accelerator={ACCELERATOR}",
        "data.pin_memory=true",
    ]
    filled = tiny_config(*teacher, run="fill")
    train(filled)
    assert teacher_calls["train"] == 5  # one epoch of 5 batches, computed on the device
    (file,) = (tmp_path / "cache").glob("*/epoch0000-rank0-batches*.safetensors")
    stored = load_file(str(file))

    # The same training views on the CPU, through the CPU teacher in fp32
    datamodule = DeiTDataModule(filled.data, filled.augment, filled.model.img_size, seed=filled.seed)
    datamodule.setup()
    cpu_teacher = build_teacher(filled, datamodule.class_names)
    loader = datamodule.train_dataloader()
    loader.sampler.set_epoch(0)
    with torch.no_grad():  # not a training batch: teacher_calls leaves it out
        expected = [cpu_teacher(model_input(view)).logits for view, _, _ in loader]  # the CPU's views: the same
    if loss == "hard_distill":
        agreement = (stored["labels"].long() == torch.stack([z.argmax(dim=1) for z in expected])).float().mean()
        assert agreement >= 0.95  # near-ties of a random teacher may flip under TF32
    else:
        assert relative_error({"z": stored["logits"].float()}, {"z": torch.stack(expected)}) < 1e-2

    read = tiny_config(*teacher, run="read")
    train(read)
    assert teacher_calls["train"] == 5  # the second run read every batch back onto the device


def test_ema_updates_on_the_device_as_the_formula_says(tiny_config):
    decay = 0.5
    result = train(tiny_config(f"trainer.accelerator={ACCELERATOR}", f"ema.decay={decay}", *steps(2)))
    capture = captured(result)
    assert all(p.device.type == DEVICE.type for p in result.module.ema.module.parameters())
    # timm's ModelEmaV3 copies the student at its first update, then ema <- decay ema + (1 - decay) student
    first, second = capture.ema
    for name, value in first.items():
        torch.testing.assert_close(value, capture.after[0][name], rtol=1e-6, atol=1e-7)
    for name, value in second.items():
        expected = decay * first[name] + (1 - decay) * capture.after[1][name]
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)


def test_deit_eval_on_the_gpu_scores_as_on_the_cpu_and_reports_throughput(tiny_config, demo_data, monkeypatch):
    cfg = tiny_config("trainer.max_epochs=1", run="run")
    train(cfg)
    checkpoint = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    trained = load_trained_model(checkpoint)
    on_device = evaluate(trained, open_eval_folder(demo_data, "val", trained), batch_size=16, num_workers=0)
    assert on_device["device"] == DEVICE.type and on_device["images_per_second"] > 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    trained = load_trained_model(checkpoint)
    on_cpu = evaluate(trained, open_eval_folder(demo_data, "val", trained), batch_size=16, num_workers=0)
    assert on_cpu["device"] == "cpu"
    two_images = 2 * 100 / on_cpu["images"]  # near-ties may fall the other way under TF32
    for head, scores in on_cpu["heads"].items():
        for name, value in scores.items():
            assert abs(on_device["heads"][head][name] - value) <= two_images + 1e-6, (head, name)


def test_peak_gpu_memory_per_image_is_reported_and_bf16_holds_less_than_fp32(
    tiny_config, distill, capsys, record_property
):
    """Peak memory of a distillation run per image, in fp32 and bf16-mixed: at least the training state, and less
    in bf16, where the activations and the frozen teacher (held in bf16, teacher.hold_in) take half the bytes."""
    if DEVICE.type != "cuda":
        pytest.skip("peak memory is CUDA's allocator statistic")
    peaks = {}
    for precision in ("32-true", "bf16-mixed"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        result = train(
            distill(
                f"trainer.accelerator={ACCELERATOR}",
                f"trainer.precision={precision}",
                "+trainer.limit_val_batches=0",
                run=precision,
            )
        )
        peaks[precision] = torch.cuda.max_memory_allocated()
        batch = result.datamodule.per_device_batch_size
        record_property(f"peak_gpu_memory_bytes_per_image_{precision}", peaks[precision] / batch)
        with capsys.disabled():
            print(
                f"\npeak GPU memory ({precision}, batch {batch}): {peaks[precision] / 2**20:.1f} MiB, "
                f"{peaks[precision] / batch / 2**10:.1f} KiB per image"
            )
        # at least what AdamW's training holds: weights, gradients and two moments, fp32
        parameters = sum(p.numel() for p in result.module.student.parameters())
        assert peaks[precision] >= 4 * 4 * parameters
        del result
    assert peaks["bf16-mixed"] < peaks["32-true"], peaks


# ---- two GPUs --------------------------------------------------------------------------------------------------


def step_losses(run_dir: Path) -> list[float]:
    with open(run_dir / "csv" / "version_0" / "metrics.csv") as file:
        return [float(row["train/loss"]) for row in csv.DictReader(file) if row.get("train/loss")]


@pytest.mark.skipif(
    DEVICE.type == "cuda" and torch.cuda.device_count() < 2,
    reason=f"needs 2 GPUs for NCCL DDP, this machine has {torch.cuda.device_count()}",
)
def test_two_gpu_nccl_ddp_trains_as_two_cpu_processes(tmp_path, cache_dir):
    from .test_ddp import run_ok

    gpu = (
        ["trainer=ddp", "trainer.devices=2", "trainer.precision=32-true"]  # trainer=ddp trains in bf16-mixed
        if DEVICE.type == "cuda"
        else ["trainer=ddp_cpu", "trainer.devices=2"]
    )
    same_views = "augment.reprob=1.0"  # every view erased: the device's noise is the CPU's (data/noise.py)
    output = run_ok(*gpu, "data.pin_memory=true", same_views, run_dir=tmp_path / "gpu", cache_dir=cache_dir)
    assert f"distributed_backend={'nccl' if DEVICE.type == 'cuda' else 'gloo'}" in output, output[-2000:]
    run_ok("trainer=ddp_cpu", "trainer.devices=2", same_views, run_dir=tmp_path / "cpu", cache_dir=cache_dir)
    ours, cpu = step_losses(tmp_path / "gpu"), step_losses(tmp_path / "cpu")
    assert len(ours) == len(cpu) == 5  # 80 images, global batch 16, rank 0's losses
    assert max(abs(a - b) / abs(b) for a, b in zip(ours, cpu, strict=True)) < TOLERANCE["32-true"]


@pytest.mark.skipif(
    DEVICE.type == "cuda" and torch.cuda.device_count() < 2,
    reason=f"needs 2 GPUs for NCCL DDP, this machine has {torch.cuda.device_count()}",
)
def test_two_gpu_distilled_preset_with_ema_mixup_and_the_cache_keeps_every_rank_equal(
    tmp_path, cache_dir, random_teacher_checkpoint
):
    """The documented command's path on two GPUs: trainer=ddp (bf16-mixed), hard distillation from a frozen
    BatchNorm teacher with the teacher cache, EMA, Mixup/CutMix and repeated augmentation; every rank ends with the
    same student and EMA, DDP ignores the teacher, and a second run reads the whole cache and ends equal."""
    from .test_ddp import assert_ranks_agree, run_ok, student_state

    devices = (
        ["trainer=ddp", "trainer.devices=2"] if DEVICE.type == "cuda" else ["trainer=ddp_cpu", "trainer.devices=2"]
    )
    overrides = [
        *devices,
        *hard_distill_from(random_teacher_checkpoint),
        f"teacher.cache={tmp_path / 'cache'}",
        "ema.decay=0.9",
        "augment.mixup=0.8",
        "augment.cutmix=1.0",
        "augment.repeated_aug=2",
        "trainer.max_epochs=2",
    ]
    for run in ("fill", "read"):
        probe = ["+callbacks.probe._target_=tests.probes.RankStates", f"+callbacks.probe.path={tmp_path / run}-ranks"]
        output = run_ok(*overrides, *probe, run_dir=tmp_path / run, cache_dir=cache_dir)
        assert_ranks_agree(tmp_path / f"{run}-ranks")
    assert output.count("5 batches read, 0 computed") == 4, output[-3000:]  # 2 epochs x 2 ranks
    first, second = student_state(tmp_path / "fill"), student_state(tmp_path / "read")
    if DEVICE.type == "cuda":  # cuDNN's autotuned patch embedding need not be bit-reproducible between runs
        assert relative_error(first, second) < TOLERANCE["bf16-mixed"]
    else:
        assert all(torch.equal(first[k], second[k]) for k in first)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-m", "gpu", "-rs"]))
