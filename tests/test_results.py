"""What a person reads after training: per-class results (deit-eval --out, and the best.ckpt epoch's at the end of
a run), metrics.json in percent with best.ckpt's epoch and metrics, and deit-report on a run that logged to W&B only.
Each is checked against an independent count: the model run image by image outside Lightning, the CSV logger."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from deit_train.data.sources.imagefolder import ImageFolder
from deit_train.models.trained_model import load_trained_model
from deit_train.tools.evaluate import evaluate, main, open_eval_folder
from deit_train.tools.report import read_history, report
from deit_train.train import train

from .conftest import TINY, compose_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("results") / "run"
    train(compose_config([*TINY, "trainer.max_epochs=3"], run_dir, cache_dir))
    return run_dir


def confusion_by_hand(checkpoint: Path, folder: Path) -> tuple[list[str], torch.Tensor]:
    """The model's classes and its confusion matrix on `folder`, one image at a time (rows: true class)."""
    trained = load_trained_model(checkpoint)
    dataset = ImageFolder(folder, trained.transform(), max_pixels=None)
    names = trained.class_names
    confusion = torch.zeros(len(names), len(names), dtype=torch.long)
    with torch.no_grad():
        for image, target in dataset:
            predicted = trained.model(image[None]).argmax(dim=1).item()
            confusion[names.index(dataset.classes[target]), predicted] += 1
    return names, confusion


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as file:
        return list(csv.reader(file))


def test_deit_eval_writes_per_class_accuracy_and_a_named_confusion_matrix(run_dir, demo_data, tmp_path, capsys):
    three = tmp_path / "three"
    for name in ("circle", "ring", "vbars"):
        shutil.copytree(demo_data / "val" / name, three / name)
    checkpoint = run_dir / "checkpoints" / "best.ckpt"
    main([str(checkpoint), str(three), "--num-workers", "0", "--out", str(tmp_path / "out")])
    assert "worst classes" in capsys.readouterr().out
    names, expected = confusion_by_hand(checkpoint, three)
    rows = read_csv(tmp_path / "out" / "confusion.csv")
    assert rows[0] == ["true \\ predicted", *names]  # every class named, in the model's order
    assert [row[0] for row in rows[1:]] == names
    assert torch.tensor([[int(x) for x in row[1:]] for row in rows[1:]]).equal(expected)
    per_class = {row[0]: row[1:] for row in read_csv(tmp_path / "out" / "per_class.csv")[1:]}
    for name in ("circle", "ring", "vbars"):
        i = names.index(name)
        images, correct = int(expected[i].sum()), int(expected[i, i])
        assert per_class[name] == [str(images), str(correct), f"{100 * correct / images:.4f}"]
    assert per_class["square"] == ["0", "0", ""]  # a class the folder has no images of
    assert (tmp_path / "out" / "confusion.png").stat().st_size > 5_000
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["class"] for r in written["per_class"]} == {"circle", "ring", "vbars"}


def test_a_run_ends_with_best_ckpts_epoch_metrics_and_per_class_results(run_dir, demo_data):
    record = json.loads((run_dir / "metrics.json").read_text())
    best, last = record["best_checkpoint"], record["last_epoch"]
    assert last["epoch"] == 2
    stored = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert best["epoch"] == stored["epoch"] and best["path"] == "checkpoints/best.ckpt"
    trained = load_trained_model(run_dir / "checkpoints" / "best.ckpt")
    measured = evaluate(trained, open_eval_folder(demo_data, "val", trained), batch_size=7, num_workers=0)
    assert best["val/acc1_percent"] == pytest.approx(measured["heads"]["average"]["top1"], abs=1e-4)
    assert best["val/acc1_cls_percent"] == pytest.approx(measured["heads"]["class"]["top1"], abs=1e-4)
    assert best["val/acc5_percent"] == pytest.approx(measured["heads"]["average"]["top5"], abs=1e-4)
    # the per-class files of the run are best.ckpt's, as deit-eval counts them
    per_class = {row[0]: (int(row[1]), int(row[2])) for row in read_csv(run_dir / "per_class.csv")[1:]}
    assert per_class == {r["class"]: (r["images"], r["correct"]) for r in measured["per_class"]}
    names, expected = confusion_by_hand(run_dir / "checkpoints" / "best.ckpt", demo_data / "val")
    rows = read_csv(run_dir / "confusion.csv")
    assert torch.tensor([[int(x) for x in row[1:]] for row in rows[1:]]).equal(expected)


@pytest.mark.slow
def test_deit_report_draws_a_run_that_logged_to_wandb_only(tmp_path, cache_dir):
    """A run with the CSV and W&B loggers side by side; without its csv/ the report reads the W&B file (offline)
    and finds every validation value the CSV logger wrote."""
    run_dir = tmp_path / "run"
    train(compose_config([*TINY, "trainer.max_epochs=2", "logger=[csv,wandb]"], run_dir, cache_dir))
    from_csv = read_history(run_dir)
    wandb_only = tmp_path / "wandb_only"
    shutil.copytree(run_dir, wandb_only, ignore=shutil.ignore_patterns("csv"))
    from_wandb = read_history(wandb_only)
    for name in ("val/acc1", "val/acc1_cls", "val/loss", "train/loss"):
        assert [(e, s) for e, s, _ in from_wandb[name]] == [(e, s) for e, s, _ in from_csv[name]], name
        assert [v for _, _, v in from_wandb[name]] == pytest.approx([v for _, _, v in from_csv[name]]), name
    written = report(wandb_only, tmp_path / "out")
    assert written["figure"].stat().st_size > 10_000
    assert [epoch for epoch, _, _ in written["runs"][0].history["val/acc1"]] == [0, 1]


def test_beyond_fifty_classes_the_figure_lists_the_worst_ones(tmp_path):
    """60 classes: class k has 10 images, k % 11 of them right. The figure shows the 50 with the lowest accuracy,
    worst at the top; the CSV keeps all 60."""
    from deit_train.class_results import class_results, confusion_figure, write_class_results

    names = [f"class{k:02d}" for k in range(60)]
    confusion = torch.zeros(60, 60, dtype=torch.long)
    for k in range(60):
        confusion[k, k] = k % 11
        confusion[k, (k + 1) % 60] = 10 - k % 11
    write_class_results(confusion, names, tmp_path)
    assert len(read_csv(tmp_path / "per_class.csv")) == 61 and (tmp_path / "confusion.png").is_file()
    (axes,) = confusion_figure(confusion, class_results(confusion, names)).axes
    shown = [label.get_text() for label in axes.get_yticklabels()][::-1]  # barh draws bottom-up
    expected = sorted(names, key=lambda name: (int(name[5:]) % 11, int(name[5:])))[:50]
    assert shown == expected


def test_the_figures_a_process_writes_are_not_kept_by_pyplot(tmp_path):
    """A sweep runs many jobs in one process, each writing confusion.png at its end: pyplot's figure registry would
    keep every one of them (and warn past 20); the figures are matplotlib's own objects, freed with the run."""
    import matplotlib.pyplot as plt

    from deit_train.class_results import write_class_results

    before = plt.get_fignums()
    for count in (3, 60):  # the matrix and, beyond 50 classes, the worst classes' bars
        confusion = torch.eye(count, dtype=torch.long) * 4
        write_class_results(confusion, [f"c{k}" for k in range(count)], tmp_path / str(count))
        assert (tmp_path / str(count) / "confusion.png").stat().st_size > 0
    assert plt.get_fignums() == before
