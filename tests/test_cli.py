"""`deit-train` from the shell: bad input ends early with one clear message and a non-zero exit."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from deit_train.cli import layered

from .conftest import TINY, TINY_RUN, TINY_VIT


def cli_command(*overrides: str, tmp_path, cache_dir, base=TINY) -> list[str]:
    """`deit-train <tiny config> <overrides>` running in tmp_path/run."""
    run_dir = tmp_path / "run"
    return [
        sys.executable,
        "-m",
        "deit_train",
        *layered([*base, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}", *overrides]),
    ]


def run_cli(*overrides: str, tmp_path, cache_dir, base=TINY) -> subprocess.CompletedProcess:
    command = cli_command(*overrides, tmp_path=tmp_path, cache_dir=cache_dir, base=base)
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)


@pytest.fixture
def hundred_class_folder(tmp_path):
    for split in ("train", "val"):
        for index in range(100):
            folder = tmp_path / "data100" / split / f"class{index:03d}"
            folder.mkdir(parents=True)
            Image.new("RGB", (16, 16), (index, 0, 0)).save(folder / "0.png")
    return tmp_path / "data100"


@pytest.fixture
def ten_class_teacher(tmp_path):
    import timm
    import torch

    torch.save({"model": timm.create_model("resnet10t", num_classes=10).state_dict()}, tmp_path / "teacher10.pth")
    return tmp_path / "teacher10.pth"


def assert_clear_failure(result: subprocess.CompletedProcess, *phrases: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    for phrase in phrases:
        assert phrase in output, output
    assert "Traceback" not in output, output


def test_unknown_model_lists_the_choices(tmp_path, cache_dir):
    result = run_cli("model=deit_huge", tmp_path=tmp_path, cache_dir=cache_dir)
    assert_clear_failure(result, "deit_huge", "deit_tiny", "deit_small", "deit_base_384")


def test_misspelt_override_is_refused(tmp_path, cache_dir):
    result = run_cli("model.depht=3", tmp_path=tmp_path, cache_dir=cache_dir)
    assert_clear_failure(result, "depht")


def test_imagefolder_without_root(tmp_path, cache_dir):
    result = run_cli("data=imagefolder", tmp_path=tmp_path, cache_dir=cache_dir, base=TINY_RUN + TINY_VIT)
    assert_clear_failure(result, "needs data.root")


def test_distillation_without_teacher(tmp_path, cache_dir):
    result = run_cli("loss=hard_distill", "teacher=none", tmp_path=tmp_path, cache_dir=cache_dir)
    assert_clear_failure(result, "needs a teacher")


def test_teacher_without_weights(tmp_path, cache_dir):
    result = run_cli(
        "loss=hard_distill", "teacher=timm", "teacher.name=resnet10t", tmp_path=tmp_path, cache_dir=cache_dir
    )
    assert_clear_failure(result, "has no weights")


def test_ten_class_teacher_on_hundred_class_data(tmp_path, cache_dir, hundred_class_folder, ten_class_teacher):
    result = run_cli(
        "data=imagefolder",
        f"data.root={hundred_class_folder}",
        "data.batch_size=16",
        "data.num_workers=0",
        "loss=hard_distill",
        "teacher=timm",
        "teacher.name=resnet10t",
        f"teacher.checkpoint={ten_class_teacher}",
        tmp_path=tmp_path,
        cache_dir=cache_dir,
        base=TINY_RUN + TINY_VIT,
    )
    assert_clear_failure(result, "has 10 classes", "the data has 100")


@pytest.mark.slow
def test_corrupt_training_image_is_named_without_a_traceback(tmp_path, cache_dir, demo_data):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    (data / "train" / "circle" / "00003.png").write_bytes(b"\x89PNG truncated")
    (data / "val" / "ring" / "00001.png").write_text("a text file named .png")

    def run(*more):
        return run_cli(
            "data=imagefolder",
            f"data.root={data}",
            "data.num_workers=1",
            *more,
            tmp_path=tmp_path,
            cache_dir=cache_dir,
            base=TINY_RUN + TINY_VIT,
        )

    # The scan before training finds both, in one line, before anything is written.
    result = run()
    assert_clear_failure(
        result, "2 of 120 images cannot be read", "circle/00003.png (not an image file Pil", "ring/00001.png"
    )
    assert result.returncode == 2 and not (tmp_path / "run").exists()
    # Without the scan, the run meets the first one (the sanity check's validation batch): exit status 3, named, no
    # traceback from the worker, and the process ends (its data-loader workers with it).
    result = run("data.scan=off")
    assert_clear_failure(result, "corrupt image", "ring/00001.png: not an image file Pillow can read")
    assert result.returncode == 3


@pytest.mark.slow
def test_two_process_ddp_on_cpu_writes_one_run_directory(tmp_path, cache_dir):
    result = run_cli(
        "trainer=ddp_cpu",
        "trainer.devices=2",
        "augment.repeated_aug=3",
        tmp_path=tmp_path,
        cache_dir=cache_dir,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "metrics.json").read_text())["val/acc1"] >= 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    # Both ranks worked in the same directory: nothing else was created beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 80 // 16  # a global batch of 16: 8 per rank, 5 steps an epoch


@pytest.mark.slow
def test_run_killed_mid_training_resumes_to_the_full_step_count(tmp_path, cache_dir):
    """SIGKILL once the first checkpoint exists, then resume=true in the same directory."""
    import os
    import signal
    import time

    overrides = ["trainer.max_epochs=6", "resume=true"]
    command = cli_command(*overrides, tmp_path=tmp_path, cache_dir=cache_dir)
    first = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL  # it was killed before it could finish
    assert not (tmp_path / "run" / "metrics.json").exists()

    result = run_cli(*overrides, tmp_path=tmp_path, cache_dir=cache_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming from" in result.stdout + result.stderr
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 6 * 80 // 16 and checkpoint["epoch"] == 5
    assert "val/acc1" in json.loads((tmp_path / "run" / "metrics.json").read_text())


@pytest.mark.slow
def test_ddp_ranks_agree_on_a_timestamped_run_directory(tmp_path, cache_dir):
    """No hydra.run.dir: the default outputs/${now:...} must resolve to one directory for both ranks."""
    command = [
        sys.executable,
        "-m",
        "deit_train",
        *TINY,
        f"paths.cache_dir={cache_dir}",
        "trainer=ddp_cpu",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dirs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs
    assert (run_dirs[0] / "metrics.json").is_file() and (run_dirs[0] / "checkpoints" / "last.ckpt").is_file()


def test_preset_with_an_unset_required_value_says_which(tmp_path, cache_dir, demo_data):
    result = run_cli(
        "experiment=deit_base_384_finetune",
        f"data.root={demo_data}",
        tmp_path=tmp_path,
        cache_dir=cache_dir,
        base=[],
    )
    assert_clear_failure(result, "needs model.init=...")


def test_a_default_run_prints_a_quiet_useful_console(tmp_path, cache_dir):
    """The config summary, a line of metrics per epoch and the final metrics; none of Lightning's tips, the frozen
    teacher's eval-mode notice, the CPU pin_memory warning, the logging-interval warning or deprecations."""
    result = run_cli(
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=50",
        "data.pin_memory=true",
        tmp_path=tmp_path,
        cache_dir=cache_dir,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for expected in ("config: experiment=demo", "epoch 0: ", "epoch 1: ", "final metrics:"):
        assert expected in output, output
    deny = [
        "Tip:",
        "litlogger",
        "pin_memory",
        "in eval mode",
        "logging interval",
        "deprecated",
        "Deprecat",
        "FutureWarning",
        "srun",
        "Traceback",
        "Seed set to",
    ]
    assert [word for word in deny if word in output] == [], output
    print(f"{len(output.splitlines())} console lines")


def test_a_key_given_two_values_is_refused_naming_both(tmp_path, cache_dir):
    """What the shell makes of an unquoted shard pattern (data.train=/d/s-{0..1}.tar): two data.train overrides, of
    which Hydra would keep the last. Refused in one line, exit 2, before anything is written."""
    shards = [f"data.train={tmp_path}/s-{i}.tar" for i in range(2)]
    command = [*cli_command("data=webdataset", tmp_path=tmp_path, cache_dir=cache_dir), *shards]  # not layered
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("deit-train: error: data.train is given 2 values on the command line (")
    assert all(shard in lines[0] for shard in shards) and "in quotes" in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "args, refused",
    [
        (["data.train=a", "data.train=b"], "data.train is given 2 values"),
        (["-m", "seed=0,1", "seed=2"], "seed is given 2 values"),  # a sweep too
        (["model=deit_tiny", "trainer.max_epochs=3", "model=deit_small"], "model is given 2 values"),
        (["+trainer.x=1", "trainer.x=2"], "trainer.x is given 2 values"),  # added, then changed
        (["-m", "seed=0,1"], None),  # one sweep override
        (["~callbacks.lr_monitor", "+callbacks.lr_monitor=null"], None),  # delete, then add: a node replaced
        (["seed=1", "seed=1"], None),  # the same value twice says one thing
        (["model=deit_tiny", "model@student=deit_tiny_plain"], None),  # another package
        (["-cn", "train", "seed=3"], None),  # a flag's value is no override
    ],
)
def test_each_key_takes_one_value(args, refused, monkeypatch):
    from deit_train.cli import check_repeated_keys
    from deit_train.errors import DeitTrainError

    if refused is None:
        check_repeated_keys(args)
        return
    with pytest.raises(DeitTrainError, match=refused):
        check_repeated_keys(args)
    monkeypatch.setenv("LOCAL_RANK", "1")  # a rank Lightning started appends its own hydra.run.dir=...
    from deit_train.cli import refuse_bad_command_line

    monkeypatch.setattr("deit_train.cli.check_command_line", lambda args: None)
    refuse_bad_command_line([*args, "-m"])  # not refused there


