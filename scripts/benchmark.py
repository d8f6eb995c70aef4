"""Throughput of deit-train against the floor of any framework and the official DeiT step, side by side in one run.

Every row uses the same student, teacher, batch, image size, precision and in-memory batches (on the device, so
that no row pays for a host-to-device copy). Per student:
  train    images/s of deit-train: the task's module (Classify.build_module), the trainer, callbacks and loggers
           the app builds from the config groups (train.build_trainer, into a temporary run directory), the
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

A row is one function from a Bench (one student's setting) to {figure: value}, registered in STUDENT_ROWS or
SHARED_ROWS; FIGURES gives each figure its label and unit in the Markdown table.

    python scripts/benchmark.py [--preset cpu|gpu|dry] [--students deit_small ...] [--skip cache compile]
                                [--json out.json] [--markdown out.md]

Presets: cpu (the default without CUDA: DeiT-Ti, ResNet-18 teacher, batch 32, fp32, a few minutes on 2 cores), gpu
(the default with CUDA: the paper's DeiT-S and DeiT-B distilled, RegNetY-16GF teacher, the official per-GPU
batches, bf16-mixed), dry (the gpu preset's steps at tiny sizes, any machine, seconds: scripts/gpu_check.sh's dry
run, tested by tests/test_benchmark.py).
"""

import argparse
import functools
import gc
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import lightning as L
import timm
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file
from timm.optim import create_optimizer_v2
from timm.utils import NativeScaler
from torch import nn
from torch.utils.data import DataLoader

from deit_train.console import quiet_console
from deit_train.models import build_student, forward_heads
from deit_train.models.student import VIT_ARCHITECTURE_FIELDS
from deit_train.tasks.classify import cache_callbacks
from deit_train.teacher import build_teacher_network
from deit_train.train import CONFIG_DIR, build_trainer, check_config

sys.path.insert(0, str(Path(__file__).parent))
import benchmark_data  # noqa: E402  (this folder's data benchmark, a script beside this one)

TINY_VIT = ["model.patch_size=4", "model.depth=2", "model.embed_dim=32", "model.num_heads=2"]


@dataclass(frozen=True)
class Preset:
    students: dict[str, int]  # model config name -> batch per device
    teacher: str  # timm name of the teacher of the train rows
    cache_teacher: str  # timm name of the heavy teacher of the cache rows
    img_size: int
    precision: str
    num_classes: int
    warmup: int  # steps before the timed ones
    steps: int  # timed steps
    repeats: int  # interleaved repeats of each measurement; the best counts
    eval_batches: int
    jpegs: int  # images of the pipeline row
    model_overrides: tuple[str, ...] = ()
    compile_backend: str | None = None  # None: torch.compile's own (inductor)
    skip: dict[str, tuple[str, ...]] = field(default_factory=dict)  # student -> rows it leaves out


PRESETS = {
    # A few minutes on a 2-core CPU.
    "cpu": Preset(
        students={"deit_tiny": 32},
        teacher="resnet18",
        cache_teacher="regnety_160",
        img_size=224,
        precision="32-true",
        num_classes=1000,
        warmup=2,
        steps=6,
        repeats=3,
        eval_batches=4,
        jpegs=96,
        # inductor compiles DeiT-Ti for minutes on 2 cores, and the compiled CPU step is no faster: --rows compile
        skip={"deit_tiny": ("compile",)},
    ),
    # The paper's sizes (Touvron et al. 2021: global batch 1024 on 224 px, hard distillation from RegNetY-16GF);
    # per GPU as the official README's commands: DeiT-S 4 GPUs x 256, DeiT-B 2 nodes x 8 GPUs x 64. bf16 autocast.
    # Budget: scripts/gpu_check.sh's 5 minutes on one GPU, tests included.
    "gpu": Preset(
        students={"deit_small": 256, "deit_base": 64},
        skip={"deit_base": ("compile",)},  # a second minute of compilation would not fit the 5 minutes
        teacher="regnety_160",
        cache_teacher="regnety_160",
        img_size=224,
        precision="bf16-mixed",
        num_classes=1000,
        warmup=5,
        steps=20,
        repeats=1,
        eval_batches=10,
        jpegs=256,
    ),
    # The gpu preset's rows at tiny sizes: the dry run that proves the script on any machine. aot_eager: dynamo and
    # AOTAutograd capture the student as under inductor, without a minute of C++ compilation on 2 cores.
    "dry": Preset(
        students={"deit_small": 8},
        teacher="resnet10t",
        cache_teacher="regnety_002",
        img_size=32,
        precision="bf16-mixed",
        num_classes=10,
        warmup=1,
        steps=2,
        repeats=1,
        eval_batches=2,
        jpegs=32,
        model_overrides=tuple(TINY_VIT),
        compile_backend="aot_eager",
    ),
}

