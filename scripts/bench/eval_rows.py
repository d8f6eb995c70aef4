"""The eval row: images/s of deit-train's prediction path against the raw timm model under inference_mode."""

import time

import torch

from bench.setting import Bench
from bench.timing import autocast, synchronize
from deit_train.train import check_config

# figure -> (label in the Markdown table, unit)
FIGURES = {
    "eval_ips_deit_train": ("eval images/s, deit-train", "ips"),
    "eval_ips_timm": ("eval images/s, raw timm", "ips"),
    "eval_overhead": ("eval overhead, 1 - deit-train / timm", "share"),
}


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
