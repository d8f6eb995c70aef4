"""The teacher_layout row (shared by the students): the teacher's forward images/s, plain (NCHW, no_grad)
against ours (channels_last, inference_mode)."""

import time

import torch

from bench.setting import Bench
from bench.timing import autocast, synchronize
from deit_train.teacher import build_teacher_network

# figure -> (label in the Markdown table, unit)
FIGURES = {
    "teacher_ips_nchw_no_grad": ("teacher images/s, NCHW + no_grad", "ips"),
    "teacher_ips_channels_last_inference_mode": (
        "teacher images/s, channels_last + inference_mode (ours)",
        "ips",
    ),
}


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
