"""The cluster as it runs, simulated on CPU processes: the variables Slurm and submitit set for each task, a given CPU
affinity, gloo for NCCL, and the Python-level collectives counted from outside (tests/collectives/sitecustomize.py).
What each task reads (its device, its CPUs, its run directory) is compared with what Lightning's trainer reads."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment, TorchElasticEnvironment
from omegaconf import OmegaConf

from deit_train.cli import layered
from deit_train.cluster import cluster_environment, gpu_index, run_name, slurm_job, usable_cpus
from deit_train.data import DeiTDataModule

from .conftest import TINY
from .test_data import data_config

REPO = Path(__file__).resolve().parents[1]
COUNTER = Path(__file__).parent / "collectives"


def slurm_task_environment(rank: int, tasks: int, port: int, job: str = "4242", cpus_per_task: int = 1) -> dict:
    """What `srun --ntasks=N --cpus-per-task=C` (or submitit's job, which is such a step) sets for task `rank` on one
    node: no LOCAL_RANK, no RANK."""
    return {
        "SLURM_JOB_ID": job,
        "SLURM_JOB_NAME": "deit",
        "SLURM_STEP_ID": "0",
        "SLURM_NTASKS": str(tasks),
        "SLURM_NTASKS_PER_NODE": str(tasks),
        "SLURM_TASKS_PER_NODE": str(tasks),
        "SLURM_CPUS_PER_TASK": str(cpus_per_task),
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank),
        "SLURM_NODEID": "0",
        "SLURM_NNODES": "1",
        "SLURM_NODELIST": "localhost",
        "SLURM_JOB_NODELIST": "localhost",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def without_launch_variables() -> dict:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SUBMITIT_")) and k not in ("LOCAL_RANK", "RANK", "NODE_RANK", "WORLD_SIZE")
    }


@pytest.fixture
def slurm_task(monkeypatch):
    def enter(rank: int, tasks: int = 8, **kwargs) -> None:
        for key in [k for k in os.environ if k.startswith("SLURM_")] + ["LOCAL_RANK", "RANK", "WORLD_SIZE"]:
            monkeypatch.delenv(key, raising=False)
        for key, value in slurm_task_environment(rank, tasks, 29500, **kwargs).items():
            monkeypatch.setenv(key, value)

    return enter


@pytest.mark.parametrize("rank", [0, 3, 7])
def test_each_slurm_task_takes_the_device_of_its_local_rank_as_the_trainer_does(slurm_task, rank, monkeypatch):
    """Slurm sets SLURM_LOCALID, not LOCAL_RANK: every task of a node put its checks on GPU 0. The local rank is the
    trainer's own (a Lightning Trainer built on the same environment), and its GPU Lightning's parallel device."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    slurm_task(rank)
    environment = cluster_environment()
    assert isinstance(environment, SLURMEnvironment) and not environment.auto_requeue
    # the trainer sets the process's rank for Lightning's rank-zero-only logging: put it back after the test
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # SLURMEnvironment writes it into the environment
    trainer = L.Trainer(
        accelerator="cpu", devices=8, strategy="ddp", plugins=[environment], logger=False, enable_progress_bar=False
    )
    assert trainer.strategy.local_rank == environment.local_rank() == rank
    assert gpu_index(environment.local_rank(), 8, visible=8) == rank
    assert gpu_index(environment.local_rank(), [8 + i for i in range(8)], visible=16) == 8 + rank  # devices=[8..15]
    assert gpu_index(environment.local_rank(), 8, visible=1) == 0  # --gpus-per-task=1: the task's own GPU


def test_torchrun_inside_a_slurm_job_keeps_torchrun_ranks(slurm_task, monkeypatch):
    """Lightning puts TorchElastic before Slurm (torchrun inside an sbatch script); so does the device choice."""
    slurm_task(0, tasks=1)
    for key, value in {"LOCAL_RANK": "2", "RANK": "2", "WORLD_SIZE": "4", "GROUP_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    environment = cluster_environment()
    assert isinstance(environment, TorchElasticEnvironment) and environment.local_rank() == 2


def test_outside_any_launcher_the_environment_is_lightnings_own(monkeypatch):
    for key in [k for k in os.environ if k.startswith("SLURM_")] + ["LOCAL_RANK", "RANK", "TORCHELASTIC_RUN_ID"]:
        monkeypatch.delenv(key, raising=False)
    assert isinstance(cluster_environment(), LightningEnvironment)


class Trainer8:
    num_devices, world_size, accumulate_grad_batches = 8, 8, 1


def auto_workers(tmp_path, monkeypatch, cpus: set[int], topology: Path | None = None) -> int:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: cpus)
    if topology is not None:
        monkeypatch.setattr("deit_train.cluster.CPU_TOPOLOGY", topology)
    data = data_config("imagefolder", root=str(tmp_path), num_workers="auto", batch_size=64)
    module = DeiTDataModule(data, OmegaConf.create({"mixup": 0.0, "cutmix": 0.0}), 16)
    module.trainer = Trainer8()
    return module.workers


def test_a_slurm_task_bound_to_its_own_cpus_gets_workers_from_all_of_them(slurm_task, tmp_path, monkeypatch, caplog):
    """srun --ntasks-per-node=8 --cpus-per-task=10: each task's affinity is its own 10 CPUs. Dividing them again by
    the node's 8 devices gave 10 // 8 - 1 = 0 workers (decoding in the training process)."""
    slurm_task(3, cpus_per_task=10)
    with caplog.at_level("INFO"):
        assert auto_workers(tmp_path, monkeypatch, set(range(30, 40))) == 9
    assert "data.num_workers=auto: 9 data-loader worker(s) for this device (10 CPU core(s) for it)" in caplog.text


def test_a_node_wide_affinity_is_shared_by_the_nodes_devices(tmp_path, monkeypatch):
    """One process per node that starts the others (trainer=ddp, torchrun) sees the node's CPUs: 64 / 8 - 1."""
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key, raising=False)
    assert auto_workers(tmp_path, monkeypatch, set(range(64))) == 7


