"""`deit-predict MODEL IMAGE_OR_FOLDER...`: top-k class names with probabilities, one JSON line per image.

MODEL is a deit-train .ckpt or a deit-export directory (transformers or timm). Folders are searched
recursively for images. The prediction is the softmax of the average of the two heads' logits. An image that
cannot be read gets an {"image", "error"} line, and the exit status is then 3.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from deit_train.data.images import IMAGE_EXTENSIONS, image_files, load_image
from deit_train.errors import DataError, DeitTrainError, error_boundary
from deit_train.tools.arguments import ArgumentParser, at_least, existing_model

if TYPE_CHECKING:  # torch and the models are imported once the arguments are read (--help: at once)
    from deit_train.models.trained_model import TrainedModel


def image_paths(inputs: list[str]) -> list[Path]:
    paths = []
    for name in inputs:
        path = Path(name).expanduser()
        if path.is_dir():
            paths += image_files(path)
        elif path.is_file():
            paths.append(path)
        elif path.exists():  # a named pipe, a device: reading it would block or never end
            raise DeitTrainError(f"{path} is not a regular file: pass image files or folders of them")
        else:
            raise DeitTrainError(f"{path} does not exist: pass image files or folders of them")
    if not paths:
        raise DeitTrainError(f"no images found in {inputs} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return paths


def predict(trained: TrainedModel, paths: list[Path], top_k: int = 5, batch_size: int = 32) -> Iterator[dict]:
    """One record per image: {"image", "predictions": [{"label", "score"}, ...]} or {"image", "error"}."""
    import torch

    transform = trained.transform()
    top_k = min(top_k, len(trained.class_names))
    for start in range(0, len(paths), batch_size):
        batch, readable = [], []
        for path in paths[start : start + batch_size]:
            try:
                batch.append(transform(load_image(path)))
                readable.append(path)
            except DataError as error:
                yield {"image": str(path), "error": str(error)}
        if not batch:
            continue
        with torch.inference_mode():
            logits = trained.model(torch.stack(batch))
        if not torch.isfinite(logits).all():
            raise DeitTrainError(
                "the model's outputs are NaN or inf: its weights are not usable (a diverged run?). "
                "Predict with an earlier checkpoint"
            )
        probabilities = logits.softmax(dim=-1)
        scores, indices = probabilities.topk(top_k, dim=-1)
        for path, image_scores, image_indices in zip(readable, scores.tolist(), indices.tolist(), strict=True):
            yield {
                "image": str(path),
                "predictions": [
                    {"label": trained.class_names[index], "score": score}
                    for score, index in zip(image_scores, image_indices, strict=True)
                ],
            }


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="deit-predict", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a deit-train .ckpt or a deit-export directory")
    parser.add_argument("images", nargs="+", help="image files and/or folders")
    parser.add_argument("--top-k", type=at_least(1), default=5)
    parser.add_argument("--batch-size", type=at_least(1), default=32)
    parser.add_argument("--ema", action="store_true", help="use a checkpoint's EMA weights")
    args = parser.parse_args(argv)
    failed = 0
    with error_boundary("deit-predict"):
        existing_model(args.model)
        paths = image_paths(args.images)  # before the model is loaded: a missing image is said at once
        from deit_train.models.trained_model import load_trained_model

        trained = load_trained_model(args.model, ema=args.ema)
        for record in predict(trained, paths, args.top_k, args.batch_size):
            print(json.dumps(record), flush=True)
            if "error" in record:
                failed += 1
                print(f"deit-predict: {record['error']}", file=sys.stderr)
    sys.exit(3 if failed else 0)  # 3: some images could not be read (errors.py)


if __name__ == "__main__":
    main()
