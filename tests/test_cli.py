"""`deit-train` from the shell: bad input ends early with one clear message and a non-zero exit."""

import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from deit_train.cli import layered

from .conftest import TINY, TINY_RUN, TINY_VIT, last_epoch


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


@pytest.mark.slow  # the console script's line for it; the refusal itself: tests/test_models.py, in the quick loop
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
    assert 0 <= last_epoch(run_dir)["val/acc1_percent"] <= 100
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
    assert last_epoch(tmp_path / "run")["epoch"] == 5 and "val/acc1_percent" in last_epoch(tmp_path / "run")


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


@pytest.mark.slow  # a whole run in a subprocess: the whole suite runs it, the quick loop does not
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


def test_a_shell_expanded_pattern_is_refused_naming_its_values(tmp_path, cache_dir):
    """What the shell makes of an unquoted shard pattern (data.train=/d/s-{0..1}.tar): two data.train overrides, of
    which Hydra would keep the last. Refused in one line, exit 2, before anything is written."""
    shards = [f"data.train={tmp_path}/s-{i}.tar" for i in range(2)]
    command = [*cli_command("data=webdataset", tmp_path=tmp_path, cache_dir=cache_dir), *shards]  # not layered
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("deit-train: error: data.train is given 2 values that the shell made of one pattern (")
    assert all(shard in lines[0] for shard in shards) and "in quotes" in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "args, kept, said",
    [
        # a base command with one key changed after it: the last value, as Hydra applies it, with a line
        (["trainer.max_epochs=300", "seed=3", "trainer.max_epochs=1"], ["seed=3", "trainer.max_epochs=1"], True),
        (["trainer.max_epochs=300", "trainer.max_epochs=1"], ["trainer.max_epochs=1"], True),
        (
            ["model=deit_tiny", "trainer.max_epochs=3", "model=deit_small"],
            ["trainer.max_epochs=3", "model=deit_small"],
            True,
        ),
        (["+trainer.x=1", "trainer.x=2"], ["trainer.x=2"], True),  # added, then changed
        (["data.root=/data/a", "data.root=/data/b"], ["data.root=/data/b"], True),
        (["-m", "seed=0,1", "seed=2"], ["-m", "seed=2"], True),  # a sweep too
        (["-m", "seed=0,1"], ["-m", "seed=0,1"], False),  # one sweep override
        (["~callbacks.lr_monitor", "+callbacks.lr_monitor=null"], None, False),  # delete, then add: a node replaced
        (["seed=1", "seed=1"], ["seed=1"], False),  # the same value twice says one thing
        (["model=deit_tiny", "model@student=deit_tiny_plain"], None, False),  # another package
        (["-cn", "train", "seed=3"], None, False),  # a flag's value is no override
    ],
)
def test_a_key_given_twice_takes_its_last_value_with_a_line(args, kept, said, capsys):
    from deit_train.cli import one_value_per_key

    assert one_value_per_key(args) == (args if kept is None else kept)
    assert ("values: the last," in capsys.readouterr().out) == said


@pytest.mark.parametrize(
    "values",
    [
        ["data.train=/d/s-000.tar", "data.train=/d/s-001.tar", "data.train=/d/s-002.tar"],  # s-{000..002}.tar
        ["data.train=/d/train-a.tar", "data.train=/d/train-b.tar"],  # train-{a,b}.tar
        ["data.root=/d/part1", "data.root=/d/part2"],  # part{1,2}
    ],
)
def test_what_the_shell_made_of_one_pattern_is_refused(values):
    from deit_train.cli import one_value_per_key
    from deit_train.errors import DeitTrainError

    with pytest.raises(DeitTrainError, match="that the shell made of one pattern"):
        one_value_per_key(["seed=0", *values])


def test_a_glob_the_shell_expanded_is_refused(tmp_path):
    from deit_train.cli import one_value_per_key
    from deit_train.errors import DeitTrainError

    for name in ("x.tar", "y.tar", "z"):
        (tmp_path / name).touch()
    with pytest.raises(DeitTrainError, match="that the shell made of one pattern"):
        one_value_per_key([f"data.train={tmp_path / name}" for name in ("x.tar", "y.tar", "z")])