def write_topology(root: Path, threads: int, threads_per_core: int) -> Path:
    """A kernel topology tree: logical CPU i is thread i // cores of core i % cores (Linux numbers siblings apart)."""
    cores = threads // threads_per_core
    for cpu in range(threads):
        folder = root / f"cpu{cpu}" / "topology"
        folder.mkdir(parents=True)
        (folder / "physical_package_id").write_text(f"{(cpu % cores) // (cores // 2)}\n")
        (folder / "core_id").write_text(f"{cpu % cores}\n")
    return root


def test_hyperthreads_of_one_core_count_once(tmp_path, monkeypatch):
    """A 224-thread node of 112 cores, 8 devices, no binding: 112 / 8 - 1 = 13 workers per rank, not 27."""
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key, raising=False)
    topology = write_topology(tmp_path / "cpu", threads=224, threads_per_core=2)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(224)))
    monkeypatch.setattr("deit_train.cluster.CPU_TOPOLOGY", tmp_path / "unreadable")
    assert usable_cpus(8) == 224 // 8  # no topology to read: logical CPUs
    assert auto_workers(tmp_path, monkeypatch, set(range(224)), topology) == 13


def test_auto_workers_never_exceed_what_shared_memory_holds(tmp_path, monkeypatch, caplog):
    """num_workers=auto chose a count that its own shared-memory check then refused: now it chooses fewer."""
    import shutil
    from collections import namedtuple

    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key, raising=False)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(64 * 2**20, 0, 64 * 2**20))  # Docker's 64 MB
    monkeypatch.setattr("deit_train.data.datamodule.SHARED_MEMORY", str(tmp_path))
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(128)))
    data = data_config("imagefolder", root=str(tmp_path), num_workers="auto", batch_size=512)
    module = DeiTDataModule(data, OmegaConf.create({"mixup": 0.0, "cutmix": 0.0}), 224)
    module.trainer = Trainer8()
    per_worker = module.shared_memory_bytes(1)
    with caplog.at_level("INFO"):
        workers = module.workers
    assert workers == 64 * 2**20 // per_worker < 15
    assert module.shared_memory_bytes(workers) <= 64 * 2**20 < module.shared_memory_bytes(workers + 1)
    module.check_shared_memory()  # what auto chose passes the check
    assert f"shared memory holds the batches of {workers}, not 15" in caplog.text


