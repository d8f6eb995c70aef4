"""The real_run row (shared): deit-train itself, as a user starts it (`python -m deit_train` with Hydra overrides: the
app's data module, loaders, callbacks, checkpoints, DDP over every GPU when there are two or more), on JPEGs written
to disk in the ImageFolder layout (decoded by the data-loader workers, uint8 views finished on the device, augment=deit
with random erasing), hard distillation from the preset's teacher, two epochs. RunProbe, a callback added with
`+callbacks.probe`, measures the second epoch in the run's own process (rank 0):

  images/s per GPU     epoch 2's steps after its first, up to the profiler's window (host syncs at both ends)
  loader wait          host time between one step's end and the next one's start (the next batch from the loader,
                       its copy and the input finish launched), per step
  syncs per step       in a torch.profiler window over epoch 2's last whole steps, Lightning's own work included:
                       CUDA synchronizing calls (cuda*Synchronize), and reads of a tensor to the host (.item(),
                       _local_scalar_dense: each one a sync on a GPU)
  validation, checkpoint seconds per epoch, checkpoint writes per epoch, peak memory (CUDA max allocated, else the
  process's peak RSS), dynamo's unique graphs and the guard failures that recompiled (compile=true where the preset
  says), and the seconds from the trainer's setup to the first step.
"""

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image

from bench.setting import Bench
from bench.timing import PeakMemory, synchronize

FIGURES = {
    "run_gpus": ("real run: devices (DDP on 2 or more)", "count"),
    "run_ips_per_device": ("real run: training images/s per device (JPEGs from disk, epoch 2)", "ips"),
    "run_loader_wait_ms": ("real run: host ms between steps (loader wait, copy, input finish), per step", "ms"),
    "run_cuda_syncs_per_step": ("real run: CUDA synchronizing calls per step (profiler, whole steps)", "count"),
    "run_host_reads_per_step": ("real run: tensor reads to the host per step (.item(); a sync each on a GPU)", "count"),
    "run_val_s_per_epoch": ("real run: validation seconds per epoch", "s"),
    "run_checkpoint_s_per_epoch": ("real run: checkpoint seconds per epoch", "s"),
    "run_checkpoint_writes_per_epoch": ("real run: checkpoint writes per epoch", "count"),
    "run_peak_memory_mib": ("real run: peak memory (MiB; CUDA max allocated, else peak RSS)", "mib"),
    "run_dynamo_graphs": ("real run: dynamo's unique graphs", "count"),
    "run_dynamo_recompiles": ("real run: dynamo guard failures that recompiled", "count"),
    "run_first_step_s": ("real run: seconds from the trainer's setup to the first step", "s"),
}
CLASSES = 10  # class folders of the JPEGs; the heads are 10-way (a 1000-way head is a small share of the step)
DISTINCT_JPEGS = 64  # written; the others are hard links to them (the loader still opens and decodes each)


