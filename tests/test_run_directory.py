"""The run directory's owner (run_dir.RunDirectory): a run refused or failed before it trained removes what it
created there, and only that; whatever the directory held before stays, byte for byte."""

import shutil
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from deit_train.cli import layered
from deit_train.errors import DeitTrainError
from deit_train.train import train

from .conftest import TINY_RUN, TINY_VIT

NAMES = st.sampled_from(
    ["experiment-notes.log", "slurm-4242.log", "train.log", "README.md", "notes.txt", "sub/plan.log", ".hidden"]
)


@pytest.fixture
def corrupt_data(tmp_path_factory, demo_data) -> Path:
    data = tmp_path_factory.mktemp("corrupt") / "data"
    shutil.copytree(demo_data, data)
    (data / "train" / "circle" / "00003.png").write_bytes(b"\x89PNG truncated")
    return data


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(NAMES, min_size=0, max_size=4, unique=True), existed=st.booleans())
def test_a_refused_start_removes_only_what_it_created(names, existed, tiny_config, corrupt_data, tmp_path):
    """A run refused in its setup (an unreadable training image, found by the scan) removed its directory whenever
    every file in it was a .log: a hydra.run.dir that held the user's experiment-notes.log, or the job's own
    slurm-<id>.log, was gone. Drawn pre-existing files survive; what the run wrote is removed; a directory it made
    is removed with its parents it made."""
    run_dir = tmp_path / f"runs-{len(names)}-{existed}" / "nested" / "run"
    if existed or names:
        run_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text(f"the user's {name}\n")
    before = files_under(run_dir) if run_dir.exists() else None
    cfg = tiny_config("data=imagefolder", f"data.root={corrupt_data}", run=str(run_dir.relative_to(tmp_path)))
    with pytest.raises(DeitTrainError, match="cannot be read"):
        train(cfg)
    if before is None:
        assert not run_dir.exists() and not run_dir.parent.exists()  # made by the run: gone, with its parents
    else:
        assert files_under(run_dir) == before  # what was there stays, nothing else is left


def test_a_batch_larger_than_the_data_is_refused_before_anything_is_written(tmp_path, cache_dir, capsys, monkeypatch):
    """A 24-image folder and a batch of 32: refused with exit 2 in one line, before the model summary, and no run
    directory left (it was refused after writing .hydra/, csv/, train.log and the lock). The command line's own
    cli(), in this process (a subprocess took 8 s of imports)."""
    from deit_train.cli import cli

    for split, count in (("train", 12), ("val", 2)):
        for name in ("a", "b"):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                Image.new("RGB", (16, 16), (index * 20, 0, 0)).save(folder / f"{index}.png")
    args = [
        *TINY_RUN,
        *TINY_VIT,
        "data=imagefolder",
        f"data.root={tmp_path / 'data'}",
        "data.batch_size=32",
        f"paths.cache_dir={cache_dir}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["deit-train", *layered(args)])
    with pytest.raises(SystemExit) as refused:
        cli()
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert refused.value.code == 2 and len(lines) == 1, out + err
    assert "data.batch_size=32 puts 32 images per device in a batch, but each device draws only 24" in lines[0]
    assert not (tmp_path / "run").exists()
    assert "student" not in out  # refused before the model was built
