"""deit-eval, deit-predict, deit-export and deit-report check their arguments and outputs before any work and end
every failure in one line with its exit status; nothing they refuse is written or overwritten."""

import contextlib
import importlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deit_train.train import train


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, cache_dir) -> Path:
    from .conftest import TINY, compose_config

    run_dir = tmp_path_factory.mktemp("tools") / "run"
    train(compose_config(TINY, run_dir, cache_dir))
    return run_dir / "checkpoints" / "last.ckpt"


def tool(name: str, *args) -> subprocess.CompletedProcess:
    code = f"from deit_train.tools.{name} import main; main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300)


def tool_here(name: str, *args) -> subprocess.CompletedProcess:
    """`tool` in this process (the quick loop's: no interpreter and imports to start): the same main() and error
    boundary, sys.argv as the console script sets it; an exception the boundary lets through fails the test."""
    module = importlib.import_module(f"deit_train.tools.{name}")
    stdout, stderr, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = [f"deit-{name}", *map(str, args)]
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            module.main()
        code = 0
    except SystemExit as end:
        code = end.code if isinstance(end.code, int) else 0 if end.code is None else 1
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(sys.argv, code, stdout.getvalue(), stderr.getvalue())


def assert_refused(result: subprocess.CompletedProcess, code: int, *phrases: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


@pytest.mark.slow
def test_bad_numbers_are_refused_before_any_work(checkpoint, demo_data):
    assert_refused(tool("evaluate", checkpoint, demo_data, "--batch-size", "0"), 2, "--batch-size", "0 is below 1")
    assert_refused(tool("predict", checkpoint, demo_data, "--top-k", "-1"), 2, "--top-k", "-1 is below 1")
    assert_refused(tool("evaluate", checkpoint, demo_data, "--num-workers", "x"), 2, "'x' is not an integer")


@pytest.mark.slow
def test_outputs_are_checked_before_the_work_and_never_overwrite_other_files(checkpoint, demo_data, tmp_path):
    assert_refused(tool("evaluate", checkpoint, demo_data, "--json", tmp_path), 2, "is a folder")
    assert_refused(
        tool("evaluate", checkpoint, demo_data, "--json", tmp_path / "no" / "r.json"), 2, "the folder", "does not exist"
    )
    written = tool("evaluate", checkpoint, demo_data, "--json", tmp_path / "r.json")
    assert written.returncode == 0 and (tmp_path / "r.json").is_file(), written.stderr
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    assert_refused(tool("export", checkpoint, occupied), 2, "holds other files (notes.txt)")
    assert_refused(tool("export", checkpoint, tmp_path / "r.json"), 2, "is a file")
    assert (occupied / "notes.txt").read_text() == "mine" and sorted(p.name for p in occupied.iterdir()) == [
        "notes.txt"
    ]
    exported = tmp_path / "exported"
    assert tool("export", checkpoint, exported, "--onnx").returncode == 0
    assert tool("export", checkpoint, exported).returncode == 0  # replaces it, the earlier model.onnx included
    assert sorted(p.name for p in exported.iterdir()) == ["README.md", "timm", "transformers"]
    assert not list(tmp_path.glob(".exported.export-*"))  # the staging folder is gone
    assert_refused(tool("report", checkpoint.parents[1], "--out", tmp_path / "r.json"), 2, "--out", "is a file")


@pytest.mark.slow
def test_non_finite_weights_are_refused_by_eval_and_predict(checkpoint, demo_data, tmp_path):
    stored = torch.load(checkpoint, weights_only=True)
    stored["state_dict"]["student.blocks.0.mlp.fc1.weight"][0, 0] = float("nan")
    broken = tmp_path / "diverged.ckpt"
    torch.save(stored, broken)
    assert_refused(tool("evaluate", broken, demo_data), 2, "outputs are NaN or inf", "an earlier checkpoint")
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(image)
    result = tool("predict", broken, image)
    assert_refused(result, 2, "outputs are NaN or inf")
    assert result.stdout == ""  # no prediction printed from such a model
    assert_refused(tool("export", broken, tmp_path / "out"), 2, "non-finite weights", "blocks.0.mlp.fc1")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "names,named",
    [("abcdefghij", "its class names are not a list of strings"), (["a", "b"], "2 class names for a head of 10")],
)
def test_class_names_that_do_not_fit_the_head_are_refused(checkpoint, tmp_path, names, named):
    stored = torch.load(checkpoint, weights_only=True)
    stored["class_names"] = names
    edited = tmp_path / "edited.ckpt"
    torch.save(stored, edited)
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(image)
    result = tool_here("predict", edited, image)
    assert_refused(result, 2, named)
    assert result.stdout == ""


def test_a_split_that_is_not_there_is_refused(checkpoint, demo_data):
    assert_refused(
        tool_here("evaluate", checkpoint, demo_data, "--split", "tset"),
        2,
        "has no tset/ folder",
        "it has train, val",
        "--split",
    )


@pytest.mark.slow
def test_a_corrupt_image_met_by_a_loader_worker_ends_in_one_line(checkpoint, demo_data, tmp_path):
    """The workers the error leaves behind are ended without torch's "worker killed by signal" traceback."""
    import shutil

    folder = tmp_path / "val"
    shutil.copytree(demo_data / "val", folder)
    victim = next(folder.glob("*/*.png"))
    victim.write_bytes(victim.read_bytes()[:60])  # a header, no pixels
    for _ in range(3):  # the traceback came in 6 of 8 runs
        assert_refused(
            tool("evaluate", checkpoint, folder, "--num-workers", "2", "--batch-size", "4"),
            3,
            "corrupt image",
            victim.name,
        )


@pytest.mark.parametrize(
    "name, args, status",
    [
        ("evaluate", ["--help"], 0),
        ("evaluate", ["model.ckpt"], 2),  # DATA missing: argparse's usage line
        ("predict", ["--help"], 0),
        ("predict", ["/nonexistent.ckpt", "/nonexistent.png"], 2),  # the images are found before the model is loaded
        ("predict", ["/nonexistent.ckpt", "."], 2),  # and the model's path, before torch is imported
        ("evaluate", ["/nonexistent.ckpt", "."], 2),
        ("report", ["--help"], 0),
        ("shard", ["--help"], 0),
    ],
)
def test_a_tool_answers_its_arguments_without_importing_torch(name, args, status, tmp_path):
    """deit-eval --help took 7 s (torch, torchmetrics and the models imported before the arguments were read): read
    from a fresh interpreter's sys.modules after main() ends."""
    from tests.test_cli import heavy_imports_after

    main = f"runpy.run_module('deit_train.tools.{name}', run_name='__main__')"
    line, result = heavy_imports_after(main, [f"deit-{name}", *args], tmp_path)
    assert line == f"HEAVY [] CODE {status}", result.stdout + result.stderr
