"""Throughput of deit-train against the floor of any framework, side by side in one run.

Rows (same student, teacher, batch, image size and in-memory batches everywhere):
  1. train images/s of deit-train (our LightningModule driven by the Lightning Trainer), hard distillation
  2. the same math as a bare PyTorch loop (timm student and teacher, the loss inline, AdamW);
     framework_overhead = 1 - (1) / (2)
  3. the share of a training step spent in the teacher's forward pass, and the teacher's forward speed in
     the plain layout vs ours (channels_last under inference_mode)
  4. eval images/s of our prediction path vs the raw timm model under torch.inference_mode
  5. input pipeline images/s per data-loader worker: JPEG decode + augment=deit at the image size
  6. peak memory of a training step
  7. train images/s with a heavy convnet teacher (RegNetY-16GF, random weights) run online vs read from
     teacher.cache, and of the student alone (loss=ce); cached / online is what the cache buys

    python scripts/benchmark.py [--preset cpu|gpu] [--precision bf16-mixed] [--json out.json]
"""

import argparse
import json
import os
import platform
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import numpy as np
import timm
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file

from deit_train.data import DeiTDataModule
from deit_train.models import build_student, compile_student
from deit_train.teacher import build_teacher_network
from deit_train.train import CONFIG_DIR, build_module

PRESETS = {
    # A few minutes on a 2-core CPU.
    "cpu": dict(
        model="deit_tiny",
        teacher="resnet18",
        batch=32,
        img_size=224,
        warmup=2,
        steps=6,
        eval_batches=4,
        jpegs=96,
        repeats=3,
    ),
    # The paper's sizes: DeiT-Ti with the RegNetY-16GF teacher.
    "gpu": dict(
        model="deit_tiny",
        teacher="regnety_160",
        batch=256,
        img_size=224,
        warmup=10,
        steps=30,
        eval_batches=20,
        jpegs=1024,
        repeats=2,
    ),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextmanager
def autocast(device: torch.device, precision: str):
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        yield


def config(
    args,
    teacher_checkpoint: Path,
    teacher: str | None = None,
    loss: str = "hard_distill",
    cache: str | None = None,
):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            "train",
            overrides=[
                f"model={args.model}",
                f"model.img_size={args.img_size}",
                "model.drop_path_rate=0.0",
                f"loss={loss}",
                "teacher=timm",
                f"teacher.name={teacher or args.teacher}",
                f"teacher.checkpoint={teacher_checkpoint}",
                "augment=none",
                f"data.batch_size={args.batch}",
                "paths.output_dir=.",
                "paths.cache_dir=.",
                f"compile={args.compile}",
                f"teacher.cache={cache or 'null'}",
            ],
        )


def make_models(cfg, num_classes: int):
    """Student and teacher through deit-train's own builders (the teacher from a random checkpoint)."""
    torch.manual_seed(0)
    student = build_student(cfg.model, num_classes)
    if cfg.compile:
        compile_student(student)
    teacher = build_teacher_network(cfg.teacher, [str(i) for i in range(num_classes)])
    return student, teacher


def lightning_train(cfg, batches, args, device) -> float:
    """Row 1: images/s of DeiTModule, built as deit-train builds it, under the Lightning Trainer (row 7: with
    teacher.cache set)."""
    torch.manual_seed(0)
    module = build_module(cfg, [str(i) for i in range(args.num_classes)])
    times = {}

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == args.warmup:
                synchronize(device)
                times["start"] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == args.warmup + args.steps - 1:
                synchronize(device)
                times["end"] = time.perf_counter()

    trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        max_steps=args.warmup + args.steps,
        max_epochs=1,
        precision=args.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[Timer()],
    )
    steps = batches[: args.warmup + args.steps]  # one epoch: the cache writes whole epochs
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(steps, batch_size=None))
    return args.steps * args.batch / (times["end"] - times["start"])


