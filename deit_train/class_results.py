"""Per-class results: accuracy of each class and the confusion matrix, with the class names, as files a person reads
first on their own data. deit-eval writes them for the model it evaluates; a training run writes them at its end for
the epoch best.ckpt holds (results.py: BestEpoch, in conf/callbacks/default.yaml); deit-report lists the worst.

Files (in a run directory, or deit-eval's --out):
  per_class.csv     class, images, correct, accuracy_percent: one row per class, in the model's class order
  confusion.csv     rows: the true class, columns: the predicted class (image counts), both named
  confusion.png     the confusion matrix, row-normalised, readable up to MAX_DRAWN classes; beyond that, a bar
                    chart of the MAX_DRAWN worst classes' accuracy
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # deit-report reads these files without torch
    import torch


PER_CLASS_NAME, CONFUSION_NAME, FIGURE_NAME = "per_class.csv", "confusion.csv", "confusion.png"
MAX_DRAWN = 50  # classes in a confusion matrix one can still read at a glance


@dataclass
class ClassResult:
    name: str
    images: int
    correct: int

    @property
    def accuracy_percent(self) -> float:
        return 100 * self.correct / self.images if self.images else float("nan")


def class_results(confusion: torch.Tensor, class_names: list[str]) -> list[ClassResult]:
    """Each class's images (its row's sum) and correct predictions (the diagonal)."""
    confusion = confusion.long().cpu()
    return [ClassResult(name, int(confusion[i].sum()), int(confusion[i, i])) for i, name in enumerate(class_names)]


def worst_classes(results: list[ClassResult], count: int = 5) -> list[ClassResult]:
    """The `count` classes with the lowest accuracy among those with images (ties: the model's class order)."""
    seen = [result for result in results if result.images]
    return sorted(seen, key=lambda result: result.accuracy_percent)[:count]


def describe(results: list[ClassResult]) -> str:
    return ", ".join(f"{r.name} {r.accuracy_percent:.2f}% ({r.correct}/{r.images})" for r in results)


def write_class_results(confusion: torch.Tensor, class_names: list[str], directory: Path) -> list[Path]:
    """per_class.csv, confusion.csv and confusion.png of `confusion` (rows true, columns predicted) in
    `directory`; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    confusion = confusion.long().cpu()
    results = class_results(confusion, class_names)
    with (directory / PER_CLASS_NAME).open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["class", "images", "correct", "accuracy_percent"])
        for result in results:
            accuracy = f"{result.accuracy_percent:.4f}" if result.images else ""  # no images of it here
            writer.writerow([result.name, result.images, result.correct, accuracy])
    with (directory / CONFUSION_NAME).open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["true \\ predicted", *class_names])
        for name, row in zip(class_names, confusion.tolist(), strict=True):
            writer.writerow([name, *row])
    confusion_figure(confusion, results).savefig(directory / FIGURE_NAME, dpi=110)
    return [directory / name for name in (PER_CLASS_NAME, CONFUSION_NAME, FIGURE_NAME)]


def read_class_results(directory: Path) -> list[ClassResult] | None:
    """per_class.csv of a run directory (or deit-eval's --out), or None when there is none."""
    path = directory / PER_CLASS_NAME
    if not path.is_file():
        return None
    with path.open(newline="") as file:
        return [ClassResult(row["class"], int(row["images"]), int(row["correct"])) for row in csv.DictReader(file)]


def confusion_figure(confusion: torch.Tensor, results: list[ClassResult]):
    # A Figure of its own, not pyplot's: pyplot keeps every figure it made until closed (a sweep of many runs in
    # one process would hold them all), and needs no display backend chosen.
    from matplotlib.figure import Figure

    names = [result.name for result in results]
    if len(names) > MAX_DRAWN:  # a matrix of hundreds of classes is unreadable: the worst classes instead
        worst = worst_classes(results, MAX_DRAWN)
        figure = Figure(figsize=(8, 0.22 * len(worst) + 1.2), layout="constrained")
        axes = figure.subplots()
        axes.barh([r.name for r in worst][::-1], [r.accuracy_percent for r in worst][::-1])
        axes.set(
            title=f"the {len(worst)} worst of {len(names)} classes (all in {PER_CLASS_NAME})", xlabel="accuracy (%)"
        )
        axes.tick_params(axis="y", labelsize=7)
        return figure
    totals = confusion.sum(dim=1, keepdim=True).clamp(min=1)
    normalised = (100 * confusion / totals).numpy()
    size = max(4.0, 0.28 * len(names) + 2)
    figure = Figure(figsize=(size + 1, size), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(normalised, cmap="Blues", vmin=0, vmax=100)
    ticks = range(len(names))
    axes.set_xticks(ticks, names, rotation=90, fontsize=7)
    axes.set_yticks(ticks, [f"{r.name} ({r.accuracy_percent:.0f}%)" for r in results], fontsize=7)
    axes.set(xlabel="predicted class", ylabel="true class (its accuracy)", title="confusion matrix (% of each row)")
    figure.colorbar(image, ax=axes, label="% of the true class's images")
    return figure
