"""`deit-report PATH [--out DIR]`: see a run, compare a sweep, with seeds aggregated.

PATH is a run directory (what `deit-train` writes: `.hydra/`, `metrics.json`, `csv/`, `tensorboard/` or W&B logs
under `wandb/`) or a directory of runs (a `-m` sweep, local, Slurm or Optuna, or any folder of runs such as the
demo's). For one run it draws its curves and lists its worst classes (per_class.csv); for several it prints a
Markdown table with one row per configuration (the overrides that differ between runs, `seed` aside): mean,
standard deviation and number of seeds of each final metric (accuracies in %), the best row marked, runs without
`metrics.json` listed as failed; and draws every configuration's validation curve with its seeds as a band. A
sweep's jobs that failed (their failed.json) are listed with their message, and those its multirun.yaml asked for
that never ran as missing. Nothing but the files the runs already wrote is read.
"""

import csv
import math
import statistics
import textwrap
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from deit_train.class_results import ClassResult, describe, read_class_results, worst_classes
from deit_train.errors import DeitTrainError, error_boundary
from deit_train.metric_units import BEST, LAST, in_percent, reported_name
from deit_train.sweep_jobs import FAILED_NAME, Failure, expected_jobs, read_failure
from deit_train.tools.arguments import ArgumentParser

VAL_CURVES = {  # metric -> legend label, in drawing order
    "val/acc1": "prediction (avg of heads)",
    "val/acc1_cls": "class head",
    "val/acc1_dist": "distillation head",
    "val_ema/acc1": "EMA",
    "val/teacher_acc1": "teacher",
    "val/agreement": "student-teacher agreement",
}
# metrics.json's names (results.py): accuracies in percent
TABLE_METRICS = (
    "val/acc1_percent",
    "val/acc1_cls_percent",
    "val/acc1_dist_percent",
    "val_ema/acc1_percent",
    "val/acc5_percent",
    "val/loss",
)


@dataclass
class Run:
    directory: Path
    overrides: list[str]
    metrics: dict[str, float] | None  # metrics.json's last epoch (accuracies in %); None: failed or still running
    failure: Failure | None = None  # a sweep job's failed.json
    optimized: tuple[str, str] = ("val/acc1", "max")  # task.optimized_metric, task.optimized_mode
    history: dict[str, list[tuple[int, int, float]]] = field(default_factory=dict)  # name -> (epoch, step, value)
    best: dict | None = None  # metrics.json's best_checkpoint: its epoch and metrics
    classes: list[ClassResult] | None = None  # per_class.csv: the best.ckpt epoch's per-class results

    def configuration(self, common: set[str] = frozenset()) -> str:
        """The overrides that make this run's configuration: those not shared by all runs, seed aside."""
        shown = [o for o in self.overrides if o not in common and not is_seed_or_hydra(o)]
        return " ".join(shown) or "(the same configuration)"


def is_seed_or_hydra(override: str) -> bool:
    return override.split("=")[0].lstrip("+~").startswith(("seed", "hydra"))


def is_run(directory: Path) -> bool:
    return any((directory / name).is_file() for name in (".hydra/config.yaml", "metrics.json", FAILED_NAME))


def find_runs(path: Path) -> list[Path]:
    if not path.exists():
        raise DeitTrainError(f"{path} does not exist: pass a deit-train run directory or a sweep directory")
    if is_run(path):
        return [path]
    runs = {p.parent for p in path.rglob(".hydra") if p.is_dir() and p.parent != path}
    runs |= {p.parent for p in path.rglob(FAILED_NAME) if p.parent != path}  # a job refused before it wrote .hydra/
    if not runs:
        raise DeitTrainError(
            f"{path} holds no deit-train runs: no .hydra/config.yaml or metrics.json in it or below it"
        )
    return sorted(runs, key=lambda p: [int(part) if part.isdigit() else part for part in p.relative_to(path).parts])