def test_a_run_is_composed_and_checked_once_in_its_process(tmp_path, cache_dir, monkeypatch):
    """cli.py checks the config before Hydra makes the run directory, then hands the checked run to Hydra's job,
    which does not check it again: called once, not remembered (run.Run)."""
    import deit_train.schema
    from deit_train.cli import cli

    calls = []
    real_check = deit_train.schema.check
    monkeypatch.setattr(deit_train.schema, "check", lambda cfg: (calls.append(1), real_check(cfg))[1])
    monkeypatch.chdir(tmp_path)
    args = layered([*TINY, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / 'run'}"])
    monkeypatch.setattr(sys, "argv", ["deit-train", *args])
    cli()
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert len(calls) == 1


HEAVY = ("torch", "lightning", "pytorch_lightning", "transformers", "torchvision", "timm", "torchmetrics")


def heavy_imports_after(main: str, argv: list[str], cwd) -> tuple[str, subprocess.CompletedProcess]:
    """`main` (a statement that runs a console script) with sys.argv = argv in a fresh interpreter: the line
    "HEAVY [the HEAVY modules it imported] CODE <exit status>", and the process."""
    probe = (
        "import sys, runpy\n"
        f"sys.argv = {argv!r}\n"
        "try:\n"
        f"    {main}\n"
        "except SystemExit as end:\n"
        "    code = end.code or 0\n"
        "else:\n"
        "    code = 0\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "print('HEAVY', heavy, 'CODE', code)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=cwd, timeout=120)
    return next((line for line in result.stdout.splitlines() if line.startswith("HEAVY")), ""), result


@pytest.mark.parametrize(
    "args, status",
    [
        (["--help"], 0),
        (["data.batch_size=0"], 2),
        (["--cfg", "job", "model=deit_small"], 0),
        ([], 2),
        # the task's and the teacher's rules on the config, before those that build with timm or Lightning
        (["loss=hard_distill", "teacher=none"], 2),
        (["loss=hard_distill", "teacher=timm", "teacher.name=resnet10t"], 2),
        (["loss=ce", "teacher=timm", "teacher.name=resnet10t", "teacher.pretrained=true"], 2),
        (["task=mim", "data=demo", "loss=hard_distill"], 2),  # MIM's own rules on a DeiT config
        (["task=mim", "data=demo", "task.mask_patch_size=5"], 2),
        # weights named by a path that is not there (a Hub id, OWNER/NAME, is fetched when the run builds)
        (["loss=hard_distill", "teacher=timm", "teacher.name=resnet10t", "teacher.checkpoint=/nonexistent.pth"], 2),
        (["model.init=/nonexistent/run/checkpoints/last.ckpt"], 2),
        # the source's own rule: its folder is there; the default source (an ImageFolder) given none
        (["data.root=/nonexistent/imagenet"], 2),
        (["seed=1"], 2),  # no data named: refused, not the paper's 300 epochs on the demo images
        (["+modle.name=x"], 2),  # a key no node has
        (["+trainer.max_epoch=1"], 2),  # a key Lightning's Trainer does not take, read from its source
        # the data's rules that read no image: the layout, the class folders of train/ and val/
        (["data.root={folders}/flat"], 2),
        (["data.root={folders}/mismatched"], 2),
        (["data.root={folders}/empty_class"], 2),  # a class folder without images: listed until one is found
    ],
)
def test_the_command_line_answers_without_importing_torch(args, status, tmp_path, tmp_path_factory):
    """--help, --cfg job and a refusal the config alone decides (the schema's, the task's, the teacher's) or the
    data's folders decide import neither torch nor Lightning, timm, transformers or torchvision (they took seconds
    before the first answer; the data sources and labels.py import torch where a split is opened): read from a fresh
    interpreter's sys.modules."""
    folders = tmp_path_factory.mktemp("folders")
    for folder in ("flat/a", "mismatched/train/cat", "mismatched/train/dog", "mismatched/val/cat"):
        (folders / folder).mkdir(parents=True)
    for folder in ("train/cat", "train/dog", "val/cat", "val/dog"):
        (folders / "empty_class" / folder).mkdir(parents=True)
        if folder != "train/dog":
            (folders / "empty_class" / folder / "1.png").touch()
    args = [arg.format(folders=folders) for arg in args]
    main = "runpy.run_module('deit_train', run_name='__main__')"
    line, result = heavy_imports_after(main, ["deit-train", *args], tmp_path)
    assert line == f"HEAVY [] CODE {status}", result.stdout + result.stderr
    assert list(tmp_path.iterdir()) == []  # and nothing written
    if args == ["--help"]:
        assert "_schema" not in result.stdout and "powered by Hydra" not in result.stdout


@pytest.mark.parametrize("key", ["trainer.default_root_dir", "paths.output_dir", "trainer.max_epochs"])
def test_a_plus_on_a_key_that_is_there_says_so_whatever_its_value(key, capsys):
    """+key=v on a key the config has: Hydra's own advice (remove the +, or ++), also where the key holds an
    interpolation (trainer.default_root_dir: ${paths.output_dir}), whose resolution failed in Hydra's check and was
    said instead, followed by the top level's keys as if the key were unknown."""
    from deit_train.cli import refuse_bad_command_line

    with pytest.raises(SystemExit) as exited:
        refuse_bad_command_line(["experiment=demo", f"+{key}=7"])
    line = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and "\n" not in line
    assert line.endswith(
        f"An item is already at '{key}'. | Either remove + prefix: '{key}=7' | Or add a second + to add or override "
        f"'{key}': '++{key}=7'"
    )


def test_deleting_a_key_that_holds_an_interpolation_says_to_set_it(capsys):
    """~trainer.default_root_dir: Hydra resolves the value it deletes (${paths.output_dir}, the job's); it was said
    as a resolution error followed by the top level's keys as trainer's."""
    from deit_train.cli import refuse_bad_command_line

    with pytest.raises(SystemExit) as exited:
        refuse_bad_command_line(["experiment=demo", "~trainer.default_root_dir"])
    line = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and line == (
        "deit-train: error: ~trainer.default_root_dir cannot be applied: trainer.default_root_dir is an interpolation "
        "Hydra resolves only in the running job; set it instead (trainer.default_root_dir=VALUE)"
    )


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