def test_a_run_is_composed_and_checked_once_in_its_process(tmp_path, cache_dir, monkeypatch):
    """cli.py checks the config before Hydra makes the run directory; train() then meets the same config from Hydra
    and does not check it again (train.check_config)."""
    import deit_train.schema
    import deit_train.train
    from deit_train.cli import cli

    calls = []
    real_check = deit_train.schema.check
    monkeypatch.setattr(deit_train.schema, "check", lambda cfg: (calls.append(1), real_check(cfg))[1])
    monkeypatch.setattr(deit_train.train, "CHECKED", {})
    monkeypatch.chdir(tmp_path)
    args = layered([*TINY, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / 'run'}"])
    monkeypatch.setattr(sys, "argv", ["deit-train", *args])
    cli()
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert len(calls) == 1


def test_a_tilde_path_hydra_cannot_read_names_the_fix(capsys, tmp_path):
    """data.root=~/data: bash expands ~ after the = of a plain name only, so Hydra gets the ~ and its lexer refuses
    it. The line names the two ways that work; the quoted one reaches the source, which expands it."""
    from deit_train.cli import refuse_bad_command_line

    with pytest.raises(SystemExit) as exited:
        refuse_bad_command_line(["data=imagefolder", "data.root=~/data"])
    line = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and "\n" not in line
    assert "write data.root=$HOME/data or an absolute path, or quote it for Hydra: \"data.root='~/data'\"" in line
    environment = {**os.environ, "HOME": str(tmp_path)}
    command = [sys.executable, "-m", "deit_train", "data=imagefolder", "data.root='~/data'"]
    quoted = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=environment)
    assert f"data.root={tmp_path}/data does not exist" in quoted.stderr.strip().splitlines()[-1], quoted.stderr