# figure -> (label in the Markdown table, unit: ips | share | ratio | mib | kib | s)
FIGURES = {
    "train_ips_deit_train": ("train images/s, deit-train (the app's trainer, callbacks, loggers)", "ips"),
    "train_ips_bare_pytorch": ("train images/s, bare PyTorch loop", "ips"),
    "train_ips_official_deit": (
        "train images/s, official DeiT step (timm + DistillationLoss + NativeScaler)",
        "ips",
    ),
    "framework_overhead": ("framework overhead, 1 - deit-train / bare", "share"),
    "deit_train_over_official": ("deit-train / official DeiT step", "ratio"),
    "teacher_share_of_step": ("teacher's share of the bare training step", "share"),
    "peak_train_memory_mib": ("peak memory of training, deit-train (MiB)", "mib"),
    "peak_train_memory_mib_bare": ("peak memory of training, bare loop (MiB)", "mib"),
    "peak_train_memory_kib_per_image": ("peak memory per image of the batch, deit-train (KiB)", "kib"),
    "eval_ips_deit_train": ("eval images/s, deit-train", "ips"),
    "eval_ips_timm": ("eval images/s, raw timm", "ips"),
    "eval_overhead": ("eval overhead, 1 - deit-train / timm", "share"),
    "train_ips_heavy_teacher_online": ("train images/s, heavy teacher online", "ips"),
    "train_ips_heavy_teacher_cached": ("train images/s, heavy teacher read from teacher.cache", "ips"),
    "train_ips_student_alone": ("train images/s, student alone (loss=ce)", "ips"),
    "cached_over_online": ("teacher.cache speed-up, cached / online", "ratio"),
    "cached_over_student_alone": ("cached / student alone", "ratio"),
    "teacher_share_online": ("teacher's share of deit-train's step, online", "share"),
    "teacher_share_cached": ("teacher's share of deit-train's step, cached", "share"),
    "train_ips_compiled": ("train images/s, deit-train with compile=true", "ips"),
    "compiled_over_eager": ("compile=true / eager", "ratio"),
    "compile_first_steps_s": ("seconds of the warm-up steps with compile=true (compilation)", "s"),
    "teacher_ips_nchw_no_grad": ("teacher images/s, NCHW + no_grad", "ips"),
    "teacher_ips_channels_last_inference_mode": (
        "teacher images/s, channels_last + inference_mode (ours)",
        "ips",
    ),
    "ips_per_worker_official": ("input images/s per worker, official DeiT pipeline (torchvision ImageFolder + timm create_transform)", "ips"),
    "ips_per_worker_loader_imagefolder": ("input images/s per worker, deit-train, ImageFolder", "ips"),
    "ips_per_worker_loader_hf": ("input images/s per worker, deit-train, HF Arrow (save_to_disk)", "ips"),
    "ips_per_worker_loader_shards": ("input images/s per worker, deit-train, WebDataset shards as written", "ips"),
    "ips_per_worker_loader_shards_256": ("input images/s per worker, deit-train, shards re-encoded at 256 px", "ips"),
    "ips_per_worker_end_to_end_imagefolder": ("input images/s per worker, deit-train training a trivial student, ImageFolder", "ips"),
    "x_official_loader_imagefolder": ("deit-train, ImageFolder / official pipeline", "ratio"),
    "x_official_loader_hf": ("deit-train, HF Arrow (save_to_disk) / official pipeline", "ratio"),
    "x_official_loader_shards": ("deit-train, WebDataset shards as written / official pipeline", "ratio"),
    "x_official_loader_shards_256": ("deit-train, shards re-encoded at 256 px / official pipeline", "ratio"),
    "x_official_end_to_end_imagefolder": ("deit-train training a trivial student, ImageFolder / official pipeline", "ratio"),
    "shard_write_s_jpegs": ("deit-shard seconds, the pipeline JPEGs", "s"),
    "shard_write_s_jpegs_resize256": ("deit-shard seconds, the pipeline JPEGs re-encoded at 256 px", "s"),
    "shard_write_s_demo": ("deit-shard seconds, the demo set", "s"),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device: torch.device, precision: str):
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


