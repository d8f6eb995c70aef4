"""Resuming and the run directory: a run stopped after an epoch (cleanly, by SIGINT, by SIGKILL) and resumed ends
with the weights of the same run done in one go; a resume applies the changes it may take and refuses the others;
a finished run, a busy directory and a refused run are left as they are."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deit_train.cli import layered

from .conftest import TINY, TINY_RUN, TINY_VIT

REPO = Path(__file__).resolve().parents[1]
# Everything that draws randomness: drop path, RandAugment and erasing (augment=deit), Mixup/CutMix, an EMA, and
# data-loader workers.
EVERYTHING = [
    "model.drop_path_rate=0.1",
    "augment.mixup=0.8",
    "augment.cutmix=1.0",
    "ema.decay=0.9",
    "data.num_workers=1",
    "trainer.max_epochs=3",
]
DDP = ["trainer=ddp_cpu", "trainer.devices=2", "augment.repeated_aug=2", "data.num_workers=2"]


def deit_train(*overrides: str, run_dir: Path, cache_dir: Path, base=TINY) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "deit_train",
        *layered([*base, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}", *overrides]),
    ]
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(command, capture_output=True, text=True, timeout=400, cwd=run_dir.parent, env=environment)


def state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def stop_then_resume(how: str, run_dir: Path, cache_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    stopped = deit_train(
        *overrides,
        "+callbacks.stop._target_=tests.probes.Interrupt",
        "+callbacks.stop.epoch=0",
        f"+callbacks.stop.how={how}",
        run_dir=run_dir,
        cache_dir=cache_dir,
    )
    expected = {"stop": 0, "sigint": 130, "sigkill": -9}[how]
    assert stopped.returncode == expected, stopped.stdout + stopped.stderr
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    resumed = deit_train(*overrides, "resume=true", run_dir=run_dir, cache_dir=cache_dir)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    return resumed


@pytest.fixture(scope="module")
def one_go(tmp_path_factory, cache_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("one_go") / "run"
    finished = deit_train(*EVERYTHING, run_dir=run_dir, cache_dir=cache_dir)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    return run_dir


@pytest.mark.parametrize("how", ["stop", "sigint", "sigkill"])
@pytest.mark.slow
def test_a_stopped_and_resumed_run_ends_with_the_weights_of_one_go(how, one_go, tmp_path, cache_dir):
    stop_then_resume(how, tmp_path / "run", cache_dir, *EVERYTHING)
    difference = max_difference(state(one_go), state(tmp_path / "run"))
    print(f"{how}: max abs weight difference to the uninterrupted run {difference:.3g}")
    assert difference == 0.0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == json.loads(
        (one_go / "metrics.json").read_text()
    )


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_to_the_weights_of_one_go(tmp_path, cache_dir):
    one_go = tmp_path / "one_go"
    assert deit_train(*EVERYTHING, *DDP, run_dir=one_go, cache_dir=cache_dir).returncode == 0
    stop_then_resume("sigkill", tmp_path / "run", cache_dir, *EVERYTHING, *DDP)
    difference = max_difference(state(one_go), state(tmp_path / "run"))
    print(f"2-process DDP, SIGKILL: max abs weight difference to the uninterrupted run {difference:.3g}")
    assert difference == 0.0


@pytest.mark.slow
def test_resume_applies_a_new_learning_rate_and_max_epochs(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    assert deit_train("trainer.max_epochs=1", run_dir=run_dir, cache_dir=cache_dir).returncode == 0
    resumed = deit_train("trainer.max_epochs=2", "optim.lr=1e-5", "resume=true", run_dir=run_dir, cache_dir=cache_dir)
    assert resumed.returncode == 0, resumed.stderr
    output = resumed.stdout + resumed.stderr
    assert "resume: optim.lr changed 0.002 -> 1e-05 (applied)" in output
    assert "resume: trainer.max_epochs changed 1 -> 2 (applied)" in output
    assert "resume: at step 5 the learning rate is the new schedule's" in output  # what max_epochs did to it
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["epoch"] == 1
    # the schedule the second epoch ran: base lr 1e-5 x 16 / 512 (the linear scaling rule), over 2 epochs
    schedule = checkpoint["lr_schedulers"][0]
    assert schedule["base_values"] == [pytest.approx(1e-5 * 16 / 512)] * len(schedule["base_values"])
    assert schedule["t_initial"] == 2 * 5  # 2 epochs of 5 steps
    assert yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())["optim"]["lr"] == 1e-5


@pytest.mark.slow
def test_resume_accepts_what_only_changes_how_the_run_runs(tmp_path, cache_dir):
    """A raised data.max_image_pixels (the fix the decompression-bomb refusal names), a check's switch and a change of
    workers were refused as changes to what the run trains: they change how it runs, and are accepted."""
    run_dir = tmp_path / "run"
    assert deit_train("trainer.max_epochs=1", run_dir=run_dir, cache_dir=cache_dir).returncode == 0
    resumed = deit_train(
        "trainer.max_epochs=2",
        "data.max_image_pixels=200000000",
        "teacher.unchecked_order=true",
        "data.num_workers=1",
        "resume=true",
        run_dir=run_dir,
        cache_dir=cache_dir,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1


@pytest.mark.parametrize(
    "change, listed",
    [
        (["model.depth=3"], "model.depth: 2 -> 3"),
        (
            ["augment.mixup=0.5", "seed=7"],
            "2 change(s) to what the run trains: augment.mixup: 0.0 -> 0.5, seed: 0 -> 7",
        ),
        (["loss.label_loss=bce", "augment.smoothing=0.0"], "loss.label_loss: ce -> bce"),
    ],
)
@pytest.mark.slow
def test_resume_refuses_a_change_to_what_is_trained_and_changes_nothing(change, listed, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    assert deit_train("trainer.max_epochs=1", run_dir=run_dir, cache_dir=cache_dir).returncode == 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    refused = deit_train("trainer.max_epochs=2", *change, "resume=true", run_dir=run_dir, cache_dir=cache_dir)
    assert refused.returncode == 2 and listed in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.suffix != ".log"}
    assert after == {p: b for p, b in before.items() if p.suffix != ".log"}


@pytest.mark.slow
def test_a_teacher_file_moved_with_the_same_bytes_resumes_another_is_refused(tmp_path, cache_dir):
    """Weights files are compared by their bytes, recorded in each checkpoint (run_dir.weights_files): the teacher's
    file moved to other storage resumes, with a line; a file of other bytes at that path is still a change to what
    the run trains. Before, any other path was refused."""
    import timm
    from safetensors.torch import save_file

    first, moved, other = tmp_path / "a" / "teacher.safetensors", tmp_path / "b" / "t.safetensors", tmp_path / "o.st"
    first.parent.mkdir()
    save_file(timm.create_model("resnet10t", num_classes=10).state_dict(), str(first))
    teacher = ["loss=hard_distill", "teacher=timm", "teacher.name=resnet10t", "teacher.unchecked_order=true"]
    run_dir = tmp_path / "run"
    started = deit_train(*teacher, f"teacher.checkpoint={first}", run_dir=run_dir, cache_dir=cache_dir)
    assert started.returncode == 0, started.stderr
    moved.parent.mkdir()
    first.rename(moved)
    save_file(timm.create_model("resnet10t", num_classes=10).state_dict(), str(other))  # other random weights
    resume = ["trainer.max_epochs=2", "resume=true"]
    refused = deit_train(*teacher, f"teacher.checkpoint={other}", *resume, run_dir=run_dir, cache_dir=cache_dir)
    assert refused.returncode == 2 and f"teacher.checkpoint: {first} -> {other}" in refused.stderr, refused.stderr
    resumed = deit_train(*teacher, f"teacher.checkpoint={moved}", *resume, run_dir=run_dir, cache_dir=cache_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resume: teacher.checkpoint moved {first} -> {moved}, the same bytes (applied)" in resumed.stdout
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1


def test_a_resume_may_change_how_its_source_reads_the_data_not_which_data(tmp_path, cache_dir, demo_data):
    """check_resume asks the source data._target_ names which of its keys only say how the data is read
    (DataSource.reading_keys): an ImageFolder moved or an HF dataset's cache moved resume; another dataset, split,
    decoding or set of shards is refused, listed."""
    from omegaconf import OmegaConf

    from deit_train.errors import DeitTrainError
    from deit_train.run_dir import check_resume

    from .conftest import compose_config

    def resumes(before: list[str], after: list[str]) -> str:
        stored = OmegaConf.to_container(compose_config(before, tmp_path / "run", cache_dir), resolve=True)
        try:
            check_resume(compose_config(after, tmp_path / "run", cache_dir), stored, None, None)
        except DeitTrainError as refused:
            return str(refused)
        return "accepted"

    folder = ["data=imagefolder", f"data.root={demo_data}"]
    assert resumes(folder, ["data=imagefolder", f"data.root={tmp_path / 'moved'}"]) == "accepted"
    assert resumes(folder, [*folder, "data.num_workers=0", "data.max_image_pixels=1000", "data.scan=off"]) == "accepted"
    assert "1 change(s) to what the run trains: data.decode: exact -> reduced" in resumes(
        folder, [*folder, "data.decode=reduced"]
    )
    hf = ["data=hf", "data.dataset=mine"]
    assert resumes(hf, [*hf, f"data.cache_dir={tmp_path / 'cache'}"]) == "accepted"
    assert "data.dataset: mine -> theirs" in resumes(hf, ["data=hf", "data.dataset=theirs"])
    assert "data.train_split: train -> extra" in resumes(hf, [*hf, "data.train_split=extra"])
    shards = ["data=webdataset", "data.train=a.tar", "data.val=b.tar"]
    assert resumes(shards, [*shards, "data.num_workers=1"]) == "accepted"  # the fix the stream's refusal names
    assert "data.train: a.tar -> c.tar" in resumes(shards, ["data=webdataset", "data.train=c.tar", "data.val=b.tar"])
    assert "data._target_" in resumes(folder, hf)  # other data altogether


def test_each_sources_reading_keys_are_its_own_keys():
    import dataclasses

    from deit_train.data.sources import cifar, demo, hf, imagefolder, webdataset

    sources = [
        demo.DemoSource,
        imagefolder.ImageFolderSource,
        hf.HFSource,
        webdataset.ShardSource,
        cifar.CIFAR10Source,
        cifar.CIFAR100Source,
    ]
    for source in sources:
        assert set(source.reading_keys) <= {field.name for field in dataclasses.fields(source)}, source


@pytest.mark.slow
def test_resume_refuses_other_classes(tmp_path, cache_dir, demo_data):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    run_dir = tmp_path / "run"
    base = [*TINY_RUN, *TINY_VIT, "data=imagefolder", f"data.root={data}", "data.batch_size=16"]
    assert deit_train("trainer.max_epochs=1", run_dir=run_dir, cache_dir=cache_dir, base=base).returncode == 0
    for split in ("train", "val"):
        (data / split / "circle").rename(data / split / "disc")
    refused = deit_train("trainer.max_epochs=2", "resume=true", run_dir=run_dir, cache_dir=cache_dir, base=base)
    assert refused.returncode == 2 and "the data's classes" in refused.stderr and "disc" in refused.stderr


@pytest.mark.slow
def test_resume_of_a_finished_run_leaves_it_as_it_is(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    assert deit_train("trainer.max_epochs=1", run_dir=run_dir, cache_dir=cache_dir).returncode == 0
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()}
    again = deit_train("trainer.max_epochs=1", "resume=true", run_dir=run_dir, cache_dir=cache_dir)
    assert again.returncode == 0 and "has finished its 1 epochs" in again.stdout, again.stdout + again.stderr
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()} == before
    # The same command without resume=true would train again over it: refused, nothing touched.
    anew = deit_train("trainer.max_epochs=1", "optim.lr=0.5", run_dir=run_dir, cache_dir=cache_dir)
    assert anew.returncode == 2 and anew.stderr.count("\n") == 1, anew.stdout + anew.stderr
    assert "holds an earlier run (best.ckpt, last.ckpt, metrics.json, csv/version_0/metrics.csv)" in anew.stderr
    assert "resume=true continues it" in anew.stderr
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_a_second_run_into_a_busy_directory_is_refused_naming_the_first(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deit_train",
            *layered(
                [
                    *TINY,
                    f"paths.cache_dir={cache_dir}",
                    f"hydra.run.dir={run_dir}",
                    "trainer.max_epochs=2",
                    "+callbacks.pause._target_=tests.probes.Pause",
                ]
            ),
        ],  # held after its first epoch
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        for _ in range(1200):
            if (run_dir / "checkpoints" / "last.ckpt").is_file():
                break
            time.sleep(0.1)
        before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.suffix != ".log"}
        second = deit_train("trainer.max_epochs=1", "seed=3", run_dir=run_dir, cache_dir=cache_dir)
        assert second.returncode == 6, second.stderr
        assert f"is in use by another deit-train run (pid {first.pid} on" in second.stderr
        assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.suffix != ".log"} == before
    finally:
        first.kill()
        first.wait()
    # The killed run's lock is stale: the kernel released it, and the next run takes the directory over.
    resumed = deit_train("trainer.max_epochs=2", "resume=true", run_dir=run_dir, cache_dir=cache_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert f"took over the lock of a run that ended without releasing it (pid {first.pid}" in resumed.stdout


def test_steps_per_epoch_counts_as_lightning_does(tiny_config):
    """The data module counts the schedule's steps without making the loader; Lightning's estimate agrees."""
    from deit_train.train import train

    cases = (
        [],
        ["trainer.accumulate_grad_batches=2"],
        ["+trainer.limit_train_batches=3"],
        ["+trainer.limit_train_batches=0.5", "trainer.accumulate_grad_batches=2"],
    )
    for i, overrides in enumerate(cases):
        run = train(tiny_config(*overrides, run=f"case{i}"))
        estimated = run.trainer.estimated_stepping_batches // run.trainer.max_epochs
        assert run.datamodule.steps_per_epoch() == estimated == run.trainer.global_step, overrides


@pytest.mark.slow
def test_a_full_disk_during_a_save_ends_in_one_line_and_keeps_the_last_checkpoint(tmp_path, cache_dir):
    import resource

    run_dir = tmp_path / "run"
    assert deit_train("trainer.max_epochs=1", run_dir=run_dir, cache_dir=cache_dir).returncode == 0
    last = run_dir / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    limit = len(before) // 2  # no file may grow past half a checkpoint: the next save cannot be written

    command = [
        sys.executable,
        "-m",
        "deit_train",
        *layered(
            [*TINY, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}", "trainer.max_epochs=2", "resume=true"]
        ),
    ]
    full = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=400,
        cwd=tmp_path,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    assert full.returncode == 4, full.stderr
    assert full.stderr.strip().splitlines()[-1].startswith("deit-train: error: could not write the checkpoint")
    assert "Traceback" not in full.stderr
    assert last.read_bytes() == before
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))  # no half-written file left beside it


# ------------------------------------------------------------------ nothing finished is ever overwritten

RESULT_FILES = ("checkpoints/last.ckpt", "checkpoints/best.ckpt", "metrics.json", "csv/version_0/metrics.csv")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache_dir) -> Path:
    """A finished one-epoch run (in this process): last.ckpt, best.ckpt, metrics.json and its CSV log."""
    from deit_train.train import train

    from .conftest import compose_config

    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train(compose_config(TINY, run_dir, cache_dir))
    assert all((run_dir / name).is_file() for name in RESULT_FILES)
    return run_dir


def snapshot(run_dir: Path) -> dict:
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".deit-train.lock"}


@settings(max_examples=14, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    kept=st.sets(st.sampled_from(RESULT_FILES), min_size=1),
    resume=st.booleans(),
    seed=st.sampled_from([0, 7]),
    from_best=st.booleans(),
)
def test_a_directory_with_results_is_continued_from_a_matching_checkpoint_or_refused(
    kept, resume, seed, from_best, finished_run, tmp_path_factory, cache_dir
):
    """Any part of a finished run's results (drawn), started again with resume=true or not, the same seed or
    another, from its best.ckpt or not: either it continues from a checkpoint of the same config, or it is refused
    before anything changes. Never trained again from scratch over the results."""
    from deit_train.errors import DeitTrainError
    from deit_train.train import train

    from .conftest import compose_config

    run_dir = tmp_path_factory.mktemp("drawn") / "run"
    for name in kept:
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_bytes((finished_run / name).read_bytes())
    from_best = from_best and "checkpoints/best.ckpt" in kept
    overrides = [f"seed={seed}", f"resume={str(resume).lower()}"]
    if from_best:
        overrides.append(f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}")
    before = snapshot(run_dir)
    continues_from = "best" if from_best else "last" if resume and "checkpoints/last.ckpt" in kept else None
    try:
        run = train(compose_config([*TINY, *overrides], run_dir, cache_dir))
    except DeitTrainError as error:
        message = str(error)
        assert "\n" not in message
        if continues_from is None:  # no checkpoint to continue: the message names the fix
            assert "hydra.run.dir=" in message, message
            if "checkpoints/last.ckpt" not in kept and "checkpoints/best.ckpt" in kept:
                assert f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}" in message, message
        else:  # a checkpoint, but of another seed
            assert seed != 0 and "seed: 0 -> 7" in message, message
        assert snapshot(run_dir) == before
        return
    only_logs = kept and all(name.startswith(("csv/", "tensorboard/")) for name in kept)
    if only_logs:  # a start that saved no checkpoint: nothing trained to lose, it starts again
        assert run.trainer is not None and (run_dir / "checkpoints" / "last.ckpt").is_file()
        return
    assert continues_from is not None and seed == 0, (kept, resume, seed, from_best)
    if run.trainer is None:  # finished: left as it was
        assert continues_from == "last" and "metrics.json" in kept and snapshot(run_dir) == before


@pytest.mark.slow
def test_a_finished_run_is_neither_retrained_without_its_last_ckpt_nor_finished_under_another_seed(tmp_path, cache_dir):
    """The red team's cases: resume=true of a finished run with another seed is refused like any resume (not
    reported as finished); with its last.ckpt gone it is refused, naming best.ckpt, rather than trained again from
    scratch over best.ckpt and metrics.json; the fix it names continues the run."""
    run_dir = tmp_path / "run"
    assert deit_train("trainer.max_epochs=1", run_dir=run_dir, cache_dir=cache_dir).returncode == 0
    before = snapshot(run_dir)
    other_seed = deit_train("trainer.max_epochs=1", "seed=7", "resume=true", run_dir=run_dir, cache_dir=cache_dir)
    assert other_seed.returncode == 2 and len(other_seed.stderr.strip().splitlines()) == 1, other_seed.stderr
    assert "seed: 0 -> 7" in other_seed.stderr and "has finished" not in other_seed.stdout
    assert {p: b for p, b in snapshot(run_dir).items() if p.suffix != ".log"} == {
        p: b for p, b in before.items() if p.suffix != ".log"
    }
    (run_dir / "checkpoints" / "last.ckpt").unlink()
    before = snapshot(run_dir)
    best = run_dir / "checkpoints" / "best.ckpt"
    for resume in ("true", "false"):
        again = deit_train("trainer.max_epochs=1", f"resume={resume}", run_dir=run_dir, cache_dir=cache_dir)
        assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1, again.stderr
        assert f"ckpt_path={best}" in again.stderr and "starting from scratch" not in again.stdout + again.stderr
        assert {p: b for p, b in snapshot(run_dir).items() if p.suffix != ".log"} == {
            p: b for p, b in before.items() if p.suffix != ".log"
        }
    go_on = deit_train("trainer.max_epochs=2", f"ckpt_path={best}", run_dir=run_dir, cache_dir=cache_dir)
    assert go_on.returncode == 0, go_on.stderr
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1  # one more epoch