def test_every_task_of_a_job_step_resolves_one_run_directory_kept_over_requeue(slurm_task, monkeypatch):
    slurm_task(0, job="777")
    first = run_name("2026-12-07/10-00-00")
    slurm_task(5, job="777")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert run_name("2026-12-07/10-00-01") == first == "slurm-777.0"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "770")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    assert slurm_job() == "770_7.0"
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # salloc's shell: each command a run of its own
    assert run_name("2026-12-07/10-00-02") == "2026-12-07/10-00-02"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_tasks(tmp_path: Path, cache_dir: Path, *overrides: str, tasks: int = 2, extra_env: dict | None = None):
    """`srun --ntasks=2 deit-train ...` without hydra.run.dir: each task a process with Slurm's variables, bound to
    its own CPU (the affinity Slurm's --cpu-bind gives), and the collectives counted."""
    port = free_port()
    command = [sys.executable, "-m", "deit_train", *layered([*TINY, f"paths.cache_dir={cache_dir}", *overrides])]
    processes = []
    for rank in range(tasks):
        env = {
            **without_launch_variables(),
            **slurm_task_environment(rank, tasks, port),
            **(extra_env or {}),
            "PYTHONPATH": os.pathsep.join([str(COUNTER), str(REPO)]),
            "DEIT_COUNT_COLLECTIVES": str(tmp_path / "counts"),
        }
        cpu = sorted(os.sched_getaffinity(0))[rank % len(os.sched_getaffinity(0))]
        processes.append(
            subprocess.Popen(
                command,
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                preexec_fn=lambda cpu=cpu: os.sched_setaffinity(0, {cpu}),
            )
        )
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            pytest.fail("a simulated Slurm task hung")
    return processes, outputs


def collectives(tmp_path: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "counts").glob("*.json"))]


DDP_TASKS = ["trainer=ddp_cpu", "trainer.devices=2", "data.num_workers=auto", "data.batch_size=4"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["srun", "submitit"])
def test_slurm_tasks_train_as_one_run_in_one_directory(tmp_path, cache_dir, launcher):
    """Two tasks, each bound to one CPU, with no run directory given: both train as ranks 0 and 1 (Slurm's PROCID),
    each logs its workers from its own CPU, and one directory, outputs/slurm-<job>.<step>, holds the run."""
    submitit = {"SUBMITIT_EXECUTOR": "slurm", "SUBMITIT_FOLDER": str(tmp_path / "submitit")}
    extra = submitit if launcher == "submitit" else {}
    processes, outputs = launch_tasks(tmp_path, cache_dir, *DDP_TASKS, "trainer.max_epochs=1", extra_env=extra)
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output
        # bound to 1 CPU by Slurm: that CPU is the task's, 0 workers beside its own process
        assert "data.num_workers=auto: 0 data-loader worker(s) for this device (1 CPU core(s) for it)" in output
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]
    runs = sorted(p.relative_to(tmp_path) for p in (tmp_path / "outputs").iterdir())
    assert runs == [Path("outputs/slurm-4242.0")]
    assert (tmp_path / runs[0] / "metrics.json").is_file()