class PeakMemory:
    """Peak memory from reset() to read(), MiB: CUDA's max allocated, or the process's peak RSS (Linux) on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        elif Path("/proc/self/clear_refs").exists():
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS

    def read(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        status = Path("/proc/self/status")
        if not status.exists():
            return float("nan")
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM"))
        return int(line.split()[1]) / 1024


class StepTimer:
    """Times steps warmup .. warmup + steps - 1, from the start of the first to the start of the one after them
    (so that everything a step does after its optimizer step counts), and the peak memory over them."""

    def __init__(self, warmup: int, steps: int, device: torch.device) -> None:
        self.warmup, self.steps, self.device = warmup, steps, device
        self.memory = PeakMemory(device)
        self.started = self.start = self.end = 0.0
        self.peak_mib = float("nan")

    def mark(self, step: int) -> None:
        if step == 0:
            self.started = time.perf_counter()
        if step == self.warmup:
            synchronize(self.device)
            self.start = time.perf_counter()
            self.memory.reset()
        elif step == self.warmup + self.steps:
            synchronize(self.device)
            self.end = time.perf_counter()
            self.peak_mib = self.memory.read()

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def warmup_seconds(self) -> float:
        return self.start - self.started


class TimerCallback(L.Callback):
    def __init__(self, timer: StepTimer) -> None:
        self.timer = timer

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.timer.mark(batch_idx)


@dataclass
class Run:
    ips: float
    peak_mib: float
    warmup_seconds: float = 0.0


@dataclass
class Bench:
    """What a row gets: the preset, one student and its batch, the device, the in-memory batches (images, labels,
    view keys) and a scratch directory holding the random teachers' checkpoints."""

    preset: Preset
    student: str
    batch: int
    device: torch.device
    tmp: Path
    batches: list = field(default_factory=list)
    runs: int = 0  # run directories made so far

    @property
    def class_names(self) -> list[str]:
        return [str(i) for i in range(self.preset.num_classes)]

    @property
    def timed_batches(self) -> list:
        """One epoch: warm-up, timed steps, and the step whose start ends the timing."""
        return self.batches[: self.preset.warmup + self.preset.steps + 1]

    def teacher_checkpoint(self, name: str) -> Path:
        """A random `name` on the preset's classes as .safetensors, written once."""
        path = self.tmp / f"teacher-{name}.safetensors"
        if not path.exists():
            torch.manual_seed(0)
            network = timm.create_model(name, num_classes=self.preset.num_classes)
            save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(path))
        return path

    def config(self, teacher: str | None = None, loss: str = "hard_distill", cache: bool = False,
               compile: bool = False) -> DictConfig:  # fmt: skip
        """deit-train's config for this setting, composed from conf/ into a fresh run directory."""
        preset, teacher = self.preset, teacher or self.preset.teacher
        self.runs += 1
        run_dir = self.tmp / f"run{self.runs}"
        teacher_overrides = ["teacher=none"]
        if loss != "ce":
            teacher_overrides = ["teacher=timm", f"teacher.name={teacher}",
                                 f"teacher.checkpoint={self.teacher_checkpoint(teacher)}"]  # fmt: skip
            if cache:
                teacher_overrides.append(f"teacher.cache={self.tmp / 'teacher_cache'}")
        overrides = [
            f"model={self.student}",
            f"model.img_size={preset.img_size}",
            *preset.model_overrides,
            "model.drop_path_rate=0.0",
            f"loss={loss}",
            *teacher_overrides,
            "augment=none",
            f"data.batch_size={self.batch}",
            f"compile={compile}",
            f"trainer.accelerator={'gpu' if self.device.type == 'cuda' else 'cpu'}",
            "trainer.devices=1",
            f"trainer.precision={preset.precision}",
            "trainer.max_epochs=1",
            # one log step (and divergence check) in the timed steps; the app's default is every 50 steps
            f"trainer.log_every_n_steps={preset.steps}",
            "+trainer.limit_val_batches=0",  # in-memory training batches only
            "+trainer.enable_model_summary=false",  # printed once before the first step: no cost to a step
            f"paths.output_dir={run_dir}",
            f"paths.cache_dir={self.tmp}",
        ]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose("train", overrides=overrides)

    def deit_train(self, cfg: DictConfig) -> Run:
        """deit-train's own objects on the in-memory batches: the task's module, the trainer with the callbacks and
        loggers of the config groups (into cfg's run directory, removed afterwards) and the task's callbacks."""
        task = check_config(cfg)  # the schema's and the task's rules, as train() checks them
        free_memory(self.device)
        torch.manual_seed(0)
        module = task.build_module(cfg, self.class_names)
        timer = StepTimer(self.preset.warmup, self.preset.steps, self.device)
        callbacks = cache_callbacks(cfg, module.teacher, module.num_classes) + [TimerCallback(timer)]
        output_dir = Path(cfg.paths.output_dir)
        trainer = build_trainer(cfg, output_dir, callbacks, module)
        try:
            trainer.fit(module, train_dataloaders=DataLoader(self.timed_batches, batch_size=None))
        finally:
            shutil.rmtree(output_dir, ignore_errors=True)
        return Run(self.preset.steps * self.batch / timer.seconds, timer.peak_mib, timer.warmup_seconds)