def read_file(path: Path, parse, expected: str, valid=lambda value: True):
    """`parse(text)` of a run's file, or one line naming the file, what it should hold and the fix."""
    try:
        value = parse(path.read_text())
    except (ValueError, yaml.YAMLError, UnicodeDecodeError) as error:
        detail = str(error).splitlines()[0][:100]
        raise DeitTrainError(f"{path} is not {expected} ({detail}): repair or remove the file, or the run") from error
    if not valid(value):
        raise DeitTrainError(f"{path} is not {expected}: repair or remove the file, or the run")
    return value


def read_run(directory: Path) -> Run:
    import json

    overrides, metrics = [], None
    if (path := directory / ".hydra" / "overrides.yaml").is_file():
        overrides = read_file(
            path,
            yaml.safe_load,
            "a list of command-line overrides",
            lambda v: v is None or (isinstance(v, list) and all(isinstance(o, str) for o in v)),
        )
        overrides = overrides or []
    best = None
    if (path := directory / "metrics.json").is_file():
        record = read_file(path, json.loads, "deit-train's metrics.json (last_epoch: its metrics)", is_metrics_record)
        if LAST not in record:  # written before metrics.json said its units: the last epoch's fractions
            record = {LAST: in_percent(record)}
        metrics = {k: v for k, v in record[LAST].items() if k != "epoch"}
        best = record.get(BEST)
    run = Run(directory, overrides, metrics, read_failure(directory), best=best, classes=read_class_results(directory))
    if run.failure is not None and not overrides:
        run.overrides = run.failure.overrides
    config_file = directory / ".hydra" / "config.yaml"
    if config_file.is_file():
        config = read_file(config_file, yaml.safe_load, "a run's config", lambda v: v is None or isinstance(v, dict))
        task = (config or {}).get("task") or {}
        run.optimized = (task.get("optimized_metric", "val/acc1"), task.get("optimized_mode", "max"))
    run.history = read_history(directory)
    return run


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_metrics_record(value: object) -> bool:
    """metrics.json as results.py writes it ({"last_epoch": {...}, "best_checkpoint": {...}}), or as earlier
    versions did (one object of numbers)."""
    if not isinstance(value, dict):
        return False
    if LAST not in value:
        return all(is_number(x) for x in value.values())
    parts = [value[LAST], *([value[BEST]] if BEST in value else [])]
    return all(
        isinstance(part, dict) and all(is_number(x) for k, x in part.items() if k not in ("path", "monitor"))
        for part in parts
    )


def read_history(directory: Path) -> dict[str, list[tuple[int, int, float]]]:
    """Every logged scalar of the run over all its launches (a resumed run writes version_1, ...): CSV logger
    files, else TensorBoard event files, else W&B run files, whichever the run used. Later launches replace
    repeated steps."""
    history: dict[str, dict[int, tuple[int, int, float]]] = defaultdict(dict)
    versions = sorted(
        (p for p in directory.glob("csv/version_*/metrics.csv") if p.parent.name[8:].isdigit()),
        key=lambda p: int(p.parent.name[8:]),
    )
    for metrics_file in versions:
        with metrics_file.open() as file:
            try:
                for row in csv.DictReader(file):
                    step, epoch = int(float(row.get("step") or 0)), int(float(row.get("epoch") or 0))
                    for name, value in row.items():
                        if name not in ("step", "epoch") and value not in ("", None):
                            key = epoch if name.startswith("val") else step  # one validation per epoch
                            history[name][key] = (epoch, step, float(value))
            except (ValueError, TypeError, csv.Error) as error:
                raise DeitTrainError(
                    f"{metrics_file} is not a CSV logger's metrics file ({error}): repair or remove it"
                ) from error
    if not versions:
        for event_file in sorted(directory.glob("tensorboard/version_*/events.out.tfevents.*")):
            read_tensorboard(event_file, history)
    if not history:  # offline runs (offline-run-<time>-<id>) and synced ones (run-<time>-<id>), in time order
        for run_file in sorted(
            directory.glob("wandb/*run-*/run-*.wandb"), key=lambda p: p.parent.name.split("run-")[1]
        ):
            read_wandb(run_file, history)
    return {name: [points[k] for k in sorted(points)] for name, points in history.items()}


