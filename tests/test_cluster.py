"""The SLURM launcher on a real one-node Slurm cluster (scripts/slurm_local.sh): a CPU sweep, a 2-task DDP job,
and a job preempted (warned with SIGUSR1, then requeued) that resumes from its last checkpoint."""

import csv
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deit_train.cli import layered

from .conftest import TINY_DEMO, TINY_RUN, TINY_VIT, assert_metrics_reproduce, last_epoch

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slurm


@pytest.fixture(scope="session")
def slurm_cluster():
    """The local cluster, started (idempotently) by the script users run; skipped only where it cannot be had."""
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (scripts/slurm_local.sh)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("no Slurm and no apt-get to install it")
    started = subprocess.run(["bash", str(REPO / "scripts" / "slurm_local.sh")], capture_output=True, text=True)
    assert started.returncode == 0, started.stdout + started.stderr
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")


def slurm_sweep(*overrides: str, tmp_path: Path, cache_dir: Path) -> list[str]:
    """`deit-train -m hydra/launcher=slurm` with the tiny demo run, one CPU per task."""
    return [
        sys.executable,
        "-m",
        "deit_train",
        "--multirun",
        *layered(
            [
                "hydra/launcher=slurm",
                "hydra.launcher.cpus_per_task=1",
                "hydra.launcher.timeout_min=10",
                "trainer.accelerator=cpu",
                *TINY_RUN,
                *TINY_DEMO,
                *TINY_VIT,
                f"paths.cache_dir={cache_dir}",
                f"hydra.sweep.dir={tmp_path / 'sweep'}",
                *overrides,
            ]
        ),
    ]


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd)


def submission(sweep: Path) -> str:
    """The sweep's sbatch script: submitit submits the jobs of a sweep as one job array."""
    (script,) = sweep.glob(".submitit/*/*_submission.sh")
    return script.read_text()


def slurm_jobs(sweep: Path) -> list[str]:
    """The Slurm ids of the sweep's jobs (JOBID, or ARRAYID_INDEX for several), which name their log folders."""
    return sorted(p.parent.name for p in (sweep / ".submitit").glob("*/*_log.out"))


@pytest.mark.slow
def test_a_cpu_sweep_runs_as_two_slurm_jobs_without_a_gpu_request(slurm_cluster, tmp_path, cache_dir, demo_data):
    result = run(slurm_sweep("seed=0,1", tmp_path=tmp_path, cache_dir=cache_dir), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    sweep = tmp_path / "sweep"
    for job in ("0", "1"):
        assert_metrics_reproduce(sweep / job, demo_data)  # each job's metrics are its own weights'
    seeds = [torch.load(sweep / job / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for job in "01"]
    assert not torch.equal(seeds[0]["student.head.weight"], seeds[1]["student.head.weight"])  # seed=0,1 differ
    script = submission(sweep)
    assert "--gpus" not in script and "--gres" not in script  # sbatch would refuse it on a CPU cluster
    assert "#SBATCH --ntasks-per-node=1" in script and "#SBATCH --array=0-1" in script
    assert len(slurm_jobs(sweep)) == 2


@pytest.mark.slow
def test_a_two_task_ddp_job_takes_its_ranks_from_slurm(slurm_cluster, tmp_path, cache_dir):
    command = slurm_sweep("trainer=ddp_cpu", "trainer.devices=2", tmp_path=tmp_path, cache_dir=cache_dir)
    result = run(command, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    sweep = tmp_path / "sweep"
    assert "#SBATCH --ntasks-per-node=2" in submission(sweep)
    assert sorted(p.name for p in sweep.iterdir() if not p.name.startswith(".")) == ["0", "multirun.yaml"]
    assert 0 <= last_epoch(sweep / "0")["val/acc1_percent"] <= 100
    assert sorted(p.name for p in (sweep / "0" / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    logs = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.*"))
    for rank in (0, 1):  # Lightning read both ranks from Slurm's variables (no process re-launched per rank)
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in logs, logs
    checkpoint = torch.load(sweep / "0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 80 // 16  # the global batch of 16 split over the two tasks


def scontrol_show(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout


def logged_epochs(run_dir: Path) -> dict[str, list[int]]:
    """The epochs each CSV logger version recorded validation for."""
    epochs = {}
    for metrics_file in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with metrics_file.open() as file:
            rows = [row for row in csv.DictReader(file) if row.get("val/acc1")]
        epochs[metrics_file.parent.name] = [int(row["epoch"]) for row in rows]
    return epochs


@pytest.mark.slow
def test_a_preempted_job_is_requeued_and_resumes_from_its_last_checkpoint(slurm_cluster, tmp_path, cache_dir):
    """The first run is warned (SIGUSR1) and requeued (SIGTERM, then killed) once its first epoch's checkpoint
    exists; the job comes back in the same directory, resumes optimizer, schedule, EMA, epoch and step, finishes
    every epoch, continues the same W&B run, and the -m command exits 0."""
    epochs = 20  # about 10 s of training: the requeue lands well before the end
    command = slurm_sweep(
        f"trainer.max_epochs={epochs}",
        "data.num_workers=2",
        "ema.decay=0.9",
        "augment.mixup=0.8",
        "augment.cutmix=1.0",
        "logger=[csv,wandb]",
        tmp_path=tmp_path,
        cache_dir=cache_dir,
    )
    env = {**os.environ, "WANDB_MODE": "offline"}
    sweep_process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    run_dir = tmp_path / "sweep" / "0"
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and sweep_process.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert last.exists(), sweep_process.communicate()[0]
    (job_id,) = slurm_jobs(tmp_path / "sweep")
    subprocess.run(["scancel", "--signal=USR1", "--full", job_id], check=True)
    time.sleep(0.5)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    before = torch.load(last, map_location="cpu", weights_only=True)["epoch"]
    # Slurm holds a requeued job for about two minutes; start it as soon as it is pending again.
    while "JobState=PENDING" not in scontrol_show(job_id) and sweep_process.poll() is None:
        time.sleep(0.2)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)

    output = sweep_process.communicate(timeout=300)[0]
    assert sweep_process.returncode == 0, output
    assert re.search(r"Restarts=1\b", scontrol_show(job_id))
    logs = "".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit" / job_id).glob("*_log.*"))
    assert "received SIGUSR1" in logs and "stopped by SIGTERM at epoch" in logs
    assert "Slurm requeued this job (restart 1): resuming from" in logs
    final = torch.load(last, map_location="cpu", weights_only=True)
    assert (final["epoch"], final["global_step"]) == (epochs - 1, epochs * 5)  # every epoch, 5 steps each
    assert "ema.module.head.weight" in final["state_dict"]
    # The CSV logger: the first launch logged from epoch 0, the requeued one from after its checkpoint.
    versions = logged_epochs(run_dir)
    assert sorted(versions) == ["version_0", "version_1"], versions
    assert versions["version_0"][0] == 0 and versions["version_1"][0] > 0
    assert versions["version_1"][-1] == epochs - 1
    assert set(versions["version_0"]) | set(versions["version_1"]) == set(range(epochs))
    # One W&B run id for both launches (offline runs are named offline-run-<time>-<id>).
    wandb_ids = {p.name.rsplit("-", 1)[-1] for p in run_dir.glob("wandb/offline-run-*")}
    assert len(wandb_ids) == 1, wandb_ids
    print(f"requeued at epoch {before}; resumed to epoch {final['epoch']}, step {final['global_step']}")