def make_batches(preset: Preset, batch: int, device: torch.device, count: int) -> list:
    """`count` batches (images and labels on the device, view keys on the host as the app's loader gives them); the
    images cycle through 4 distinct tensors to bound memory, the labels and view keys are each step's own (the
    teacher cache keys batches by them)."""
    generator = torch.Generator().manual_seed(0)
    shape = (batch, 3, preset.img_size, preset.img_size)
    images = [torch.randn(shape, generator=generator).to(device) for _ in range(min(4, count))]
    batches = []
    for step in range(count):
        labels = torch.randint(0, preset.num_classes, (batch,), generator=generator).to(device)
        ids = torch.arange(batch) + step * batch
        view_keys = torch.stack([ids, torch.zeros_like(ids), ids % len(images)], 1)  # on the host, as the app's
        batches.append((images[step % len(images)], labels, view_keys))
    return batches


# ---- rows of one student ---------------------------------------------------------------------------------------


def free_memory(device: torch.device) -> None:
    """Collect the previous run's objects (Lightning's hold references in cycles) before the next one measures."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bare_train(bench: Bench, cfg: DictConfig) -> tuple[Run, float]:
    """The same step written by hand with the app's builders and optimizer, no sync inside the timed steps; then the
    teacher's forward alone on the same batches. Returns (run, teacher seconds / step seconds)."""
    preset, device = bench.preset, bench.device
    free_memory(device)
    torch.manual_seed(0)
    student = build_student(cfg.model, preset.num_classes).to(device).train()
    teacher = build_teacher_network(cfg.teacher, bench.class_names).to(device).eval()
    fused = {"fused": True} if device.type == "cuda" else {}  # as tasks/module.py's configure_optimizers
    optimizer = create_optimizer_v2(student, opt="adamw", lr=5e-4, weight_decay=0.05, **fused)
    timer = StepTimer(preset.warmup, preset.steps, device)
    for step, (images, labels, _) in enumerate(bench.timed_batches):
        timer.mark(step)
        if step == preset.warmup + preset.steps:
            break
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, preset.precision):
            with torch.no_grad():
                teacher_logits = teacher(images.contiguous(memory_format=torch.channels_last))
            cls_logits, dist_logits = forward_heads(student, images)
            loss = 0.5 * F.cross_entropy(cls_logits, labels) + 0.5 * F.cross_entropy(
                dist_logits, teacher_logits.float().argmax(1)
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    timed = bench.timed_batches[preset.warmup : preset.warmup + preset.steps]
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad(), autocast(device, preset.precision):
        for images, _, _ in timed:
            teacher(images.contiguous(memory_format=torch.channels_last))
    synchronize(device)
    teacher_seconds = time.perf_counter() - start
    return Run(preset.steps * bench.batch / timer.seconds, timer.peak_mib), teacher_seconds / timer.seconds


class OfficialDistillationLoss(nn.Module):
    """facebookresearch/deit's losses.py DistillationLoss, as written there: the loss owns the teacher and runs it
    under no_grad on the step's inputs."""

    def __init__(self, base_criterion: nn.Module, teacher_model: nn.Module, distillation_type: str,
                 alpha: float, tau: float) -> None:  # fmt: skip
        super().__init__()
        self.base_criterion = base_criterion
        self.teacher_model = teacher_model
        self.distillation_type = distillation_type
        self.alpha = alpha
        self.tau = tau

    def forward(self, inputs, outputs, labels):
        outputs_kd = None
        if not isinstance(outputs, torch.Tensor):
            outputs, outputs_kd = outputs  # (class head, distillation head)
        base_loss = self.base_criterion(outputs, labels)
        if self.distillation_type == "none":
            return base_loss
        with torch.no_grad():
            teacher_outputs = self.teacher_model(inputs)
        if self.distillation_type == "soft":
            T = self.tau
            distillation_loss = F.kl_div(
                F.log_softmax(outputs_kd / T, dim=1), F.log_softmax(teacher_outputs / T, dim=1),
                reduction="sum", log_target=True,
            ) * (T * T) / outputs_kd.numel()  # fmt: skip
        else:
            distillation_loss = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
        return base_loss * (1 - self.alpha) + distillation_loss * self.alpha


def official_train(bench: Bench, cfg: DictConfig) -> Run:
    """The official training step (main.py's setup, engine.py's train_one_epoch): timm student and teacher, hard
    distillation at alpha 1/2, tau 1 (the official defaults), timm's AdamW and NativeScaler, autocast, loss.item()
    and a device sync per step. In-memory batches, so no Mixup (augment=none everywhere here)."""
    preset, device = bench.preset, bench.device
    free_memory(device)
    torch.manual_seed(0)
    architecture = {k: cfg.model[k] for k in VIT_ARCHITECTURE_FIELDS if cfg.model[k] is not None}
    model = timm.create_model(cfg.model.name, pretrained=False, num_classes=preset.num_classes, drop_rate=0.0,
                              drop_path_rate=0.0, img_size=preset.img_size, **architecture)  # fmt: skip
    model.set_distilled_training(True)  # timm's distilled ViT returns both heads in training
    model.to(device)
    teacher_model = timm.create_model(cfg.teacher.name, pretrained=False, num_classes=preset.num_classes)
    teacher_model.load_state_dict(load_file(cfg.teacher.checkpoint))
    teacher_model.to(device).eval()
    criterion = OfficialDistillationLoss(nn.CrossEntropyLoss(), teacher_model, "hard", alpha=0.5, tau=1.0)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=5e-4 * bench.batch / 512, weight_decay=0.05)
    with warnings.catch_warnings():  # without CUDA, the scaler says it disables itself
        warnings.simplefilter("ignore", UserWarning)
        loss_scaler = NativeScaler()
    model.train()
    timer = StepTimer(preset.warmup, preset.steps, device)
    for step, (samples, targets, _) in enumerate(bench.timed_batches):
        timer.mark(step)
        if step == preset.warmup + preset.steps:
            break
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, preset.precision):
            outputs = model(samples)
            loss = criterion(samples, outputs, targets)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise SystemExit(f"Loss is {loss_value}, stopping training")
        optimizer.zero_grad()
        loss_scaler(loss, optimizer, clip_grad=None, parameters=model.parameters(), create_graph=False)
        synchronize(device)
    return Run(preset.steps * bench.batch / timer.seconds, timer.peak_mib)