def bare_train(cfg, batches, args, device) -> tuple[float, float]:
    """Rows 2 and 3: the same step written by hand; returns (images/s, teacher share of the step)."""
    student, teacher = make_models(cfg, args.num_classes)
    student.to(device).train()
    teacher.to(device).eval()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.05)
    step_time = teacher_time = 0.0
    for index, (images, labels, _) in enumerate(batches[: args.warmup + args.steps]):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        synchronize(device)
        start = time.perf_counter()
        with autocast(device, args.precision):
            with torch.no_grad():
                teacher_logits = teacher(images)
            synchronize(device)
            teacher_done = time.perf_counter()
            cls_logits, dist_logits = student(images)
            loss = 0.5 * F.cross_entropy(cls_logits, labels) + 0.5 * F.cross_entropy(
                dist_logits, teacher_logits.argmax(1)
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        synchronize(device)
        if index >= args.warmup:
            step_time += time.perf_counter() - start
            teacher_time += teacher_done - start
    return args.steps * args.batch / step_time, teacher_time / step_time


def teacher_layouts(cfg, batches, args, device) -> dict[str, float]:
    """Teacher forward images/s: plain (NCHW, no_grad) against ours (channels_last, inference_mode)."""
    _, teacher = make_models(cfg, args.num_classes)
    teacher.to(device)
    images = [b[0].to(device) for b in batches[: args.eval_batches]]
    variants = {
        "teacher_ips_nchw_no_grad": (torch.contiguous_format, torch.no_grad),
        "teacher_ips_channels_last_inference_mode": (torch.channels_last, torch.inference_mode),
    }
    best = dict.fromkeys(variants, 0.0)
    for _ in range(args.repeats):
        for name, (layout, grad_mode) in variants.items():
            teacher.to(memory_format=layout)
            with grad_mode(), autocast(device, args.precision):
                teacher(images[0].contiguous(memory_format=layout))
                synchronize(device)
                start = time.perf_counter()
                for batch in images:
                    teacher(batch.contiguous(memory_format=layout))
                synchronize(device)
            best[name] = max(best[name], len(images) * args.batch / (time.perf_counter() - start))
    return best


def eval_throughput(cfg, batches, args, device) -> tuple[float, float]:
    """Row 4: (our prediction path, raw timm) images/s under inference_mode."""
    torch.manual_seed(0)
    module = build_module(cfg, [str(i) for i in range(args.num_classes)]).to(device).eval()
    raw = module.student  # the same timm model, called directly

    def measure(predict) -> float:
        images = [b[0].to(device) for b in batches[: args.eval_batches]]
        with torch.inference_mode(), autocast(device, args.precision):
            predict(images[0])
            synchronize(device)
            start = time.perf_counter()
            for batch in images:
                predict(batch)
            synchronize(device)
        return len(images) * args.batch / (time.perf_counter() - start)

    # Interleave the two to spread the machine's noise evenly; best of the repeats each.
    ours, timm_raw = [], []
    for _ in range(args.repeats):
        ours.append(measure(module))
        timm_raw.append(measure(raw))
    return max(ours), max(timm_raw)


def pipeline_throughput(cfg, args, workers: int) -> float:
    """Row 5: JPEG decode + augment=deit at img_size, images/s through the training loader with `workers` workers."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        deit_augment = compose(
            "train", overrides=["augment=deit", "paths.output_dir=.", "paths.cache_dir=."]
        ).augment
    with tempfile.TemporaryDirectory() as root:
        rng = np.random.default_rng(0)
        for split in ("train", "val"):
            for class_index in range(2):
                folder = Path(root, split, f"class{class_index}")
                folder.mkdir(parents=True)
                for index in range(args.jpegs // 2 if split == "train" else 1):
                    # An ImageNet-sized photo-like image: smooth gradients plus noise, JPEG quality 90.
                    base = np.linspace(0, 255, 500)[None, :, None] * rng.uniform(0.3, 1, 3)
                    pixels = np.clip(base + rng.normal(0, 20, (375, 500, 3)), 0, 255).astype(np.uint8)
                    Image.fromarray(pixels).save(folder / f"{index}.jpg", quality=90)
        # The training loader itself: repeated augmentation, reproducible (seeded) views.
        data_cfg = OmegaConf.create(
            {
                "name": "imagefolder",
                "root": root,
                "batch_size": 16,
                "num_workers": workers,
                "pin_memory": False,
            }
        )
        datamodule = DeiTDataModule(data_cfg, deit_augment, args.img_size)
        datamodule.setup()
        iterator = iter(datamodule.train_dataloader())
        next(iterator)  # start the workers
        start, count = time.perf_counter(), 0
        for images, *_ in iterator:
            count += len(images)
        return count / (time.perf_counter() - start)


def cached_teacher(args, batches, device, tmp: str) -> dict[str, float]:
    """Row 7: a heavy teacher online vs read from the cache (filled by a first pass), and the student alone."""
    checkpoint = Path(tmp, "heavy_teacher.safetensors")
    heavy = timm.create_model(args.cache_teacher, num_classes=args.num_classes)
    save_file({k: v.contiguous() for k, v in heavy.state_dict().items()}, str(checkpoint))
    cfg = config(args, checkpoint, teacher=args.cache_teacher)
    with_cache = config(args, checkpoint, teacher=args.cache_teacher, cache=str(Path(tmp, "teacher_cache")))
    lightning_train(with_cache, batches, args, device)  # fills the cache
    online, cached, alone = [], [], []
    student_only = config(args, checkpoint, teacher=args.cache_teacher, loss="ce")
    for _ in range(args.repeats):
        online.append(lightning_train(cfg, batches, args, device))
        cached.append(lightning_train(with_cache, batches, args, device))
        alone.append(lightning_train(student_only, batches, args, device))
    return {
        "train_ips_heavy_teacher_online": max(online),
        "train_ips_heavy_teacher_cached": max(cached),
        "train_ips_student_alone": max(alone),
        "cached_over_online": max(cached) / max(online),
        "cached_over_student_alone": max(cached) / max(alone),
    }


def peak_memory(cfg, batches, args, device) -> float:
    """Row 6: peak memory (MiB) of training steps: CUDA max allocated, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        lightning_train(cfg, batches, args, device)
        return torch.cuda.max_memory_allocated() / 2**20
    status = Path("/proc/self/status")
    if not status.exists():
        return float("nan")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set size (Linux)
    lightning_train(cfg, batches, args, device)
    peak_kb = next(
        int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM")
    )
    return peak_kb / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="32-true", help="32-true, bf16-mixed or 16-mixed")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--img-size", type=int)
    parser.add_argument("--teacher")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--compile", action="store_true", help="torch.compile the student (compile=true)")
    parser.add_argument("--cache-teacher", default="regnety_160", help="the heavy teacher of row 7")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["pipeline", "memory", "cache"], help="rows to leave out"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.preset == "cuda":
        args.preset = "gpu"
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    with tempfile.TemporaryDirectory() as tmp:
        teacher_checkpoint = Path(tmp, "teacher.safetensors")
        random_teacher = timm.create_model(args.teacher, num_classes=args.num_classes)
        save_file(
            {k: v.contiguous() for k, v in random_teacher.state_dict().items()}, str(teacher_checkpoint)
        )
        cfg = config(args, teacher_checkpoint)
        generator = torch.Generator().manual_seed(0)
        batches = [
            (
                torch.randn(args.batch, 3, args.img_size, args.img_size, generator=generator),
                torch.randint(0, args.num_classes, (args.batch,), generator=generator),
                torch.stack(
                    [torch.arange(args.batch) + step * args.batch, torch.zeros(args.batch, dtype=torch.long)],
                    1,
                ),
            )  # images, labels, view keys (index, repeat)
            for step in range(max(args.warmup + args.steps, args.eval_batches))
        ]
        results = {}
        # Rows 1 and 2 alternate (bare, ours, bare, ours, ...) so that drift in the machine's speed hits both;
        # each reports its best repeat.
        bare_runs, ours_runs = [], []
        for _ in range(args.repeats):
            bare_runs.append(bare_train(cfg, batches, args, device))
            ours_runs.append(lightning_train(cfg, batches, args, device))
        results["train_ips_deit_train"] = max(ours_runs)
        results["train_ips_bare_pytorch"] = max(ips for ips, _ in bare_runs)
        results["framework_overhead"] = (
            1 - results["train_ips_deit_train"] / results["train_ips_bare_pytorch"]
        )
        results["teacher_share_of_step"] = min(share for _, share in bare_runs)
        results.update(teacher_layouts(cfg, batches, args, device))
        results["eval_ips_deit_train"], results["eval_ips_timm"] = eval_throughput(cfg, batches, args, device)
        results["eval_overhead"] = 1 - results["eval_ips_deit_train"] / results["eval_ips_timm"]
        if "pipeline" not in args.skip:
            results["pipeline_ips_per_worker"] = pipeline_throughput(cfg, args, workers=1)
        if "memory" not in args.skip:
            results["peak_train_memory_mib"] = peak_memory(cfg, batches, args, device)
        if "cache" not in args.skip:
            results.update(cached_teacher(args, batches, device, tmp))

    setup = {
        k: getattr(args, k)
        for k in ("preset", "model", "teacher", "batch", "img_size", "precision", "compile", "num_classes")
    }
    setup["device"] = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
    )
    setup["torch"] = torch.__version__
    print("\n" + ", ".join(f"{k}={v}" for k, v in setup.items()))
    print(f"{'figure':40s} {'value':>12s}")
    for key, value in results.items():
        print(f"{key:40s} {value:12.3f}")
    if args.json:
        args.json.write_text(json.dumps({"setup": setup, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
