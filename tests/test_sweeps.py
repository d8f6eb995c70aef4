"""Sweeps: a 2x2 multirun, an Optuna search, the SLURM and joblib launcher options. The plugins are the
`sweeps` extra; tests that need one skip cleanly without it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deit_train.cli import layered
from deit_train.train import CONFIG_DIR

from .conftest import TINY_DEMO, TINY_RUN, assert_metrics_reproduce, last_epoch

TINY_STUDENT = ["model.patch_size=4", "model.embed_dim=32", "model.num_heads=2"]
# An Optuna search of a few one-block trials (its first 2 drawn at random)
SMALL_SEARCH = ["hparams_search=optuna", "hydra.sweeper.sampler.n_startup_trials=2", "model.depth=1"]


def run_sweep(*overrides: str, tmp_path, cache_dir, multirun: bool = True) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "deit_train",
        *["--multirun"] * multirun,
        *layered(
            [
                *TINY_RUN,
                *TINY_DEMO,
                *TINY_STUDENT,
                f"paths.cache_dir={cache_dir}",
                f"hydra.sweep.dir={tmp_path / 'sweep'}",
                *overrides,
            ]
        ),
    ]
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # tests.probes importable
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=environment)


@pytest.mark.slow
def test_multirun_gives_each_job_its_own_directory_and_metrics(tmp_path, cache_dir, demo_data):
    result = run_sweep("model.depth=1,2", "seed=0,1", tmp_path=tmp_path, cache_dir=cache_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    for job in jobs:
        assert_metrics_reproduce(job, demo_data)  # each job's metrics are its own weights'
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        assert any(o.startswith("model.depth=") for o in overrides)
    depths = {yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["model"]["depth"] for job in jobs}
    assert depths == {1, 2}


@pytest.mark.slow
def test_ddp_inside_a_multirun_spawns_and_keeps_each_job_in_its_directory(tmp_path, cache_dir):
    result = run_sweep(
        "model.depth=1,2",
        "trainer=ddp_cpu",
        "trainer.strategy=ddp_spawn",
        tmp_path=tmp_path,
        cache_dir=cache_dir,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]
    for job in ("0", "1"):
        assert (tmp_path / "sweep" / job / "metrics.json").is_file()
        assert sorted(p.name for p in (tmp_path / "sweep" / job / "checkpoints").iterdir()) == [
            "best.ckpt",
            "last.ckpt",
        ]


@pytest.mark.slow  # a multirun in a subprocess: the whole suite runs it, the quick loop does not
def test_relaunching_ddp_inside_a_local_multirun_is_refused(tmp_path, cache_dir):
    result = run_sweep("model.depth=1", "trainer=ddp_cpu", tmp_path=tmp_path, cache_dir=cache_dir)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Use trainer=ddp_spawn" in output, output
    assert "Traceback" not in output


@pytest.mark.slow
def test_optuna_search_reports_the_best_val_acc1(tmp_path, cache_dir):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    result = run_sweep(
        *SMALL_SEARCH,
        "hydra.sweeper.n_trials=3",
        tmp_path=tmp_path,
        cache_dir=cache_dir,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    trials = [last_epoch(tmp_path / "sweep" / str(i))["val/acc1_percent"] for i in range(3)]
    assert 100 * results["best_value"] == pytest.approx(max(trials))  # Optuna's objective: the logged fraction
    assert set(results["best_params"]) == {"optim.lr", "optim.weight_decay"}


@pytest.mark.slow
def test_a_config_that_is_a_sweep_runs_as_one_without_m(tmp_path, cache_dir):
    """hparams_search=optuna sets hydra.mode=MULTIRUN, and its file shows it without -m: it runs the search (the
    command line took it for a single run and trained one job with the defaults), and a grid typed with it is its."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    result = run_sweep(
        *SMALL_SEARCH,
        "hydra.sweeper.n_trials=2",
        '+hydra.sweeper.params.seed="choice(3,4)"',  # quoted: Hydra's own sweep syntax is for -m's grids
        tmp_path=tmp_path,
        cache_dir=cache_dir,
        multirun=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"optim.lr", "optim.weight_decay", "seed"}