def train_rows(bench: Bench) -> dict[str, float]:
    """deit-train, the bare loop and the official step, interleaved (bare, official, ours, ...) so that drift in the
    machine's speed hits all three; the best repeat of each."""
    cfg = bench.config()
    bare, official, ours = [], [], []
    for _ in range(bench.preset.repeats):
        bare.append(bare_train(bench, cfg))
        official.append(official_train(bench, cfg))
        ours.append(bench.deit_train(bench.config()))
    best_ours = max(ours, key=lambda run: run.ips)
    best_bare = max((run for run, _ in bare), key=lambda run: run.ips)
    figures = {
        "train_ips_deit_train": best_ours.ips,
        "train_ips_bare_pytorch": best_bare.ips,
        "train_ips_official_deit": max(run.ips for run in official),
        "framework_overhead": 1 - best_ours.ips / best_bare.ips,
        "deit_train_over_official": best_ours.ips / max(run.ips for run in official),
        "teacher_share_of_step": min(share for _, share in bare),
        "peak_train_memory_mib": min(run.peak_mib for run in ours),
        "peak_train_memory_mib_bare": min(run.peak_mib for run, _ in bare),
    }
    if bench.device.type == "cuda":  # a process's RSS holds far more than the batch: per image only on a GPU
        figures["peak_train_memory_kib_per_image"] = figures["peak_train_memory_mib"] * 1024 / bench.batch
    return figures


