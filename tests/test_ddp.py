"""The paths users run at scale, on CPU processes (gloo): the paper presets under 2-process DDP and resumed,
distillation x EMA x teacher cache x bf16 together, per-rank randomness, exact distributed validation, and
two single-device launches acting as two nodes."""

import csv
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deit_train.cli import layered
from deit_train.models.trained_model import load_trained_model
from deit_train.tools.evaluate import evaluate, open_eval_folder

from .conftest import TINY, TINY_RUN, TINY_VIT, assert_metrics_reproduce, last_epoch
from .test_presets import PAPER, distills, shrink

REPO = Path(__file__).resolve().parents[1]


def deit_train(*overrides: str, run_dir: Path, cache_dir: Path, env: dict | None = None, base=TINY):
    """`deit-train` in a subprocess (DDP re-launches it once per rank), with tests/ importable for probes."""
    command = [
        sys.executable,
        "-m",
        "deit_train",
        *layered([*base, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}", *overrides]),
    ]
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.Popen(
        command, cwd=run_dir.parent, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(process: subprocess.Popen) -> str:
    output = process.communicate(timeout=400)[0]
    assert process.returncode == 0, output
    return output


def run_ok(*overrides: str, run_dir: Path, cache_dir: Path, **kwargs) -> str:
    return finish(deit_train(*overrides, run_dir=run_dir, cache_dir=cache_dir, **kwargs))


def checkpoint(run_dir: Path, name: str = "last") -> dict:
    return torch.load(run_dir / "checkpoints" / f"{name}.ckpt", map_location="cpu", weights_only=True)


def student_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in checkpoint(run_dir)["state_dict"].items() if k.startswith("student.")}


DDP = ["trainer=ddp_cpu", "trainer.devices=2"]


# Every DeiT preset; of the DeiT III ones a pre-training, a distilled pre-training and a distilled fine-tuning
# (the others differ in sizes and rates only); function matching; the FixRes teacher adaptation.
DDP_PRESETS = [preset for preset in PAPER if not preset.startswith("deit3_")] + [
    "deit3_base_192",
    "deit3_small_distilled",
    "deit3_base_distilled_224_finetune",
]


@pytest.mark.slow
@pytest.mark.parametrize("preset", DDP_PRESETS)
def test_each_preset_runs_under_ddp_and_resumes(preset, tmp_path, demo_data, random_teacher_checkpoint):
    """Two optimizer steps and a validation on 2 processes with everything the preset turns on (EMA, repeated
    augmentation, Mixup/CutMix, erasing, BCE, LAMB, a frozen backbone), then a second launch resumes from last.ckpt
    for two more."""
    data = ["data=imagefolder"] if preset == "deit_transfer" else []
    tiny = [o for o in shrink(preset, tmp_path) if "limit_train" not in o and "max_epochs" not in o]
    teacher = [f"teacher.checkpoint={random_teacher_checkpoint}", "teacher.unchecked_order=true"]
    overrides = [
        f"experiment={preset}",
        *tiny,
        *DDP,
        *data,
        f"data.root={demo_data}",
        *(teacher if distills(preset, tmp_path) else []),
        "+trainer.limit_train_batches=2",
        "resume=true",
    ]
    run_dir = tmp_path / "run"
    run_ok(*overrides, "trainer.max_epochs=1", run_dir=run_dir, cache_dir=tmp_path, base=[])
    first = checkpoint(run_dir)
    assert (first["epoch"], first["global_step"]) == (0, 2)
    output = run_ok(*overrides, "trainer.max_epochs=2", run_dir=run_dir, cache_dir=tmp_path, base=[])
    assert "resuming from" in output
    second = checkpoint(run_dir)
    assert (second["epoch"], second["global_step"]) == (1, 4)
    metrics = assert_metrics_reproduce(run_dir, demo_data)
    from omegaconf import OmegaConf

    config = OmegaConf.create(second["hyper_parameters"]["config"])
    if config.ema.decay is not None:
        assert "val_ema/acc1_percent" in metrics and any(k.startswith("ema.module.") for k in second["state_dict"])


def assert_ranks_agree(path: Path) -> None:
    """Every rank ends with the same student and EMA weights (the replicas never drift), under DDP set as experts set
    it (train.py, distributed_strategy): gradients as bucket views, no per-forward broadcast for a ViT student, the
    frozen teacher and the divergence flag ignored."""
    ranks = [torch.load(path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys() and any(k.startswith("ema.") for k in ranks[0]["state"])
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name
    ddp = ranks[0]["ddp"]
    assert ddp["broadcast_buffers"] is False and ddp["gradient_as_bucket_view"] is True
    assert "loss_diverged" in ddp["ignored"] and any(n.endswith("running_var") for n in ddp["ignored"])
    assert all(n.startswith("teacher.") or n == "loss_diverged" for n in ddp["ignored"])


@pytest.mark.parametrize("loss", ["hard_distill", "soft_distill"])
@pytest.mark.slow
def test_distillation_with_ema_teacher_cache_and_bf16_on_two_processes(
    loss, tmp_path, cache_dir, random_teacher_checkpoint
):
    overrides = [
        *DDP,
        f"loss={loss}",
        "teacher=timm",
        "teacher.name=resnet10t",
        f"teacher.checkpoint={random_teacher_checkpoint}",
        "teacher.unchecked_order=true",
        f"teacher.cache={tmp_path / 'cache'}",
        "ema.decay=0.9",
        "trainer.precision=bf16-mixed",
        "augment.mixup=0.8",
        "augment.cutmix=1.0",
        "augment.repeated_aug=2",
        "trainer.max_epochs=2",
    ]
    probe = ["+callbacks.probe._target_=tests.probes.RankStates", f"+callbacks.probe.path={tmp_path / 'ranks'}"]
    output = run_ok(*overrides, *probe, run_dir=tmp_path / "run", cache_dir=cache_dir)
    assert_ranks_agree(tmp_path / "ranks")
    for rank in (0, 1):  # the cache was filled by both ranks in the first epoch
        assert f"epoch 0, rank {rank}: 0 batches read, 5 computed" in output
    metrics = last_epoch(tmp_path / "run")
    assert {"val/acc1_percent", "val_ema/acc1_percent", "val/teacher_acc1_percent"} <= set(metrics)
    assert sorted(p.name for p in tmp_path.glob("cache/*/epoch*")) == [
        f"epoch000{e}-rank{r}-batches5.safetensors" for e in (0, 1) for r in (0, 1)
    ]
    # a second run reads every batch of both epochs from the cache and ends with the same student
    again = run_ok(*overrides, run_dir=tmp_path / "again", cache_dir=cache_dir)
    assert again.count("5 batches read, 0 computed") == 4  # 2 epochs x 2 ranks
    first, second = student_state(tmp_path / "run"), student_state(tmp_path / "again")
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.slow
def test_a_divergence_on_one_rank_ends_every_rank_with_exit_5(tmp_path, cache_dir):
    """Only rank 1's loss is NaN: the ranks decide together (tasks/module.py, stop_if_diverged), so every rank stops
    with exit 5 and one line; a rank that raised alone left the other waiting in the gradients' all-reduce."""
    import time

    started = time.monotonic()
    process = deit_train(
        *DDP,
        "+callbacks.probe._target_=tests.probes.PoisonBatch",
        "+callbacks.probe.rank=1",
        run_dir=tmp_path / "run",
        cache_dir=cache_dir,
    )
    try:
        output = process.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("a divergence on rank 1 alone left the run hanging")
    assert process.returncode == 5, output
    errors = [line for line in output.splitlines() if "error:" in line]
    assert errors and all("training loss became NaN or inf" in line for line in errors), output
    assert "Traceback" not in output
    assert time.monotonic() - started < 120


@pytest.mark.slow
def test_ranks_draw_their_own_drop_path_masks_and_views_stay_independent_of_workers(tmp_path, cache_dir):
    masks = {}
    states = {}
    for workers in (0, 2):
        run_dir = tmp_path / f"w{workers}"
        run_ok(
            *DDP,
            "model.drop_path_rate=0.5",
            "augment.repeated_aug=2",
            f"data.num_workers={workers}",
            "+callbacks.probe._target_=tests.probes.DropPathMasks",
            f"+callbacks.probe.path={run_dir / 'masks'}",
            run_dir=run_dir,
            cache_dir=cache_dir,
        )
        masks[workers] = [torch.load(run_dir / "masks" / f"rank{r}.pt") for r in (0, 1)]
        states[workers] = student_state(run_dir)
    rank0, rank1 = masks[0]
    assert rank0.shape == rank1.shape and rank0.numel() >= 16
    assert not torch.equal(rank0, rank1)  # same local index, different ranks: different masks
    assert 0 < rank0.float().mean() < 1  # something was dropped and something kept
    for a, b in zip(masks[0], masks[2], strict=True):
        assert torch.equal(a, b)
    assert all(torch.equal(states[0][k], states[2][k]) for k in states[0])  # bit-identical whatever the workers


@pytest.mark.slow
def test_distributed_validation_counts_each_image_once(tmp_path, cache_dir, demo_data):
    """39 val images on 2 processes: Lightning's sampler would count one twice; ours counts each once."""
    data = tmp_path / "odd"
    shutil.copytree(demo_data, data)
    next(iter(sorted((data / "val").glob("*/*")))).unlink()
    assert len(list((data / "val").glob("*/*"))) == 39
    run_dir = tmp_path / "run"
    run_ok(
        *DDP,
        "data=imagefolder",
        f"data.root={data}",
        "data.batch_size=16",
        "data.num_workers=0",
        "data.pin_memory=false",
        "trainer.max_epochs=2",
        run_dir=run_dir,
        cache_dir=cache_dir,
        base=[*TINY_RUN, *TINY_VIT],
    )
    metrics = last_epoch(run_dir)
    # The same checkpoint in one process: deit-eval's accuracy and the loss over all 39 images.
    trained = load_trained_model(run_dir / "checkpoints" / "last.ckpt")
    dataset = open_eval_folder(data, "val", trained)
    single = evaluate(trained, dataset, batch_size=7, num_workers=0)
    single_acc1 = single["heads"]["average"]["top1"]
    assert metrics["val/acc1_percent"] == pytest.approx(single_acc1, abs=1e-5)  # 100 k / 39 for the same k
    images, labels = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    with torch.no_grad():
        loss = F.cross_entropy(trained.model(torch.stack(images)), torch.tensor(labels))
    assert metrics["val/loss"] == pytest.approx(loss.item(), rel=1e-5)
    # best.ckpt's per-class results, counted over both ranks: what one process counts for best.ckpt
    best = load_trained_model(run_dir / "checkpoints" / "best.ckpt")
    per_best = evaluate(best, open_eval_folder(data, "val", best), batch_size=7, num_workers=0)["per_class"]
    with (run_dir / "per_class.csv").open() as file:
        counted = {row["class"]: (int(row["images"]), int(row["correct"])) for row in csv.DictReader(file)}
    assert counted == {r["class"]: (r["images"], r["correct"]) for r in per_best}
    print(
        f"2-process val/acc1 {metrics['val/acc1_percent']:.4f}% val/loss {metrics['val/loss']:.6f}; one process "
        f"acc1 {single_acc1:.4f}% loss {loss.item():.6f}"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_single_device_launches_train_as_one_two_device_node(tmp_path, cache_dir):
    """2 nodes x 1 device (two launches, Lightning's NODE_RANK / MASTER_* variables) give the same run as
    1 node x 2 devices, in one run directory."""
    common = ["augment.repeated_aug=2", "augment.mixup=0.8", "augment.cutmix=1.0", "trainer.max_epochs=2"]
    run_ok(*DDP, *common, run_dir=tmp_path / "one_node", cache_dir=cache_dir)
    port = str(free_port())
    nodes = [
        deit_train(
            "trainer=ddp_cpu",
            "trainer.devices=1",
            "trainer.num_nodes=2",
            *common,
            run_dir=tmp_path / "two_nodes",
            cache_dir=cache_dir,
            env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "NODE_RANK": str(rank)},
        )
        for rank in (0, 1)
    ]
    outputs = [finish(node) for node in nodes]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one_node", "two_nodes"]
    one, two = student_state(tmp_path / "one_node"), student_state(tmp_path / "two_nodes")
    for key in one:  # gloo may sum the gradients in another order across "nodes": fp32 rounding apart, equal
        torch.testing.assert_close(one[key], two[key], rtol=1e-5, atol=1e-6, msg=key)
    metrics = [last_epoch(tmp_path / d) for d in ("one_node", "two_nodes")]
    assert metrics[0].keys() == metrics[1].keys()
    for key, value in metrics[0].items():  # the same predictions; the mean loss of those weights to fp32 rounding
        assert metrics[1][key] == (pytest.approx(value, rel=1e-6) if key == "val/loss" else value), key