def compose_with_hydra(overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_slurm_launcher_asks_one_task_per_gpu():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_with_hydra(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (8, 8, 2)


def test_joblib_launcher_runs_jobs_in_parallel_processes():
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    cfg = compose_with_hydra(["hydra/launcher=local_parallel", "hydra.launcher.n_jobs=3"])
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 3


@pytest.mark.parametrize(
    "task,metric,mode,direction", [("classify", "val/acc1", "max", "maximize"), ("mim", "val/loss", "min", "minimize")]
)
def test_each_task_optimizes_its_own_metric_in_checkpoints_and_optuna(task, metric, mode, direction):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose_with_hydra([f"task={task}", "hparams_search=optuna"])
    assert (cfg.task.optimized_metric, cfg.task.optimized_mode) == (metric, mode)
    assert (cfg.callbacks.checkpoints.monitor, cfg.callbacks.checkpoints.mode) == (metric, mode)
    assert cfg.hydra.sweeper.direction == direction


# ------------------------------------------------------------------ sweeps finish every job they can

JOB_KINDS = st.lists(st.sampled_from(["ok", "refused", "crash"]), min_size=2, max_size=4)


def drawn_sweep(kinds: list[str]) -> tuple[list[str], dict[int, float]]:
    """A two-epoch sweep over loss.alpha with one job per drawn kind: a good value, a value refused at check time
    (1.5 and up), or a good value whose job crashes with an unexpected error in its second epoch, its first
    epoch's checkpoint written (tests.probes.Crash). Returns the overrides and each job's alpha."""
    alphas = {i: 1.5 + i if kind == "refused" else round(0.05 + 0.1 * i, 2) for i, kind in enumerate(kinds)}
    crash_on = [alphas[i] for i, kind in enumerate(kinds) if kind == "crash"] or [-1.0]
    return [
        f"loss.alpha={','.join(str(a) for a in alphas.values())}",
        "+callbacks.crash._target_=tests.probes.Crash",
        "+callbacks.crash.value=${loss.alpha}",
        f"+callbacks.crash.crash_on=[{','.join(map(str, crash_on))}]",
        "+callbacks.crash.epoch=1",
        "trainer.max_epochs=2",
        "model.depth=1",
    ], alphas


@pytest.mark.slow
@settings(max_examples=3, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(kinds=JOB_KINDS)
def test_a_drawn_sweep_finishes_every_good_job_and_records_every_failed_one(kinds, tmp_path_factory, cache_dir):
    """Failing jobs at drawn positions: every good job finishes (its metrics.json, no failed.json), every bad one
    is recorded in its directory (failed.json: message, exit status, overrides; no metrics.json), the last line
    names the failed jobs, the exit status is the first failed job's, and deit-report lists them."""
    from deit_train.tools.report import report

    tmp_path = tmp_path_factory.mktemp("drawn_sweep")
    overrides, alphas = drawn_sweep(kinds)
    result = run_sweep(*overrides, tmp_path=tmp_path, cache_dir=cache_dir)
    sweep_dir, output = tmp_path / "sweep", result.stdout + result.stderr
    assert "Traceback" not in output, output
    if set(kinds) == {"refused"}:  # no job could run: refused before any starts (sweep_jobs.check_jobs)
        assert result.returncode == 2 and not sweep_dir.exists(), output
        assert result.stderr.strip().splitlines()[-1].startswith("deit-train: error: no job of the sweep can run")
        return
    for i, kind in enumerate(kinds):  # said before the first job starts
        assert (f"sweep job {i} (" in output.split("sweep job 0 failed")[0]) == (kind == "refused"), output
    failed = [i for i, kind in enumerate(kinds) if kind != "ok"]
    for i, kind in enumerate(kinds):
        job = sweep_dir / str(i)
        if kind == "ok":
            assert (job / "metrics.json").is_file() and not (job / "failed.json").exists(), output
            assert torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
            continue
        record = json.loads((job / "failed.json").read_text())
        assert not (job / "metrics.json").exists()  # never looks finished, even with its first epoch's checkpoint
        assert (job / "checkpoints" / "last.ckpt").is_file() == (kind == "crash")
        assert record["job"] == i and f"loss.alpha={alphas[i]}" in record["overrides"]
        expected = ("loss.alpha=", 2) if kind == "refused" else ("unexpected RuntimeError: probe crash", 1)
        assert expected[0] in record["message"] and record["exit_status"] == expected[1], record
        assert f"sweep job {i} failed (exit status {expected[1]}; the sweep goes on)" in output
    last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    if not failed:
        assert result.returncode == 0, output
        return
    assert result.returncode == (2 if kinds[failed[0]] == "refused" else 1), output
    assert last.startswith(f"deit-train: error: {len(failed)} of {len(kinds)} sweep jobs failed: "), last
    assert [f"{i} (loss.alpha={alphas[i]}" in last for i in failed] == [True] * len(failed), last
    assert sum(f"(loss.alpha={a}" in last for a in alphas.values()) == len(failed), last
    table = report(sweep_dir, tmp_path / "report")["table"]
    assert f"{len(failed)} of {len(kinds)} jobs failed:" in table, table
    for i in failed:
        assert f"- {i} (loss.alpha={alphas[i]}" in table, table


def sweep_config(*overrides: str, sweep_dir: Path):
    """The config a `deit-train -m` sweep's callbacks are given: its hydra node holds the command line's
    overrides, the sweep's (a,b) among them."""
    from omegaconf import open_dict

    config = compose("train", overrides=["experiment=demo"], return_hydra_config=True)  # Hydra initialized
    with open_dict(config):
        config.hydra.overrides.task = ["experiment=demo", *overrides]
        config.hydra.sweep.dir = str(sweep_dir)
        config.hydra.job.config_name = "train"
    return config


def test_a_sweep_no_job_of_which_can_run_is_refused_before_any_starts(tmp_path, capsys, caplog):
    """Each job's config is checked by the config's rules before the first job starts (sweep_jobs.check_jobs): a
    sweep none of whose jobs can run ends in one line, where each job found it after the others, or a Slurm queue;
    one with some jobs refused (a grid with combinations the rules refuse) names them and runs the others."""
    from deit_train.sweep_jobs import check_jobs

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):  # Hydra's, as in the sweep's process
        with pytest.raises(SystemExit) as ended:
            check_jobs(sweep_config("seed=0,1", "+trainer.max_epoch=3", sweep_dir=tmp_path / "s"))  # a typo in all
        assert ended.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines == [
            "deit-train: error: no job of the sweep can run; sweep job 0 (experiment=demo seed=0 +trainer.max_epoch=3)"
            ": trainer.max_epoch is not an argument of Lightning's Trainer (did you mean trainer.max_epochs?): its "
            "arguments are listed at https://lightning.ai/docs/pytorch/stable/common/trainer.html#trainer-flags. No "
            "job was started"
        ]
        # composed as the job is, its ${hydra:job.num} included; a key Hydra cannot compose refuses the job too
        for overrides, said in (
            (["seed=${hydra:job.num}", "model.patch_size=5", "optim.lr=1e-3,2e-3"], "expected a multiple of"),
            (["trainer.max_epoch=3,4"], "Key 'max_epoch' is not in struct | full_key: trainer.max_epoch"),
        ):
            with pytest.raises(SystemExit):
                check_jobs(sweep_config(*overrides, sweep_dir=tmp_path / "s"))
            (line,) = capsys.readouterr().err.strip().splitlines()
            assert line.startswith("deit-train: error: no job of the sweep can run; sweep job 0") and said in line
        check_jobs(sweep_config("model.depth=1,0,2", sweep_dir=tmp_path / "s"))  # jobs 0 and 2 run
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert warned == [
            "deit-train: sweep job 1 (experiment=demo model.depth=0): model.depth=0: expected a number of blocks >= 1; "
            "it will fail, and the other jobs run"
        ]
        caplog.clear()
        check_jobs(sweep_config("model.depth=1,2", "seed=0,1", sweep_dir=tmp_path / "s"))  # every job runs
        assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert not (tmp_path / "s").exists()


def test_a_joblib_job_starts_its_data_loaders_workers():
    """hydra/launcher=local_parallel runs each job in a joblib (loky) process, where loky's start method is the
    default, whose processes cannot start a loader's workers: every job with data.num_workers > 0 failed with
    "'Process' object has no attribute 'env'". cluster.worker_options gives the loaders the platform's instead."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    from joblib import Parallel, delayed

    def loaded(workers: int) -> list[int]:  # in a loky process: the loader the data sources build there
        from torch.utils.data import DataLoader

        from deit_train.cluster import worker_options

        loader = DataLoader(range(6), batch_size=3, num_workers=workers, **worker_options(workers))
        return [int(x) for batch in loader for x in batch]

    assert Parallel(n_jobs=2)(delayed(loaded)(workers) for workers in (0, 2)) == [list(range(6))] * 2


@pytest.mark.slow
def test_a_failed_job_beside_a_good_one_in_parallel_loses_nothing(tmp_path, cache_dir):
    """hydra/launcher=local_parallel (joblib): the good job running beside the failing one finishes."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    overrides, _ = drawn_sweep(["refused", "ok"])
    result = run_sweep(
        *overrides,
        "hydra/launcher=local_parallel",
        "hydra.launcher.n_jobs=2",
        "data.num_workers=1",  # a loader's worker started from a joblib process (test_a_joblib_job_starts...)
        tmp_path=tmp_path,
        cache_dir=cache_dir,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert (tmp_path / "sweep" / "1" / "metrics.json").is_file(), output
    assert json.loads((tmp_path / "sweep" / "0" / "failed.json").read_text())["exit_status"] == 2
    assert result.stderr.strip().splitlines()[-1].startswith("deit-train: error: 1 of 2 sweep jobs failed: 0 (")


def test_a_sweep_into_an_earlier_sweeps_directory_is_refused_and_changes_nothing(tmp_path, cache_dir):
    """Refused before Hydra writes anything there: its multirun.yaml and the jobs' files stay as they were."""
    sweep_dir = tmp_path / "sweep"
    (sweep_dir / "0" / "checkpoints").mkdir(parents=True)
    (sweep_dir / "0" / "checkpoints" / "last.ckpt").write_bytes(b"an earlier job's checkpoint")
    (sweep_dir / "multirun.yaml").write_text("hydra: {earlier: sweep}\n")
    before = {p: p.read_bytes() for p in sweep_dir.rglob("*") if p.is_file()}
    result = run_sweep("seed=0,1", tmp_path=tmp_path, cache_dir=cache_dir)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines[-1].startswith(
        f"deit-train: error: hydra.sweep.dir={sweep_dir} holds an earlier sweep (multirun.yaml, 0)"
    ), result.stderr
    assert "hydra.sweep.dir=..." in lines[-1] and "Traceback" not in result.stderr
    assert {p: p.read_bytes() for p in sweep_dir.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_a_resumed_sweep_continues_its_jobs_and_a_refused_job_keeps_its_results(tmp_path, cache_dir):
    """resume=true into an earlier sweep: finished jobs are left as they are; a job whose config changed what it
    trains is refused by its own directory, records failed.json beside its results (unchanged) and fails the
    sweep."""
    assert run_sweep("seed=0,1", "model.depth=1", tmp_path=tmp_path, cache_dir=cache_dir).returncode == 0

    def results():
        return {
            p: p.read_bytes()
            for p in (tmp_path / "sweep").rglob("*")
            if p.is_file() and (p.suffix in (".ckpt", ".csv") or p.name == "metrics.json")
        }

    before = results()
    again = run_sweep("seed=0,1", "model.depth=1", "resume=true", tmp_path=tmp_path, cache_dir=cache_dir)
    assert again.returncode == 0 and again.stdout.count("has finished its 1 epochs") == 2, again.stdout + again.stderr
    changed = run_sweep("seed=0,1", "model.depth=2", "resume=true", tmp_path=tmp_path, cache_dir=cache_dir)
    last = changed.stderr.strip().splitlines()[-1]
    assert changed.returncode == 2 and last.startswith("deit-train: error: 2 of 2 sweep jobs failed: 0 ("), last
    for job in ("0", "1"):
        record = json.loads((tmp_path / "sweep" / job / "failed.json").read_text())
        assert "model.depth: 1 -> 2" in record["message"] and record["exit_status"] == 2, record
    assert results() == before


@pytest.mark.slow
def test_an_optuna_search_whose_trials_all_fail_ends_in_one_line(tmp_path, cache_dir):
    """Each failed trial is recorded and told to the study as the worst value: the search runs all its trials and
    ends with the summary line, not Optuna's "No trials are completed yet" traceback, and leaves no best
    parameters."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    result = run_sweep(
        *SMALL_SEARCH,
        "hydra.sweeper.n_trials=2",
        "loss.alpha=1.5",
        tmp_path=tmp_path,
        cache_dir=cache_dir,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output, output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("deit-train: error: 2 of 2 sweep jobs failed: 0 ("), last
    # no best parameters: Optuna's would be a failed trial's, best_value -inf
    assert "None finished, so the search has no best parameters (optimization_results.yaml" in last, last
    assert not (tmp_path / "sweep" / "optimization_results.yaml").exists()
    for job in ("0", "1"):
        assert "loss.alpha=1.5" in json.loads((tmp_path / "sweep" / job / "failed.json").read_text())["message"]


def test_what_an_earlier_sweep_left_is_named(tmp_path):
    """earlier_sweep (what on_multirun_start refuses): multirun.yaml, job directories with results or failed.json,
    and a run directory given as hydra.sweep.dir; a folder of other files or an unfinished job is no sweep."""
    from deit_train.sweep_jobs import earlier_sweep

    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "0" / ".hydra").mkdir(parents=True)  # a job that never got past its checks, no record
    assert earlier_sweep(tmp_path) == [] and earlier_sweep(tmp_path / "absent") == []
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "failed.json").write_text("{}")
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    assert earlier_sweep(tmp_path) == ["multirun.yaml", "a run's metrics.json", "3"]


@pytest.mark.slow
def test_ctrl_c_of_a_joblib_sweep_ends_in_one_line(tmp_path, cache_dir):
    """SIGINT to the terminal's process group while joblib's workers train: Parallel raises KeyboardInterrupt in the
    sweep's own process, outside Hydra's job; it ends with one line and status 130, not joblib's traceback."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    import signal
    import time

    overrides = [*TINY_RUN, *TINY_DEMO, *TINY_STUDENT, f"paths.cache_dir={cache_dir}"]
    overrides += [f"hydra.sweep.dir={tmp_path / 'sweep'}", "seed=0,1", "trainer.max_epochs=500"]
    overrides += ["hydra/launcher=local_parallel", "hydra.launcher.n_jobs=2"]
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    sweep = subprocess.Popen(
        [sys.executable, "-m", "deit_train", "--multirun", *layered(overrides)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=environment,
        start_new_session=True,  # its own process group, as a terminal's
    )
    deadline = time.monotonic() + 120
    while len(list((tmp_path / "sweep").glob("*/.hydra"))) < 2 and time.monotonic() < deadline:  # both jobs started
        time.sleep(0.5)
    time.sleep(5)
    os.killpg(sweep.pid, signal.SIGINT)
    _, stderr = sweep.communicate(timeout=120)
    assert sweep.returncode == 130 and stderr.strip().splitlines()[-1] == "deit-train: error: interrupted", stderr
    assert "Traceback" not in stderr, stderr


def test_a_grid_kept_in_the_sweepers_params_is_swept_and_a_single_run_asks_for_m(capsys, monkeypatch):
    """hydra.sweeper.params holds a sweep's grid in a config; +hydra.sweeper.params.seed="5,3" adds one on the
    command line: its jobs are the grid's, as Hydra's basic sweeper expands it (before, the params node was null and
    Hydra's composition failed on it: an AssertionError as 'a bug', or a traceback under -m). Without -m the grid is
    refused in one line naming -m, where Hydra would have run one job and ignored it."""
    from deit_train.cli import cli
    from deit_train.sweep_jobs import expected_jobs

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        config = compose(
            "train", overrides=["experiment=demo", '+hydra.sweeper.params.seed="5,3"'], return_hydra_config=True
        )
    assert expected_jobs(config) == [["seed=5", "experiment=demo"], ["seed=3", "experiment=demo"]]
    monkeypatch.setattr(sys, "argv", ["deit-train", "experiment=demo", '+hydra.sweeper.params.seed="5,3"'])
    with pytest.raises(SystemExit) as ended:
        cli()
    assert ended.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        'deit-train: error: +hydra.sweeper.params.seed="5,3" sets a sweep\'s grid, which only a sweep runs: add -m '
        '(one run takes the value as its key, seed="5,3")'
    ]