def eval_rows(bench: Bench) -> dict[str, float]:
    """Our prediction path (the module's forward: the heads' average) against the raw timm model (whose eval forward
    averages them too), under inference_mode; interleaved, best of the repeats."""
    preset, device = bench.preset, bench.device
    cfg = bench.config()
    torch.manual_seed(0)
    module = check_config(cfg).build_module(cfg, bench.class_names).to(device).eval()
    images = [batch[0] for batch in bench.batches[: preset.eval_batches]]

    def measure(predict) -> float:
        with torch.inference_mode(), autocast(device, preset.precision):
            predict(images[0])
            synchronize(device)
            start = time.perf_counter()
            for batch in images:
                predict(batch)
            synchronize(device)
        return len(images) * bench.batch / (time.perf_counter() - start)

    ours, raw = [], []
    for _ in range(preset.repeats):
        ours.append(measure(module))
        raw.append(measure(module.student))
    return {
        "eval_ips_deit_train": max(ours),
        "eval_ips_timm": max(raw),
        "eval_overhead": 1 - max(ours) / max(raw),
    }


def cache_rows(bench: Bench) -> dict[str, float]:
    """The heavy teacher online against read from teacher.cache (filled by a first run), and the student alone."""
    heavy = bench.preset.cache_teacher
    bench.deit_train(bench.config(teacher=heavy, cache=True))  # fills the cache
    online, cached, alone = [], [], []
    for _ in range(bench.preset.repeats):
        online.append(bench.deit_train(bench.config(teacher=heavy)).ips)
        cached.append(bench.deit_train(bench.config(teacher=heavy, cache=True)).ips)
        alone.append(bench.deit_train(bench.config(loss="ce")).ips)
    online_ips, cached_ips, alone_ips = max(online), max(cached), max(alone)
    return {
        "train_ips_heavy_teacher_online": online_ips,
        "train_ips_heavy_teacher_cached": cached_ips,
        "train_ips_student_alone": alone_ips,
        "cached_over_online": cached_ips / online_ips,
        "cached_over_student_alone": cached_ips / alone_ips,
        # a step's time is 1 / ips: the teacher's share is what the student alone does not spend
        "teacher_share_online": 1 - online_ips / alone_ips,
        "teacher_share_cached": 1 - cached_ips / alone_ips,
    }


@contextmanager
def compile_backend(backend: str | None):
    """torch.compile with `backend` while the student is built (compile_student calls torch.compile)."""
    if backend is None:
        yield
        return
    original = torch.compile
    torch.compile = functools.partial(original, backend=backend)
    try:
        yield
    finally:
        torch.compile = original


