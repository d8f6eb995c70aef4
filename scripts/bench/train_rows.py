"""The train row: images/s of deit-train against (a) the same math as a bare PyTorch loop and (b) the official
DeiT training step; the teacher's share of the bare step; peak memory of deit-train and of the bare loop."""

import math
import time
import warnings

import timm
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from safetensors.torch import load_file
from timm.optim import create_optimizer_v2
from timm.utils import NativeScaler
from torch import nn

from bench.official import OfficialDistillationLoss
from bench.setting import Bench
from bench.timing import Run, StepTimer, autocast, free_memory, synchronize
from deit_train.models.student import VIT_ARCHITECTURE_FIELDS, build_student, forward_heads
from deit_train.teacher import Teacher, build_teacher_network

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
}


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


def bare_train(bench: Bench, cfg: DictConfig) -> tuple[Run, float]:
    """The same step written by hand with the app's builders, teacher precision and optimizer, no sync inside the
    timed steps; then the teacher's forward alone on the same batches. Returns (run, teacher seconds / step seconds)."""
    preset, device = bench.preset, bench.device
    free_memory(device)
    torch.manual_seed(0)
    student = build_student(cfg.model, preset.num_classes).to(device).train()
    teacher = build_teacher_network(cfg.teacher, bench.class_names).to(device).eval()
    # held in the precision deit-train holds it in (tasks/module.py's setup: bf16 weights under bf16-mixed), so
    # that the overhead compares the same teacher forward
    Teacher(teacher).hold_in(preset.precision)
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


def official_train(bench: Bench, cfg: DictConfig) -> Run:
    """The official training step (main.py's setup, engine.py's train_one_epoch): timm student and teacher, hard
    distillation at alpha 1/2, tau 1 (the official defaults), timm's AdamW and NativeScaler, autocast, loss.item()
    and a device sync per step. In-memory batches, so no Mixup (augment=none everywhere here)."""
    preset, device = bench.preset, bench.device
    free_memory(device)
    torch.manual_seed(0)
    # the model config's ViT sizes, as build_student passes them to timm (the dry preset's tiny student)
    architecture = {k: cfg.model[k] for k in VIT_ARCHITECTURE_FIELDS if cfg.model[k] is not None}
    model = timm.create_model(
        cfg.model.name,
        pretrained=False,
        num_classes=preset.num_classes,
        drop_rate=0.0,
        drop_path_rate=0.0,
        img_size=preset.img_size,
        **architecture,
    )
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
