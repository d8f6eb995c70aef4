"""Counts this process's Python-level torch.distributed collectives (tests/test_slurm_tasks.py puts this folder on a
run's PYTHONPATH): at exit, DEIT_COUNT_COLLECTIVES/<pid>.json holds each collective's count. The gradients'
all-reduce of DDP runs in C++ (its reducer) and is not counted: what is counted is what Lightning, torchmetrics and
deit-train call from Python, each a host-side wait."""

import atexit
import collections
import json
import os
from pathlib import Path

if os.environ.get("DEIT_COUNT_COLLECTIVES"):
    import torch.distributed as dist

    counts: collections.Counter = collections.Counter()
    NAMES = (
        "broadcast",
        "all_reduce",
        "reduce",
        "all_gather",
        "all_gather_into_tensor",
        "gather",
        "scatter",
        "reduce_scatter",
        "barrier",
        "all_gather_object",
        "broadcast_object_list",
        "gather_object",
    )

    def counted(name, function):
        def call(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)

        return call

    for name in NAMES:
        if hasattr(dist, name):
            setattr(dist, name, counted(name, getattr(dist, name)))

    def write() -> None:
        folder = Path(os.environ["DEIT_COUNT_COLLECTIVES"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{os.getpid()}.json").write_text(json.dumps(dict(counts)))

    atexit.register(write)
