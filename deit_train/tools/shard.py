"""`deit-shard SRC OUT`: an ImageFolder or a Hugging Face dataset written as WebDataset tar shards for data=webdataset.

SRC is a folder with train/ and val/ (the ImageNet layout), a local Hugging Face dataset (a save_to_disk folder or a
folder of Parquet files), or hf:NAME for a Hub dataset. OUT gets <split>-000000.tar, ... and _info.json with the
class names and each shard's length (timm's layout, so timm reads these shards too). A sample is <key>.<ext> with
the image's own bytes, unchanged, and <key>.cls with its label; the key is the split and the image's index in SRC.
The training split is written in an order shuffled by --seed (a reader's shuffle buffer then mixes classes from the
first batch); the validation split in SRC's order.

--resize N re-encodes every image whose short side is above N px at N px (bicubic, JPEG at --quality), as FFCV and
timm's published shards do: decoding the smaller JPEGs is what makes such shards fast to read; it changes the pixels
(docs/data.md measures by how much). After writing, the shards are read back with webdataset and every sample's
bytes and label compared with what was written (--no-verify skips this).
"""

import hashlib
import io
import json
import os
import random
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from deit_train.data.extras import require
from deit_train.data.images import READ_ERRORS, read_rgb, reason
from deit_train.data.sources.base import StoredSplit
from deit_train.data.sources.locate import in_the_tools_terms, locate
from deit_train.errors import DeitTrainError, error_boundary
from deit_train.tools.arguments import ArgumentParser, at_least, new_output_dir

FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif", "PPM": "ppm"}


def open_source(
    source: str, image_column: str | None = None, label_column: str | None = None
) -> tuple[list[StoredSplit], list[str]]:
    """SRC's splits as stored and its class names: the source `deit-train` would read SRC with
    (data/sources/locate.py), asked for them."""
    with in_the_tools_terms("SRC "):
        located = locate(source, image_column=image_column, label_column=label_column)
        if located is None:
            raise DeitTrainError(
                f"SRC {source}: expected a folder with train/ and val/ (one sub-folder per class), a local "
                f"Hugging Face dataset (save_to_disk or Parquet files), or hf:NAME"
            )
        return located.stored_splits()


