"""`deit-eval MODEL DATA`: top-1/top-5 of the class head, the distillation head and their average, per-class
accuracy and the confusion matrix, and images/s.

MODEL is a deit-train .ckpt or a deit-export directory; DATA an ImageFolder (one sub-folder per class), or a
folder holding one as val/ (the training layout), or a local Hugging Face dataset or hf:NAME (--split, default its
validation split), read as deit-train reads them (data/sources/locate.py). Class folders are matched to the model's
classes by name, so a subset of the classes may be evaluated. Results are printed as a table with the worst
classes; --json writes them as JSON, --out DIR writes results.json with the per-class files (class_results.py:
per_class.csv, confusion.csv, confusion.png).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from deit_train.class_results import ClassResult, class_results, describe, worst_classes, write_class_results
from deit_train.data.sources.locate import in_the_tools_terms, locate
from deit_train.errors import DeitTrainError, error_boundary
from deit_train.tools.arguments import (
    ArgumentParser,
    at_least,
    existing_model,
    new_output_dir,
    writable_file,
    write_text,
)

if TYPE_CHECKING:  # torch, torchmetrics and the models are imported once the arguments are read (--help: at once)
    from deit_train.models.trained_model import TrainedModel


def open_eval_folder(
    data: str | Path,
    split: str,
    trained: TrainedModel,
    image_column: str | None = None,
    label_column: str | None = None,
):
    """DATA's `split`, labelled in the model's class order: the source `deit-train` would read DATA with
    (data/sources/locate.py), asked for its evaluation split."""
    with in_the_tools_terms(""):
        source = locate(str(data), image_column=image_column, label_column=label_column)
        if source is None:
            root = Path(data).expanduser()
            what = "is a file, not a folder" if root.exists() else "does not exist"
            raise DeitTrainError(f"{root} {what}: pass an ImageFolder (one sub-folder per class)")
        return source.evaluation(split, trained.transform(), trained.class_names)


def evaluate(trained: TrainedModel, dataset, batch_size: int = 64, num_workers: int = 2) -> dict:
    import torch

    with torch.inference_mode():
        return scores(trained, dataset, batch_size, num_workers)


def scores(trained: TrainedModel, dataset, batch_size: int, num_workers: int) -> dict:
    import torch
    from torch.utils.data import DataLoader
    from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

    from deit_train.models.student import average_heads, forward_heads

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = trained.model.to(device)
    num_classes = len(trained.class_names)
    top5 = min(5, num_classes)
    metrics = {
        name: {k: MulticlassAccuracy(num_classes, top_k=k, average="micro").to(device) for k in (1, top5)}
        for name in ("class", "distillation", "average")
    }
    confusion = MulticlassConfusionMatrix(num_classes).to(device)  # of the prediction (the average)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    model_seconds, images_seen, non_finite = 0.0, 0, 0
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        start = time.perf_counter()
        cls_logits, dist_logits = forward_heads(model, images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        model_seconds += time.perf_counter() - start
        images_seen += len(images)
        non_finite += int((~torch.isfinite(cls_logits).all(dim=1)).sum())
        outputs = {
            "class": cls_logits,
            "distillation": dist_logits,
            "average": average_heads(cls_logits, dist_logits),
        }
        for name, logits in outputs.items():
            if logits is not None:
                for metric in metrics[name].values():
                    metric(logits, labels)
        confusion(outputs["average"], labels)
    if images_seen == 0:
        raise DeitTrainError("the evaluation folder holds no images")
    if non_finite:
        raise DeitTrainError(
            f"the model's outputs are NaN or inf on {non_finite} of {images_seen} images: its weights "
            f"are not usable (a diverged run?). Evaluate an earlier checkpoint"
        )
    if dist_logits is None:  # a single-head student: its one head is the prediction
        del metrics["class"], metrics["distillation"]
    classes = class_results(confusion.compute(), trained.class_names)
    return {
        "images": images_seen,
        "images_per_second": images_seen / model_seconds,
        "device": device.type,
        "heads": {
            name: {f"top{k}": 100 * metric.compute().item() for k, metric in head.items()}
            for name, head in metrics.items()
        },
        "per_class": [  # the classes DATA has images of
            {"class": r.name, "images": r.images, "correct": r.correct, "accuracy_percent": r.accuracy_percent}
            for r in classes
            if r.images
        ],
        "confusion": confusion.compute().cpu(),  # rows: true class, columns: predicted, the model's class order
    }


def format_table(result: dict) -> str:
    top5 = next(k for k in next(iter(result["heads"].values())) if k != "top1")
    lines = [f"{'head':<14}{'top-1':>8}{top5.replace('top', 'top-'):>8}"]
    for name, scores in result["heads"].items():
        lines.append(f"{name:<14}{scores['top1']:>8.2f}{scores[top5]:>8.2f}")
    lines.append(
        f"{result['images']} images, {result['images_per_second']:.1f} images/s (model only, {result['device']})"
    )
    if len(result["per_class"]) > 1:
        seen = [ClassResult(r["class"], r["images"], r["correct"]) for r in result["per_class"]]
        lines.append(f"worst classes (top-1 of the prediction): {describe(worst_classes(seen, 5))}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="deit-eval", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a deit-train .ckpt or a deit-export directory")
    parser.add_argument(
        "data", help="an ImageFolder, or a folder with one under val/; a local Hugging Face dataset, or hf:NAME"
    )
    parser.add_argument("--split", default="val", help="sub-folder of DATA to use when present (default: val)")
    parser.add_argument("--image-column", help="a Hugging Face DATA's image column (default: its first Image feature)")
    parser.add_argument(
        "--label-column",
        help="a Hugging Face DATA's label column: a ClassLabel or integers, as "
        "data.label_column in training (default: its first ClassLabel feature)",
    )
    parser.add_argument("--batch-size", type=at_least(1), default=64)
    parser.add_argument("--num-workers", type=at_least(0), default=2)
    parser.add_argument("--ema", action="store_true", help="use a checkpoint's EMA weights")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument(
        "--out",
        type=Path,
        help="a new or empty folder: results.json, per_class.csv, confusion.csv (class names on both axes) and "
        "confusion.png",
    )
    args = parser.parse_args(argv)
    with error_boundary("deit-eval"):
        existing_model(args.model)
        if args.json:  # before the evaluation, not after it
            writable_file(args.json, "--json")
        if args.out:
            new_output_dir(args.out, "--out")
        from deit_train.models.trained_model import load_trained_model

        trained = load_trained_model(args.model, ema=args.ema)
        dataset = open_eval_folder(args.data, args.split, trained, args.image_column, args.label_column)
        result = {
            "model": args.model,
            "data": dataset.root,
            **evaluate(trained, dataset, args.batch_size, args.num_workers),
        }
        confusion = result.pop("confusion")
        print(format_table(result))
        text = json.dumps(result, indent=2, default=str) + "\n"
        if args.json:
            write_text(args.json, text)
        if args.out:
            for path in write_class_results(confusion, trained.class_names, args.out.expanduser()):
                print(f"written: {path}")
            write_text(args.out / "results.json", text)


if __name__ == "__main__":
    main()
