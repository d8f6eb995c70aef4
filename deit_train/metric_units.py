"""The units a person reads a run's numbers in, one scale everywhere (metrics.json, the console, deit-eval,
deit-report): accuracies (top-k, the teacher's, the student-teacher agreement) in percent, under keys that say so
(`val/acc1_percent`); losses as they are. The loggers (CSV, TensorBoard, W&B) keep Lightning's own values, fractions
under the metric's name. Plain functions without imports: deit-report and the command line read them (results.py
writes metrics.json with them)."""

PERCENT_SUFFIX = "_percent"
LAST, BEST = "last_epoch", "best_checkpoint"


def is_fraction(name: str) -> bool:
    """An accuracy-like metric Lightning logs as a fraction: val/acc1, val/acc5_cls, val/teacher_acc1, val/agreement."""
    return name.rsplit("/", 1)[-1].startswith(("acc", "teacher_acc", "agreement"))


def in_percent(metrics: dict[str, float]) -> dict[str, float]:
    """Logged metrics under the names a person reads: fractions as percent, with the unit in the key."""
    return {reported_name(name): 100 * value if is_fraction(name) else value for name, value in metrics.items()}


def reported_name(name: str) -> str:
    """A logged metric's name in metrics.json (val/acc1 -> val/acc1_percent)."""
    return f"{name}{PERCENT_SUFFIX}" if is_fraction(name) else name


def as_logged(metrics: dict[str, float]) -> dict[str, float]:
    """in_percent's inverse: the names and fractions Lightning logged (a sweep's objective is one of them)."""
    return {
        name.removesuffix(PERCENT_SUFFIX): value / 100 if name.endswith(PERCENT_SUFFIX) else value
        for name, value in metrics.items()
        if name != "epoch"
    }


def format_metrics(metrics: dict[str, float]) -> str:
    """Logged metrics on one console line: accuracies in percent (`val/acc1 56.83%`), others as they are."""
    return ", ".join(
        f"{name} {100 * value:.2f}%" if is_fraction(name) else f"{name} {value:.4g}"
        for name, value in sorted(metrics.items())
    )


def last_epoch_metrics(record: dict) -> dict[str, float]:
    """A metrics.json's last epoch, as Lightning logged it (train() returns these)."""
    return as_logged(record.get(LAST, {}))