def encode(data: bytes, resize: int | None, quality: int, where: str) -> tuple[bytes, str]:
    """(bytes, extension) to store: the image as it is, or re-encoded at short side `resize` if it is larger."""
    try:
        with Image.open(io.BytesIO(data)) as header:
            kind, short_side = header.format, min(header.size)
        if resize is None or short_side <= resize:
            return data, FORMAT_EXTENSIONS.get(kind, (kind or "img").lower())
        image = read_rgb(io.BytesIO(data), max_pixels=None)
    except READ_ERRORS as error:
        raise DeitTrainError(f"{where}: {reason(error)}; remove or replace the image") from error
    scale = resize / min(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    out = io.BytesIO()
    image.resize(size, Image.BICUBIC).save(out, "JPEG", quality=quality)
    return out.getvalue(), "jpg"


def encoded(split: StoredSplit, order: list[int], resize: int | None, quality: int, workers: int) -> Iterator[tuple]:
    """(index, bytes, extension, label) in `order`; re-encoding runs on `workers` processes."""

    def job(i: int):
        data, label = split.read(i)
        return i, data, label

    if resize is None or workers <= 1:
        for i in order:
            _, data, label = job(i)
            yield (i, *encode(data, resize, quality, f"{split.name}[{i}]"), label)
        return
    with ProcessPoolExecutor(workers) as pool:
        chunk = 64
        for start in range(0, len(order), chunk):
            batch = [job(i) for i in order[start : start + chunk]]
            results = pool.map(
                encode,
                [d for _, d, _ in batch],
                [resize] * len(batch),
                [quality] * len(batch),
                [f"{split.name}[{i}]" for i, _, _ in batch],
            )
            for (i, _, label), (data, ext) in zip(batch, results, strict=True):
                yield i, data, ext, label


def write_split(split: StoredSplit, out: Path, args, progress: Progress) -> dict:
    """Write one split's shards; returns its _info.json entry and {key: (sha256, label)} for the check."""
    wds = require("webdataset", "webdataset", "deit-shard")
    order = list(range(split.size))
    if split.name == "train":
        random.Random(args.seed).shuffle(order)
    lengths: dict[str, int] = {}
    written: dict[str, tuple[str, int]] = {}
    task = progress.add_task(f"{split.name}", total=split.size)
    pattern = str(out / f"{split.name}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=args.shard_samples, maxsize=args.shard_mb * 1e6, verbose=0) as writer:
        for index, data, ext, label in encoded(split, order, args.resize, args.quality, args.workers):
            key = f"{split.name}-{index:08d}"
            writer.write({"__key__": key, ext: data, "cls": str(label).encode()})
            name = os.path.basename(writer.fname)
            lengths[name] = lengths.get(name, 0) + 1
            written[key] = (hashlib.sha256(data).hexdigest(), label)
            progress.advance(task)
    files = sorted(lengths)
    info = {
        "name": split.name,
        "num_samples": split.size,
        "filenames": files,
        "shard_lengths": [lengths[f] for f in files],
    }
    return {"info": info, "written": written}


def verify(out: Path, info: dict, written: dict[str, tuple[str, int]]) -> None:
    """Read the shards back with webdataset itself: the same keys, bytes and labels as written, each once."""
    wds = require("webdataset", "webdataset", "deit-shard")
    urls = [str(out / name) for name in info["filenames"]]
    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        key = sample["__key__"]
        image = next((v for k, v in sample.items() if not k.startswith("__") and k != "cls"), None)
        expected = written.get(key)
        found = (hashlib.sha256(image).hexdigest() if image is not None else None, int(sample.get("cls", b"-1")))
        if expected != found:
            raise DeitTrainError(
                f"{out}: the shards do not read back as written at sample {key} (a full disk or a "
                f"concurrent writer?); write them again"
            )
        seen += 1
    if seen != len(written):
        raise DeitTrainError(f"{out}: {seen} samples read back of {len(written)} written; write the shards again")


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="deit-shard", description=__doc__.splitlines()[0])
    parser.add_argument("source", metavar="SRC", help="a folder with train/ and val/, a local HF dataset, or hf:NAME")
    parser.add_argument("out", metavar="OUT", type=Path, help="a new or empty folder for the shards")
    parser.add_argument("--shard-samples", type=at_least(1), default=10_000, help="samples per shard at most")
    parser.add_argument("--shard-mb", type=at_least(1), default=1000, help="megabytes per shard at most")
    parser.add_argument("--resize", type=at_least(1), help="re-encode images with a larger short side at this size")
    parser.add_argument("--quality", type=at_least(1), default=90, help="JPEG quality of re-encoded images")
    parser.add_argument("--seed", type=int, default=0, help="the training split's order in the shards")
    parser.add_argument("--workers", type=at_least(1), default=os.cpu_count() or 1, help="re-encoding processes")
    parser.add_argument("--image-column", help="a Hugging Face SRC's image column (default: its first Image feature)")
    parser.add_argument(
        "--label-column",
        help="a Hugging Face SRC's label column, a ClassLabel or integers (default: its first ClassLabel feature)",
    )
    parser.add_argument("--no-verify", action="store_true", help="skip reading the shards back")
    args = parser.parse_args(argv)
    with error_boundary("deit-shard"):
        if args.quality > 100:
            raise DeitTrainError(f"--quality {args.quality}: expected a JPEG quality in 1..100")
        new_output_dir(args.out, "OUT")
        splits, classes = open_source(args.source, args.image_column, args.label_column)
        args.out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        results = {}
        columns = (TextColumn("{task.description:>6}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns) as progress:
            for split in splits:
                results[split.name] = write_split(split, args.out, args, progress)
        seconds = time.perf_counter() - start
        if not args.no_verify:
            for result in results.values():
                verify(args.out, result["info"], result["written"])
        info = {
            "name": str(args.source),
            "classes": classes,
            "splits": {name: result["info"] for name, result in results.items()},
            "written_by": {"resize": args.resize, "quality": args.quality if args.resize else None, "seed": args.seed},
        }
        (args.out / "_info.json").write_text(json.dumps(info, indent=2) + "\n")
        for name, result in results.items():
            count = len(result["info"]["filenames"])
            pattern = f"{args.out}/{name}-{{000000..{count - 1:06d}}}.tar"  # quoted for the shell, then for Hydra
            print(f"""{name}: {result["info"]["num_samples"]} samples in {count} shards: 'data.{name}="{pattern}"'""")
        checked = "" if args.no_verify else ", read back and checked"
        print(f"written in {seconds:.1f} s{checked}")


if __name__ == "__main__":
    main()
