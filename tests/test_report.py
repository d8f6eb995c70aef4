"""deit-report on real runs: a 2x2 sweep over model depth and seed, one run, and the clear errors."""

import csv
import json
import shutil
import statistics
import subprocess
import sys

import pytest
import yaml

from deit_train.errors import DeitTrainError
from deit_train.tools.report import read_run, report, run_figure, sweep_figure, sweep_rows

from .test_sweeps import run_sweep


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir):
    """model.depth=1,2 x seed=0,1, two epochs each; job 3's metrics.json removed, as a job that died leaves it."""
    tmp_path = tmp_path_factory.mktemp("report")
    result = run_sweep("model.depth=1,2", "seed=0,1", "trainer.max_epochs=2", tmp_path=tmp_path, cache_dir=cache_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(sweep_dir, tmp_path / "complete")
    (sweep_dir / "3" / "metrics.json").unlink()
    return sweep_dir


def job_metrics(sweep_dir, jobs):
    return [json.loads((sweep_dir / str(job) / "metrics.json").read_text())["last_epoch"] for job in jobs]


def test_sweep_table_aggregates_seeds_as_the_jobs_metrics_say(sweep, tmp_path):
    complete = sweep.parent / "complete"
    written = report(complete, tmp_path / "out")
    rows = {row.configuration: row for row in written["rows"]}
    assert set(rows) == {"model.depth=1", "model.depth=2"}
    overrides = {job: (complete / str(job) / ".hydra" / "overrides.yaml").read_text() for job in range(4)}
    for depth in (1, 2):
        jobs = [job for job, text in overrides.items() if f"model.depth={depth}" in text]
        assert len(jobs) == 2
        for metric in ("val/acc1_percent", "val/loss", "val/acc1_dist_percent"):
            values = [m[metric] for m in job_metrics(complete, jobs)]
            mean, std, n = rows[f"model.depth={depth}"].stats[metric]
            assert mean == pytest.approx(statistics.fmean(values), abs=1e-12)
            assert std == pytest.approx(statistics.stdev(values), abs=1e-12)
            assert n == 2
    best = max(rows.values(), key=lambda row: row.stats["val/acc1_percent"][0])
    assert best.best and sum(row.best for row in rows.values()) == 1
    assert "**(best)**" in written["table"] and "± " in written["table"]
    with (tmp_path / "out" / "report.csv").open() as file:
        table = list(csv.DictReader(file))
    acc1 = {row["configuration"]: float(row["mean"]) for row in table if row["metric"] == "val/acc1_percent"}
    assert acc1 == {name: row.stats["val/acc1_percent"][0] for name, row in rows.items()}


def test_a_failed_job_is_listed_not_dropped(sweep, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "deit_train.tools.report", str(sweep), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    failed_row = next(line for line in result.stdout.splitlines() if line.startswith("| ") and "| 3 |" in line)
    assert "| 1 |" in failed_row  # that configuration has one finished seed left
    assert "1 of 4 runs have no metrics.json" in result.stdout
    assert (tmp_path / "report.png").is_file() and (tmp_path / "report.md").is_file()


def test_sweep_figure_draws_each_configuration_with_a_seed_band(sweep):
    rows = sweep_rows([read_run(sweep.parent / "complete" / str(job)) for job in range(4)])
    figure = sweep_figure(rows)
    (axes,) = figure.axes
    assert axes.get_xlabel() == "epoch" and axes.get_ylabel() == "top-1 (%)"
    assert len(axes.lines) == 2 and len(axes.collections) == 2  # a mean line and a band per configuration
    for line in axes.lines:
        assert list(line.get_xdata()) == [0, 1]
        assert "(n=2)" in line.get_label()


def test_run_figure_has_validation_loss_and_learning_rate_panels(sweep):
    run = read_run(sweep.parent / "complete" / "0")
    figure = run_figure(run)
    val_axes, loss_axes, lr_axes = figure.axes
    assert (val_axes.get_xlabel(), val_axes.get_ylabel()) == ("epoch", "top-1 (%)")
    labels = {line.get_label() for line in val_axes.lines}
    assert {"prediction (avg of heads)", "class head", "distillation head"} <= labels
    val_line = next(line for line in val_axes.lines if line.get_label() == "prediction (avg of heads)")
    assert val_line.get_ydata()[-1] == pytest.approx(run.metrics["val/acc1_percent"])  # the last epoch, in %
    assert {"loss", "loss_cls", "loss_dist"} <= {line.get_label() for line in loss_axes.lines}
    assert loss_axes.get_xlabel() == "optimizer step" and lr_axes.get_ylabel() == "learning rate"
    assert lr_axes.lines


def test_one_run_writes_its_figure(sweep, tmp_path):
    written = report(sweep.parent / "complete" / "1", tmp_path)
    assert written["figure"] == tmp_path / "report.png" and written["figure"].stat().st_size > 10_000


def test_clear_errors_for_no_runs_no_logs_and_nothing_finished(sweep, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeitTrainError, match="holds no deit-train runs"):
        report(tmp_path / "empty")
    bare = tmp_path / "bare"
    shutil.copytree(sweep.parent / "complete" / "0", bare)
    shutil.rmtree(bare / "csv")
    with pytest.raises(DeitTrainError, match="has no logs to draw"):
        report(bare, tmp_path / "out")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(sweep.parent / "complete", unfinished)
    for metrics in unfinished.glob("*/metrics.json"):
        metrics.unlink()
    result = subprocess.run(
        [sys.executable, "-m", "deit_train.tools.report", str(unfinished)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"deit-report: error: none of the 4 runs in {unfinished} has finished (no metrics.json): failed, or still "
        f"running"
    ]


@pytest.mark.parametrize(
    "name,content,named",
    [
        ("metrics.json", "[1, 2]", "is not deit-train's metrics.json"),
        ("metrics.json", '{"val/acc1": "high"}', "is not deit-train's metrics.json"),
        ("metrics.json", "{not json", "is not deit-train's metrics.json"),
        (".hydra/overrides.yaml", "{model.depth: 2}", "is not a list of command-line overrides"),
        (".hydra/overrides.yaml", "- [unclosed", "is not a list of command-line overrides"),
        ("csv/version_0/metrics.csv", "step,epoch,val/acc1\n1,0,y\n", "is not a CSV logger's metrics file"),
    ],
)
def test_a_damaged_run_file_is_named_in_one_line(sweep, tmp_path, name, content, named):
    """A file of the sweep's first run replaced by something else: the report names it, never takes it for data."""
    damaged = tmp_path / "damaged"
    shutil.copytree(sweep.parent / "complete", damaged)
    (damaged / "0" / name).write_text(content)
    result = subprocess.run(
        [sys.executable, "-m", "deit_train.tools.report", str(damaged), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert str(damaged / "0" / name) in lines[0] and named in lines[0], lines[0]


def test_failed_and_missing_jobs_are_listed_with_their_message(sweep, tmp_path):
    """A job that failed (its failed.json, as a sweep job writes it) is listed with its message, and a job that
    multirun.yaml asked for but that never ran (no directory) as missing, with its overrides."""
    damaged = tmp_path / "sweep"
    shutil.copytree(sweep.parent / "complete", damaged)
    overrides = {
        job: yaml.safe_load((damaged / str(job) / ".hydra" / "overrides.yaml").read_text()) for job in range(4)
    }
    shutil.rmtree(damaged / "2")  # never ran
    shutil.rmtree(damaged / "1")  # refused at check time: only its record
    (damaged / "1").mkdir()
    (damaged / "1" / "failed.json").write_text(
        json.dumps(
            {
                "job": 1,
                "overrides": overrides[1],
                "exit_status": 2,
                "message": "loss.alpha=1.5: expected a weight in [0, 1]",
            }
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "deit_train.tools.report", str(damaged), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    varying = lambda job: " ".join(o for o in overrides[job] if o.startswith(("model.depth", "seed")))  # noqa: E731
    lines = result.stdout.splitlines()
    assert "1 of 4 jobs failed:" in lines
    assert f"- 1 ({varying(1)}): exit 2: loss.alpha=1.5: expected a weight in [0, 1]" in lines, result.stdout
    assert "1 of 4 jobs never ran (in multirun.yaml, no directory):" in lines
    assert f"- {varying(2)}" in lines, result.stdout
    assert "1 of 4 jobs failed:" in (tmp_path / "out" / "report.md").read_text()
