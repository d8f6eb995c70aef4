"""How a row times: steps between two host syncs, peak memory over them, and the previous run's objects
collected first."""

import gc
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device: torch.device, precision: str):
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def free_memory(device: torch.device) -> None:
    """Collect the previous run's objects (Lightning's hold references in cycles) before the next one measures."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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