def compile_rows(bench: Bench) -> dict[str, float]:
    """deit-train with compile=true against eager (best of the repeats each); the warm-up steps hold compilation."""
    compiled, eager = [], []
    for _ in range(bench.preset.repeats):
        eager.append(bench.deit_train(bench.config()).ips)
        with compile_backend(bench.preset.compile_backend):
            cfg = bench.config(compile=True)
            compiled.append(bench.deit_train(cfg))
        torch._dynamo.reset()  # the next repeat compiles again, as a fresh run does
    best = max(compiled, key=lambda run: run.ips)
    return {
        "train_ips_compiled": best.ips,
        "compiled_over_eager": best.ips / max(eager),
        "compile_first_steps_s": max(run.warmup_seconds for run in compiled),
    }


# ---- rows shared by the students -------------------------------------------------------------------------------


def teacher_layout_rows(bench: Bench) -> dict[str, float]:
    """The teacher's forward images/s: plain (NCHW, no_grad) against ours (channels_last, inference_mode)."""
    preset, device = bench.preset, bench.device
    teacher = build_teacher_network(bench.config().teacher, bench.class_names).to(device)
    images = [batch[0] for batch in bench.batches[: preset.eval_batches]]
    variants = {
        "teacher_ips_nchw_no_grad": (torch.contiguous_format, torch.no_grad),
        "teacher_ips_channels_last_inference_mode": (torch.channels_last, torch.inference_mode),
    }
    best = dict.fromkeys(variants, 0.0)
    for _ in range(preset.repeats):
        for name, (layout, grad_mode) in variants.items():
            teacher.to(memory_format=layout)
            with grad_mode(), autocast(device, preset.precision):
                teacher(images[0].contiguous(memory_format=layout))
                synchronize(device)
                start = time.perf_counter()
                for batch in images:
                    teacher(batch.contiguous(memory_format=layout))
                synchronize(device)
            best[name] = max(best[name], len(images) * bench.batch / (time.perf_counter() - start))
    return best