@pytest.mark.slow
def test_a_training_step_makes_no_python_collective_between_log_steps(tmp_path, cache_dir):
    """Lightning broadcast a SIGTERM flag and read it on the host before every step of a multi-process run: 4 steps
    made 4 broadcasts, 12 made 12. Counted from outside, the collectives of a 4-step and a 12-step epoch are the
    same: the ranks meet at log steps (log_every_n_steps) and at the epoch's end only."""
    counts = {}
    for steps in (4, 12):
        run = tmp_path / f"steps{steps}"
        run.mkdir()
        processes, outputs = launch_tasks(
            run,
            cache_dir,
            *DDP_TASKS,
            "data.num_workers=0",
            "trainer.log_every_n_steps=50",
            f"+trainer.limit_train_batches={steps}",
            "+trainer.limit_val_batches=2",
            "data.train_per_class=10",
        )
        for process, output in zip(processes, outputs, strict=True):
            assert process.returncode == 0, output
        counts[steps] = collectives(run)
        assert len(counts[steps]) == 2, counts
    print("collectives per rank, 4 steps:", counts[4], "12 steps:", counts[12])
    assert counts[4] == counts[12]
    assert all(c.get("broadcast", 0) < 4 for c in counts[4])


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path, cache_dir):
    """A preemption's SIGTERM that reaches rank 1 alone: the ranks agree at the next log step, both stop there and
    exit with 143 (a requeued job then resumes from last.ckpt), none left waiting in an all-reduce."""
    processes, outputs = launch_tasks(
        tmp_path,
        cache_dir,
        *DDP_TASKS,
        "data.num_workers=0",
        "trainer.log_every_n_steps=3",
        "trainer.max_epochs=3",
        "data.train_per_class=10",
        "+callbacks.probe._target_=tests.probes.Terminate",
        f"+callbacks.probe.path={tmp_path / 'stopped'}",
    )
    assert [p.returncode for p in processes] == [143, 143], outputs
    stopped = sorted((tmp_path / "stopped").glob("rank*.txt"))
    steps = [p.read_text().split()[0] for p in stopped]
    assert len(steps) == 2 and steps[0] == steps[1] == "3", steps  # SIGTERM in step 2, agreed at step 3
    assert all("stopped by SIGTERM" in output for output in outputs)


@pytest.mark.parametrize("code", ["ENOSYS", "ENOLCK", "EOPNOTSUPP"])
def test_a_filesystem_without_locks_is_refused_in_one_line(tmp_path, monkeypatch, code):
    """Lustre or NFS mounted without flock answer ENOSYS (or ENOLCK): the lock raised it, an exit 1 "bug"."""
    import errno
    import fcntl

    from deit_train.errors import DeitTrainError, describe_failure
    from deit_train.run_dir import RunLock

    def no_flock(file, operation):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    for attempt in (RunLock(tmp_path / "run").acquire, RunLock(tmp_path / "run").check_free):
        (tmp_path / "run").mkdir(exist_ok=True)
        (tmp_path / "run" / ".deit-train.lock").touch()
        with pytest.raises(DeitTrainError) as refused:
            attempt()
        line, status = describe_failure(refused.value)
        assert status == 2 and "does not support file locks" in line and "hydra.run.dir=" in line


WEIGHTS_FETCH = """
import sys, time, timm
from deit_train.models.student import create_timm_model
log = sys.argv[1]
def fetching(name, **kwargs):  # stands in for timm's download of the hub weights
    with open(log, "a") as f:
        f.write(f"start {time.monotonic()}\\n")
    time.sleep(1.5)
    with open(log, "a") as f:
        f.write(f"end {time.monotonic()}\\n")
    return "model"
timm.create_model = fetching
create_timm_model("resnet10t", "teacher", pretrained=True)
"""


@pytest.mark.slow
def test_the_tasks_of_a_node_fetch_pretrained_weights_one_at_a_time(tmp_path):
    """8 tasks of a node each downloaded the teacher at once; now the first fetches into the shared cache while the
    others wait for it (an flock in torch hub's folder), then find the weights there."""
    env = {**without_launch_variables(), "TORCH_HOME": str(tmp_path / "hub"), "PYTHONPATH": str(REPO)}
    log = tmp_path / "fetches.log"
    tasks = [
        subprocess.Popen([sys.executable, "-c", WEIGHTS_FETCH, str(log)], env=env, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    for task in tasks:
        assert task.wait(timeout=300) == 0, task.stderr.read()
    events = [line.split() for line in log.read_text().splitlines()]
    assert [kind for kind, _ in events] == ["start", "end"] * 3  # never two fetching at once