def read_tensorboard(event_file: Path, history: dict) -> None:
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as error:
        raise DeitTrainError(f"{event_file} is a TensorBoard log: pip install tensorboard to read it") from error
    events = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    epochs = {event.step: int(event.value) for event in events.Scalars("epoch")} if "epoch" in tags else {}
    for tag in tags:
        if tag == "epoch":
            continue
        for event in events.Scalars(tag):
            epoch = epochs.get(event.step, 0)
            key = epoch if tag.startswith("val") else event.step
            history[tag][key] = (epoch, event.step, float(event.value))


def read_wandb(run_file: Path, history: dict) -> None:
    """The rows Lightning's WandbLogger logged: each carries trainer/global_step, and epoch where it was logged."""
    from deit_train.tools.wandb_records import history_rows

    for row in history_rows(run_file):
        step, epoch = int(row.pop("trainer/global_step", 0)), int(row.pop("epoch", 0))
        for name, value in row.items():
            key = epoch if name.startswith("val") else step  # one validation per epoch
            history[name][key] = (epoch, step, value)


# ----------------------------------------------------------------------------------------------------------------
# One run


def run_figure(run: Run):
    """Validation top-1 of every head (and EMA, teacher, agreement) per epoch; train loss and its terms per step;
    learning rate per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, (val_axes, loss_axes, lr_axes) = plt.subplots(1, 3, figsize=(16, 4.5), constrained_layout=True)
    figure.suptitle(textwrap.fill(f"{run.directory}: {run.configuration()}", 200), fontsize=8)
    for name, label in VAL_CURVES.items():
        points = run.history.get(name)
        if points:
            val_axes.plot([e for e, _, _ in points], [100 * v for _, _, v in points], marker=".", label=label)
    val_axes.set(title="validation", xlabel="epoch", ylabel="top-1 (%)")
    val_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    for name in sorted(n for n in run.history if n.startswith("train/loss")):
        points = run.history[name]
        loss_axes.plot([s for _, s, _ in points], [v for _, _, v in points], label=name.removeprefix("train/"))
    loss_axes.set(title="training loss", xlabel="optimizer step", ylabel="loss (nats)")
    for name in sorted(n for n in run.history if n.startswith("lr-")):
        points = run.history[name]
        lr_axes.plot([s for _, s, _ in points], [v for _, _, v in points], label=name)
    lr_axes.set(title="learning rate", xlabel="optimizer step", ylabel="learning rate")
    for axes in (val_axes, loss_axes, lr_axes):
        if axes.lines:
            axes.legend(fontsize=8)
        axes.grid(alpha=0.3)
    return figure


# ----------------------------------------------------------------------------------------------------------------
# Several runs


@dataclass
class Row:
    configuration: str
    runs: list[Run]
    stats: dict[str, tuple[float, float, int]]  # metric -> (mean, std, n) over the finished runs
    best: bool = False


def mean_std(values: list[float]) -> tuple[float, float, int]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def sweep_rows(runs: list[Run]) -> list[Row]:
    common = set.intersection(*(set(run.overrides) for run in runs))
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        groups[run.configuration(common)].append(run)
    rows = []
    for configuration, members in groups.items():
        finished = [run.metrics for run in members if run.metrics is not None]
        names = [m for m in TABLE_METRICS if finished and all(m in metrics for metrics in finished)]
        stats = {name: mean_std([metrics[name] for metrics in finished]) for name in names}
        rows.append(Row(configuration, members, stats))
    metric, mode = reported_name(runs[0].optimized[0]), runs[0].optimized[1]
    scored = [row for row in rows if metric in row.stats]
    if scored:
        best = (max if mode == "max" else min)(scored, key=lambda row: row.stats[metric][0])
        best.best = True
    return rows


def markdown_table(rows: list[Row], optimized: str) -> str:
    metrics = [m for m in TABLE_METRICS if any(m in row.stats for row in rows)]
    header = ["configuration", "n", *metrics, "failed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        n = max((s[2] for s in row.stats.values()), default=0)
        cells = [row.configuration + (" **(best)**" if row.best else ""), str(n)]
        for metric in metrics:
            if metric not in row.stats:
                cells.append("-")
                continue
            mean, std, _ = row.stats[metric]
            cells.append(f"{mean:.2f} ± {std:.2f}")
        failed = [run.directory.name for run in row.runs if run.metrics is None]
        cells.append(", ".join(failed) or "")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nAccuracies in %, mean ± standard deviation over seeds (n runs); best by {optimized}.")
    return "\n".join(lines)


def write_table_csv(rows: list[Row], path: Path) -> None:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["configuration", "best", "metric", "mean", "std", "n", "failed_runs"])
        for row in rows:
            failed = " ".join(str(run.directory) for run in row.runs if run.metrics is None)
            for metric, (mean, std, n) in row.stats.items():
                writer.writerow([row.configuration, row.best, metric, mean, std, n, failed])
            if not row.stats:
                writer.writerow([row.configuration, row.best, "", "", "", 0, failed])


def sweep_figure(rows: list[Row], metric: str = "val/acc1"):
    """`metric` per epoch for every configuration: the mean over its seeds, with mean ± std as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(figsize=(9, 5), constrained_layout=True)
    for row in rows:
        per_epoch: dict[int, list[float]] = defaultdict(list)
        for run in row.runs:
            for epoch, _, value in run.history.get(metric, []):
                per_epoch[epoch].append(100 * value)
        if not per_epoch:
            continue
        epochs = sorted(per_epoch)
        means = [statistics.fmean(per_epoch[e]) for e in epochs]
        stds = [statistics.stdev(per_epoch[e]) if len(per_epoch[e]) > 1 else 0.0 for e in epochs]
        seeds = max(len(per_epoch[e]) for e in epochs)
        (line,) = axes.plot(epochs, means, marker=".", label=f"{row.configuration} (n={seeds})")
        axes.fill_between(
            epochs,
            [m - s for m, s in zip(means, stds, strict=True)],
            [m + s for m, s in zip(means, stds, strict=True)],
            color=line.get_color(),
            alpha=0.2,
        )
    axes.set(title=f"{metric} per configuration (band: ± 1 std over seeds)", xlabel="epoch", ylabel="top-1 (%)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend(fontsize=8)
    return figure


# ----------------------------------------------------------------------------------------------------------------


def missing_jobs(path: Path, runs: list[Run]) -> list[list[str]]:
    """The jobs the sweep's multirun.yaml asked for (Hydra's basic sweeper) that have no directory: never ran."""
    multirun = path / "multirun.yaml"
    if not multirun.is_file():
        return []
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        jobs = expected_jobs(OmegaConf.load(multirun)) or []
    except (OmegaConfBaseException, yaml.YAMLError, ValueError, AttributeError) as error:
        detail = str(error).splitlines()[0][:100] if str(error) else type(error).__name__
        raise DeitTrainError(f"{multirun} is not a sweep's multirun.yaml ({detail}): repair or remove it") from error
    ran = {tuple(run.overrides) for run in runs}
    return [job for job in jobs if tuple(job) not in ran]


def sweep_notes(runs: list[Run], missing: list[list[str]]) -> list[str]:
    """Lines under the table: the failed jobs with their message, the jobs that never ran, the runs that have no
    result and no failure record (still running, or killed)."""
    common = set.intersection(*(set(job) for job in [*(run.overrides for run in runs), *missing]))
    shown = lambda overrides: " ".join(o for o in overrides if o not in common) or "(no overrides)"  # noqa: E731
    failed = [run for run in runs if run.failure is not None]  # a resumed sweep's job may have earlier results
    silent = [run for run in runs if run.metrics is None and run.failure is None]
    total = len(runs) + len(missing)
    lines = []
    if failed:
        lines.append(f"{len(failed)} of {total} jobs failed:")
        lines += [
            f"- {run.directory.name} ({shown(run.overrides)}): exit {run.failure.exit_status}: "
            f"{run.failure.message}{' (its earlier metrics.json kept)' if run.metrics else ''}"
            for run in failed
        ]
    if missing:
        lines.append(f"{len(missing)} of {total} jobs never ran (in multirun.yaml, no directory):")
        lines += [f"- {shown(job)}" for job in missing]
    if silent:
        lines.append(
            f"{len(silent)} of {len(runs)} runs have no metrics.json (failed or still running): "
            f"{', '.join(str(run.directory) for run in silent)}"
        )
    return lines


def report(path: Path, out: Path | None = None) -> dict:
    """Write the report of `path` into `out` (default: `path`); returns what was written."""
    run_dirs = find_runs(path)
    out = out or (path if path.is_dir() else path.parent)
    out.mkdir(parents=True, exist_ok=True)
    runs = [read_run(d) for d in run_dirs]
    missing = missing_jobs(path, runs)
    if len(runs) == 1 and not (path / "multirun.yaml").is_file():
        run = runs[0]
        if not run.history and run.failure is not None:
            raise DeitTrainError(
                f"{run.directory} is a sweep job that failed (exit {run.failure.exit_status}): {run.failure.message}"
            )
        if not run.history:
            raise DeitTrainError(
                f"{run.directory} has no logs to draw: no csv/version_*/metrics.csv, tensorboard/ event files "
                f"or wandb/*run-*/run-*.wandb "
                f"(was it run with logger=null, or has it not finished an epoch yet?)"
            )
        figure_path = out / "report.png"
        run_figure(run).savefig(figure_path, dpi=110)
        return {"runs": runs, "figure": figure_path}
    notes = sweep_notes(runs, missing)
    if not any(run.metrics is not None for run in runs) and not any(run.failure for run in runs) and not missing:
        raise DeitTrainError(
            f"none of the {len(runs)} runs in {path} has finished (no metrics.json): failed, or still running"
        )
    rows = sweep_rows(runs)
    table = "\n\n".join([markdown_table(rows, runs[0].optimized[0]), *(["\n".join(notes)] if notes else [])])
    (out / "report.md").write_text(table + "\n")
    write_table_csv(rows, out / "report.csv")
    figure_path = out / "report.png"
    sweep_figure(rows).savefig(figure_path, dpi=110)
    return {"runs": runs, "rows": rows, "table": table, "figure": figure_path, "missing": missing}


def run_summary(run: Run, worst: int = 5) -> str:
    """A run's last epoch, best.ckpt's epoch and its worst classes, as lines."""
    shown = lambda metrics: ", ".join(  # noqa: E731
        f"{k.removesuffix('_percent')} {v:.2f}%" if k.endswith("_percent") else f"{k} {v:.4g}"
        for k, v in sorted(metrics.items(), key=lambda item: item[0].removesuffix("_percent"))
        if is_number(v) and k != "epoch" and not math.isnan(v)
    )
    if run.metrics is None:
        return f"{run.directory}: no metrics.json yet"
    lines = [f"{run.directory}: last epoch: {shown(run.metrics)}"]
    if run.best:
        lines.append(f"best.ckpt (epoch {run.best.get('epoch')}): {shown(run.best)}")
    if run.classes:
        lines.append(f"worst classes (best.ckpt): {describe(worst_classes(run.classes, worst))}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="deit-report", description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="a run directory or a directory of runs (a sweep)")
    parser.add_argument("--out", type=Path, help="where to write report.png (and report.md, report.csv)")
    args = parser.parse_args(argv)
    with error_boundary("deit-report"):
        if args.out is not None and args.out.exists() and not args.out.is_dir():
            raise DeitTrainError(
                f"--out {args.out} is a file: give a folder to write report.png (and report.md, report.csv) into"
            )
        written = report(args.path, args.out)
    if "table" in written:
        print(written["table"])
    else:
        print(run_summary(written["runs"][0]))
    print(f"figure: {written['figure']}")


if __name__ == "__main__":
    main()
