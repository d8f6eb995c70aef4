"""The compile row: deit-train with compile=true against eager, and the seconds of its first (compiling)
steps."""

import functools
from contextlib import contextmanager

import torch

from bench.setting import Bench

# figure -> (label in the Markdown table, unit)
FIGURES = {
    "train_ips_compiled": ("train images/s, deit-train with compile=true", "ips"),
    "compiled_over_eager": ("compile=true / eager", "ratio"),
    "compile_first_steps_s": ("seconds of the warm-up steps with compile=true (compilation)", "s"),
}


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