def real_run_rows(bench: Bench) -> dict[str, float]:
    """deit-train's command on the preset's student, batch per device and teacher, over every GPU here."""
    preset, tmp = bench.preset, bench.tmp
    devices = torch.cuda.device_count() if bench.device.type == "cuda" else 1
    root = jpeg_folder(tmp / "jpegs", preset.run_steps * bench.batch * devices, 2 * bench.batch * devices)
    figures_path = tmp / "real_run.json"
    trainer = ["trainer=ddp", f"trainer.devices={devices}"] if devices > 1 else ["trainer.devices=1"]
    command = [
        sys.executable,
        "-m",
        "deit_train",
        f"model={bench.student}",
        f"model.img_size={preset.img_size}",
        *preset.model_overrides,
        "loss=hard_distill",
        "teacher=timm",
        f"teacher.name={preset.teacher}",
        f"teacher.checkpoint={bench.teacher_checkpoint(preset.teacher, CLASSES)}",
        "teacher.unchecked_order=true",  # random weights: no class order to check
        "data=imagefolder",
        f"data.root={root}",
        f"data.batch_size={bench.batch * devices}",  # global
        *trainer,
        f"trainer.accelerator={'gpu' if bench.device.type == 'cuda' else 'cpu'}",
        f"trainer.precision={preset.precision}",
        "trainer.max_epochs=2",
        f"compile={preset.run_compile}",
        "+callbacks.probe._target_=bench.real_run_rows.RunProbe",
        f"+callbacks.probe.path={figures_path}",
        f"+callbacks.probe.window={preset.run_window}",
        f"hydra.run.dir={tmp / 'real_run'}",
        f"paths.cache_dir={tmp}",
    ]
    scripts = str(Path(__file__).resolve().parents[1])  # bench/ for the probe, in every rank's process
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([scripts, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"deit-train exited {done.returncode}: {(done.stderr or done.stdout).strip()[-300:]}")
    figures = json.loads(figures_path.read_text())
    figures["run_gpus"] = devices if bench.device.type == "cuda" else 0
    return figures


def jpeg_folder(root: Path, train: int, val: int) -> Path:
    """root/{train,val}/class*/N.jpg: `train` and `val` 500x375 JPEGs (ImageNet's typical size, quality 90, smooth
    gradients plus noise), DISTINCT_JPEGS of them written and the rest hard links to those."""
    rng = np.random.default_rng(0)
    sources = []
    for index in range(DISTINCT_JPEGS):
        base = np.linspace(0, 255, 500)[None, :, None] * rng.uniform(0.3, 1, 3)
        pixels = np.clip(base + rng.normal(0, 20, (375, 500, 3)), 0, 255).astype(np.uint8)
        path = root / f"source{index}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)
        sources.append(path)
    for split, count in (("train", train), ("val", val)):
        for index in range(count):
            folder = root / split / f"class{index % CLASSES}"
            folder.mkdir(parents=True, exist_ok=True)
            os.link(sources[index % DISTINCT_JPEGS], folder / f"{index}.jpg")
    return root


class RunProbe(L.Callback):
    """Measures the run it is added to (see the module's docstring) and writes rank 0's figures to `path` at the
    end. Epoch 2 (index 1): step 0 warms up, steps 1 .. N - window - 1 are timed, the last `window` are profiled."""

    def __init__(self, path: str, window: int = 3) -> None:
        self.path, self.window = Path(path), window
        self.setup_time = self.first_step_s = None
        self.timed_start = self.timed_seconds = None
        self.timed_steps = 0
        self.last_step_end: float | None = None
        self.gaps: list[float] = []
        self.validation: dict[int, float] = {}
        self.checkpoint_seconds: Counter = Counter()
        self.checkpoint_writes: Counter = Counter()
        self.profiler: torch.profiler.profile | None = None
        self.profiled: dict[str, float] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.setup_time = time.perf_counter()
        self.memory = PeakMemory(trainer.strategy.root_device)  # the module may not be on it yet
        self.memory.reset()
        save = trainer.save_checkpoint

        def timed_save(*args, **kwargs):  # every write, whoever asks for it (ModelCheckpoint: last, best)
            start = time.perf_counter()
            save(*args, **kwargs)
            self.checkpoint_seconds[trainer.current_epoch] += time.perf_counter() - start
            self.checkpoint_writes[trainer.current_epoch] += 1

        trainer.save_checkpoint = timed_save

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        if self.first_step_s is None:
            self.first_step_s = now - self.setup_time
        if trainer.current_epoch != 1:
            return
        window_start = trainer.num_training_batches - self.window
        if 1 < batch_idx <= window_start and self.last_step_end is not None:
            self.gaps.append(now - self.last_step_end)
        if batch_idx == 1:
            synchronize(pl_module.device)
            self.timed_start = time.perf_counter()
        elif batch_idx == window_start:
            synchronize(pl_module.device)
            self.timed_seconds = time.perf_counter() - self.timed_start
            self.timed_steps = window_start - 1
            activities = [torch.profiler.ProfilerActivity.CPU]
            if pl_module.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.last_step_end = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.stop_profiler()

    def stop_profiler(self) -> None:
        """The window ends before the epoch's validation: its steps whole, Lightning's work after the last one's
        end included."""
        if self.profiler is None or self.profiled:
            return
        self.profiler.stop()
        names = Counter(event.name for event in self.profiler.events())
        self.profiled = {
            "run_cuda_syncs_per_step": sum(n for name, n in names.items() if "Synchronize" in name) / self.window,
            "run_host_reads_per_step": names["aten::_local_scalar_dense"] / self.window,
        }

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.stop_profiler()
            self.validation[trainer.current_epoch] = -time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            synchronize(pl_module.device)
            self.validation[trainer.current_epoch] += time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        from torch._dynamo.utils import counters, guard_failures

        if trainer.global_rank != 0:
            return
        per_device_batch = trainer.datamodule.per_device_batch_size
        figures = {
            "run_ips_per_device": self.timed_steps * per_device_batch / self.timed_seconds,
            "run_loader_wait_ms": 1000 * sum(self.gaps) / max(len(self.gaps), 1),
            **self.profiled,
            "run_val_s_per_epoch": self.validation[1],
            "run_checkpoint_s_per_epoch": self.checkpoint_seconds[1],
            "run_checkpoint_writes_per_epoch": self.checkpoint_writes[1],
            "run_peak_memory_mib": self.memory.read(),
            "run_dynamo_graphs": counters["stats"]["unique_graphs"],
            "run_dynamo_recompiles": sum(len(reasons) for reasons in guard_failures.values()),
            "run_first_step_s": self.first_step_s,
        }
        self.path.write_text(json.dumps(figures, indent=2) + "\n")