def pipeline_rows(bench: Bench) -> dict[str, float]:
    """scripts/benchmark_data.py's rows: images/s per data-loader worker (JPEG decode + augment=deit at the image
    size) for ImageFolder, HF Arrow and shards (raw and re-encoded at 256 px), each against the official DeiT
    pipeline, deit-train end to end, and deit-shard's seconds."""
    preset = bench.preset
    return benchmark_data.data_rows(preset.img_size, preset.jpegs, preset.repeats, batch=min(32, preset.jpegs // 4))


Row = Callable[[Bench], dict[str, float]]
STUDENT_ROWS: dict[str, Row] = {
    "train": train_rows,
    "eval": eval_rows,
    "cache": cache_rows,
    "compile": compile_rows,
}
SHARED_ROWS: dict[str, Row] = {"teacher_layout": teacher_layout_rows, "pipeline": pipeline_rows}


# ---- the run and its reports -----------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("model name")), model)  # fmt: skip
    return f"{model} CPU, {os.cpu_count()} cores"


def run_benchmark(
    preset: Preset, rows: list[str] | None, skip: list[str], device: torch.device, save=lambda report: None
) -> dict:
    """{"setup", "students": {student: {figure: value}}, "shared": {figure: value}, "seconds": {row: seconds},
    "errors": {row: error}}. `rows`: the rows to run (None: all but the preset's skips for a student), less `skip`;
    `save(report)` after each row, so that a row that fails or a run cut short keeps the rows before it."""
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
            chosen = {**STUDENT_ROWS, **(SHARED_ROWS if index == 0 else {})}
            wanted = (
                rows if rows is not None else [r for r in chosen if r not in preset.skip.get(student, ())]
            )
            figures = report["students"].setdefault(student, {})
            for name, row in chosen.items():
                if name not in wanted or name in skip:
                    continue
                key = f"{student}/{name}" if name in STUDENT_ROWS else name
                start = time.perf_counter()
                try:
                    values = row(bench)
                except Exception as error:  # the other rows still run; the exit status says it failed
                    traceback.print_exc()
                    report["errors"][key] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
                    values = {}
                seconds = time.perf_counter() - start
                (figures if name in STUDENT_ROWS else report["shared"]).update(values)
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


def gpu_test_counts(junit_xml: Path) -> dict[str, int]:
    """passed / skipped / failed of a pytest --junitxml report (scripts/gpu_check.sh's pytest -m gpu)."""
    root = ElementTree.parse(junit_xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    total, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    return {"passed": total - skipped - failed, "skipped": skipped, "failed": failed}


def format_value(value: float, unit: str) -> str:
    if not math.isfinite(value):
        return "n/a"
    return {
        "ips": f"{value:.1f}",
        "share": f"{100 * value:.1f} %",
        "ratio": f"{value:.2f}x",
        "mib": f"{value:.0f}",
        "kib": f"{value:.1f}",
        "s": f"{value:.1f}",
    }.get(unit, f"{value:.4g}")


def markdown(report: dict, preset_name: str) -> str:
    """The report as Markdown: the setting, a table with one column per student, the shared figures."""
    setup = report["setup"]
    students = list(report["students"])
    batches = ", ".join(f"{student} {batch}" for student, batch in setup["students"].items())
    lines = [
        f"`python scripts/benchmark.py --preset {preset_name}` on {setup['device']}: batch per device {batches}; "
        f"teacher {setup['teacher']} (heavy teacher {setup['cache_teacher']}); {setup['img_size']} px, "
        f"{setup['num_classes']} classes, {setup['precision']}; {setup['timed_steps']} timed steps, best of "
        f"{setup['repeats']}; torch {setup['torch']}, timm {setup['timm']}, lightning {setup['lightning']}.",
        "",
        "| figure | " + " | ".join(students) + " |",
        "|---|" + "---|" * len(students),
    ]
    figures = [key for key in FIGURES if any(key in report["students"][s] for s in students)]
    figures += sorted({key for s in students for key in report["students"][s]} - set(figures))
    for key in figures:
        label, unit = FIGURES.get(key, (key, ""))
        cells = [format_value(report["students"][s][key], unit) if key in report["students"][s] else ""
                 for s in students]  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if report["shared"]:
        lines += ["", "| figure (shared) | value |", "|---|---|"]
        for key, value in report["shared"].items():
            label, unit = FIGURES.get(key, (key, ""))
            lines.append(f"| {label} | {format_value(value, unit)} |")
    if report.get("errors"):
        lines += ["", "Rows that failed:"] + [
            f"- {key}: `{error}`" for key, error in report["errors"].items()
        ]
    total = sum(report["seconds"].values())
    lines += ["", f"Measured in {total:.0f} s."]
    if report.get("load"):
        low, high = min(report["load"].values()), max(report["load"].values())
        lines[-1] += (
            f" 1-minute load average after each row: {low:.1f} to {high:.1f} ({os.cpu_count()} cores)."
        )
    if "gpu_tests" in report:
        counts = report["gpu_tests"]
        lines[-1] += (
            f" `pytest -m gpu`: {counts['passed']} passed, {counts['skipped']} skipped, {counts['failed']} failed."
        )
    return "\n".join(lines) + "\n"


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
    parser.add_argument(
        "--rows", nargs="+", choices=rows, help="rows to run (default: all, less the preset's skips)"
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=rows, help="rows to leave out")
    parser.add_argument("--json", type=Path, help="write the report as JSON")
    parser.add_argument("--markdown", type=Path, help="write the report as a Markdown table")
    parser.add_argument(
        "--gpu-tests", type=Path, help="pytest -m gpu's --junitxml report, counted in the report"
    )
    args = parser.parse_args(argv)

    preset = PRESETS[args.preset]
    students = args.students or list(preset.students)
    batch = {
        s: args.batch or preset.students.get(s) or next(iter(preset.students.values())) for s in students
    }
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
            args.markdown.write_text(markdown(report, args.preset))

    report = run_benchmark(preset, args.rows, args.skip, device, save)
    save(report)
    print("\n" + markdown(report, args.preset))
    if report["errors"]:
        raise SystemExit(f"benchmark: {len(report['errors'])} row(s) failed: {', '.join(report['errors'])}")
    return report


if __name__ == "__main__":
    main()
