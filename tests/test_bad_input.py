"""Every value checked before training: a corpus of bad command lines, each refused with exit status 2 and one
line naming the key, the value and what is allowed; and a few through the real console script."""

import subprocess
import sys

import pytest

from deit_train.cli import refuse_bad_command_line

# (command line after `deit-train experiment=demo`, what the one line must name), by config group.
CORPUS = {
    "model": [
        ("model=deit_huge", "model/deit_huge"),
        ("model.depht=3", "(did you mean model.depth?)"),  # a misspelt key: the key it resembles
        ("modle.name=x", "the config takes: model, teacher"),  # the top level's keys, named as such
        # + adds any key: one no node has a place for is refused, not carried along unread while the run trains
        ("+modle.name=x", "modle is not a key of the config: the config takes: model"),
        ("+model.dept=3", "(did you mean model.depth?)"),
        ("+model._depth=3", "model._depth is not a key of the config"),  # only Hydra's own _keys_ are left alone
        # the groups of objects to build take nodes with a _target_, or null
        ("+logger.foo=1", "logger.foo=1: expected a logger node with _target_"),
        ("+callbacks.foo=1", "callbacks.foo=1: expected a callbacks node with _target_"),
        ("model.img_size=abc", "model.img_size"),
        ("model.img_size=30", "model.img_size=30"),  # not a multiple of the 4 px patches
        ("model.drop_path_rate=1.5", "model.drop_path_rate=1.5"),
        ("model.num_heads=5", "model.num_heads=5"),  # 192 is not divisible by 5
        ("model.depth=0", "model.depth=0"),
    ],
    "teacher": [
        ("teacher.cache_topk=-1", "teacher.cache_topk=-1"),
        ("loss=hard_distill", "needs a teacher"),
        ("teacher=nonexistent", "teacher/nonexistent"),
        ("teacher.pretrained=perhaps", "teacher.pretrained"),
        (
            "loss=hard_distill teacher=ensemble teacher.members=[{name:resnet10t,checkpoint:a}]",
            "teacher.members",
        ),
        ("loss=hard_distill teacher=timm teacher.members=[{name:resnet10t},{name:resnet18}]", "teacher.name"),
        ("loss=hard_distill teacher=ensemble teacher.members=[{nme:resnet10t}]", "nme"),
        ("teacher.img_size=0", "teacher.img_size=0"),
        (
            "loss=hard_distill teacher=ensemble teacher.members=[{name:a,img_size:0},{name:b}]",
            "teacher.members.0.img_size=0",
        ),
    ],
    "loss": [
        ("loss=soft_distill loss.alpha=1.5", "loss.alpha=1.5"),
        ("loss.tau=0", "loss.tau=0"),
        ("loss.kl_reduction=mean", "loss.kl_reduction=mean"),
        ("loss.distillation_type=medium", "loss.distillation_type=medium"),
        ("loss=soft", "loss/soft"),
        ("loss.label_loss=focal", "loss.label_loss=focal"),
        ("loss=bce", "augment.smoothing=0.1"),  # DeiT III binarises the targets: smoothing would make all 1s
        ("loss=bce augment.smoothing=0 loss.bce_target_threshold=1.5", "loss.bce_target_threshold=1.5"),
    ],
    "data": [
        ("data.batch_size=0", "data.batch_size=0"),
        ("data.batch_size=abc", "data.batch_size"),
        ("data.num_workers=-1", "data.num_workers=-1"),
        ("data=imagefolder", "data.root"),
        # another source's key: the keys this source takes, not Hydra's "+key" advice, which is refused as well
        ("data=imagefolder data.root=/tmp data.dataset=x", "data takes: batch_size"),
        ("data=imagefolder data.root=/tmp +data.dataset=x", "data.dataset is not a key of the config: data takes:"),
        ("data._target_=os.path.join", "data._target_=os.path.join"),
        ("data.pin_memory=perhaps", "data.pin_memory"),
        ("data.batch_size=6 trainer=ddp_cpu augment.mixup=0.8", "data.batch_size=6"),  # 3 per device: odd
        ("data.batch_size=7 trainer=ddp_cpu", "data.batch_size=7"),  # does not split over 2 devices
    ],
    "augment": [
        ("augment.crop=foo", "augment.crop=foo"),
        ("augment.repeated_aug=0", "augment.repeated_aug=0"),
        ("augment.reprob=2", "augment.reprob=2"),
        ("augment.mixup=-0.5", "augment.mixup=-0.5"),
        ("augment.smoothing=1.0", "augment.smoothing=1.0"),
        ("augment.scale=[0.5,0.1]", "augment.scale"),
        ("augment.eval_crop_pct=0", "augment.eval_crop_pct=0"),
        # the eval transform would drop what is asked beside it
        ("augment.crop=center", "augment.reprob=0.25"),
        ("augment=none augment.auto_augment=rand-m9-mstd0.5-inc1", "augment.auto_augment=rand-m9-mstd0.5-inc1"),
        ("augment=none augment.color_jitter=0.4", "augment.color_jitter=0.4"),
    ],
    "optim": [
        ("optim.lr=-1", "optim.lr=-1"),
        ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1"),
        ("optim.warmup_epochs=-1", "optim.warmup_epochs=-1"),
        ("optim.lr_batch_ref=0", "optim.lr_batch_ref=0"),
    ],
    "trainer": [
        ("trainer.precision=17", "trainer.precision=17"),
        ("trainer.precision=16-true", "trainer.precision=16-true"),  # fp16 AdamW state: diverged at its first step
        ("trainer.max_epochs=0", "trainer.max_epochs=0"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0"),
        ("trainer=tpu", "trainer/tpu"),
        ("trainer.max_epochs=2.5", "trainer.max_epochs=2.5: expected a whole number"),
        ("trainer.devices=0", "trainer.devices=0"),
        ("+trainer.limit_train_batches=0", "trainer.limit_train_batches=0"),  # would train nothing, save nothing
        # a key the Trainer does not take, before Lightning is imported (8 s later, by Lightning, before)
        (
            "+trainer.max_epoch=1",
            "trainer.max_epoch is not an argument of Lightning's Trainer (did you mean trainer.max_epochs?)",
        ),
        ("+trainer.foo=1", "trainer.foo is not an argument of Lightning's Trainer: its arguments are listed at https:"),
        ("+trainer._foo=1", "trainer._foo is not an argument"),  # Hydra's keys are _target_, _recursive_, ...
        ("trainer._target_=lightning.Trainer +trainer.max_epoch=1", "(did you mean trainer.max_epochs?)"),  # its alias
        ("trainer.check_val_every_n_epoch=50", "at most trainer.max_epochs=35"),  # would never validate
        ("loss.tau=inf", "loss.tau=inf"),  # inf and nan are never a setting
        ("optim.weight_decay=nan", "optim.weight_decay=nan"),
        ("data.train_per_class=0", "data.train_per_class=0"),
        ("augment.eval_crop_pct=0.001", "augment.eval_crop_pct=0.001"),
        # a timm ViT built at one size and fed another ended in an AssertionError read as "a bug"
        ("+model.kwargs.img_size=64", "model.kwargs.img_size=64: expected model.img_size=32, the size the data is"),
    ],
    "task": [
        ("task=mim task.mask_ratio=1.5", "task.mask_ratio=1.5"),
        ("task=mim task.mask_patch_size=24", "task.mask_patch_size=24"),  # does not divide 32
        ("task=segment", "task/segment"),
        ("task.pictures=2", "task.pictures"),  # the default task has no such field
        ("task=mim task.pictures=-2", "task.pictures=-2"),
        ("task._target_=nowhere.Segment", "task._target_=nowhere.Segment is not a deit-train task"),
        # a callable that is not a task is not called (it was: print ran with the task's fields)
        ("++task._target_=builtins.print", "task._target_=builtins.print is not a deit-train task"),
        ("task=mim loss=hard_distill", "task=mim"),
        ("task=mim model=bit_r50x1", "task=mim needs a ViT/DeiT student"),
        ("task=mim model.name=resnet10t", "task=mim needs a ViT/DeiT student"),  # before any mask-size rule
    ],
    "run": [
        ("ema.decay=1.5", "ema.decay=1.5"),
        ("ema.decay=abc", "ema.decay"),
        ("seed=abc", "seed"),
        ("seed=-1", "seed=-1: expected a seed in [0, 2**32 - 1]"),
        ("seed=4294967296", "seed=4294967296"),
        ("resume=perhaps", "resume"),
        ("debug=nope", "debug/nope"),
        ("hydra.run.dir=", "hydra.run.dir is empty"),  # would write into the current folder
        ("paths.cache_dir=", "paths.cache_dir is empty"),
        ("optim.name=adamx", "optim.name=adamx: expected a timm optimizer"),
        ("optim.schedule=cosinus", "optim.schedule=cosinus"),
        ("augment.auto_augment=garbage", "augment.auto_augment=garbage: expected a timm policy"),
        ("trainer.limit_val_batches=0", "To append to your config use +trainer.limit_val_batches=0"),
    ],
}
CASES = [(group, line, named) for group, lines in CORPUS.items() for line, named in lines]


def test_the_corpus_covers_every_group_with_at_least_thirty_lines():
    assert len(CASES) >= 30
    assert {"model", "teacher", "loss", "data", "augment", "optim", "trainer", "task"} <= set(CORPUS)


@pytest.mark.parametrize("group,line,named", CASES, ids=[line for _, line, _ in CASES])
def test_a_bad_value_is_refused_in_one_line_before_the_run(group, line, named, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        refuse_bad_command_line(["experiment=demo", *line.split()])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("deit-train: error: ") and named in lines[0], lines[0]
    assert "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []  # no run directory: nothing a later resume=true could trip on


@pytest.mark.parametrize(
    "line",
    [
        "model=deit_tiny",
        "loss=soft_distill teacher=timm teacher.checkpoint=x.pt",
        "data.batch_size=8 trainer=ddp_cpu augment.mixup=0.8",
        "+trainer.fast_dev_run=true +trainer.profiler=simple",  # Lightning's own arguments, added with +
    ],
)
def test_good_command_lines_pass_the_check(line, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.pt").touch()  # a teacher.checkpoint that is there (what it holds is read when the run builds)
    refuse_bad_command_line(["experiment=demo", *line.split()])
    assert capsys.readouterr().err == ""


def test_the_trainer_arguments_read_from_lightnings_source_are_its_signatures():
    """schema.lightning_trainer_arguments parses the installed Trainer's source instead of importing it (seconds):
    the names it reads are the ones inspect finds on the imported class."""
    import inspect

    from lightning.pytorch import Trainer

    from deit_train.schema import lightning_trainer_arguments

    assert lightning_trainer_arguments() == list(inspect.signature(Trainer.__init__).parameters)[1:]


def test_sweeps_and_hydra_flags_are_left_to_hydra(capsys):
    refuse_bad_command_line(["-m", "optim.lr=-1,1"])  # each job checks its own config
    refuse_bad_command_line(["optim.lr=-1,1"])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "line,named",
    [
        ("loss=soft_distill loss.alpha=1.5", "loss.alpha=1.5"),
        ("data.batch_size=abc", "data.batch_size"),
        ("data.batch_size=6 trainer=ddp_cpu augment.mixup=0.8", "data.batch_size=6"),
        # paths that cannot be made (procfs takes no new folders): one line, not Hydra's traceback or "a bug"
        pytest.param(  # found where the run makes it, after the checks: Lightning imported (about 8 s)
            "hydra.run.dir=/proc/deit-train-run",
            "hydra.run.dir=/proc/deit-train-run cannot be made",
            marks=pytest.mark.slow,
        ),
        ("paths.cache_dir=/proc/deit-train-cache", "set paths.cache_dir (or data.cache_dir) to a writable folder"),
        ("-m seed=1,2 --cfg job", "--cfg and --multirun together: choose one"),  # Hydra's ValueError otherwise
    ],
)
def test_the_console_script_exits_2_with_one_line(line, named, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "deit_train", "experiment=demo", *line.split()],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    output = (result.stdout + result.stderr).strip().splitlines()
    assert output == [output[0]] and named in output[0], output
    assert list(tmp_path.iterdir()) == []


def test_a_run_directory_that_cannot_be_written_is_refused_before_hydra_makes_it(tmp_path):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(read_only)]).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "deit_train", "experiment=demo", f"hydra.run.dir={read_only}/run"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=120,
        )
    finally:
        subprocess.run(["umount", str(read_only)])
    assert result.returncode == 4, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        f"deit-train: error: hydra.run.dir={read_only}/run: {read_only} cannot be written (read-only or no "
        f"permission); choose a writable path"
    ]
