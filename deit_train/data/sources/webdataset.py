"""data=webdataset (ShardSource): WebDataset tar shards, streamed (an IterableDataset), with the reproducibility of
map-style data.

Shards: data.train / data.val, a brace pattern (/data/train-{000000..000127}.tar), several joined by `::`, or
`pipe:` and fsspec URLs (s3://...; fsspec and its s3fs installed), opened as webdataset opens them. A sample is
`<key>.<image ext>` and `<key>.cls` (the label as text), as timm and deit-shard write them. The `_info.json` beside
the shards (deit-shard's, or timm's layout) gives the class names ("classes") and each shard's length.

Training: an epoch is data.train_samples (else the shard lengths in _info.json) samples over all ranks, the same
count on each: floor(samples / world size), cut to whole batches, as many for each worker. The shards are shuffled
by (seed, epoch) and dealt to the (rank, worker) slots, shard i to slot i mod slots; each slot reads its shards
(again, reshuffled, if its quota is not yet met), shuffles them through a buffer of data.shuffle_buffer samples
seeded by (seed, epoch, slot), and yields its share of the rank's batches. A view is drawn under the seed (seed,
epoch, hash of the sample's __key__, repeat), so a sample's augmentation does not depend on where it is read; which
samples share a batch depends on the world size and data.num_workers (each worker reads its own shards). Repeated
augmentation: each sample read counts `repeats` times, every copy with its own view, through the same shuffle buffer
on the same rank. Validation: shard i goes to rank i mod world size and to that rank's worker (i div world size) mod
workers, read once in full: every sample counted exactly once.

The streaming itself (Shards, the stream, the loader) is data/shards.py, imported where a split is opened: composing
a config imports no torch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from deit_train.data.sources.base import DataSource, LoaderPlan
from deit_train.errors import DeitTrainError
from deit_train.labels import check_same_classes
from deit_train.schema import Range, checked

if TYPE_CHECKING:
    from deit_train.data.shards import ShardLoader, Shards

log = logging.getLogger(__name__)


@dataclass
class ShardSource(DataSource):
    # tar shards: a brace pattern (/data/train-{000000..000127}.tar), several joined by ::, pipe: or fsspec URLs
    train: str | None = None
    val: str | None = None
    # the samples in an epoch over all devices; null: from the _info.json beside the shards
    train_samples: int | None = checked(None, Range(1, None, "a number of samples >= 1, or null (_info.json)"))
    shuffle_buffer: int = checked(4096, Range(1, None, "a number of samples >= 1"))  # per worker

    # None of its own: data.train and data.val name the shards an epoch deals to the (rank, worker) slots, and
    # train_samples and shuffle_buffer decide the epoch's samples and their order, so each changes what is trained
    # (a pattern cannot tell shards moved from other shards). num_workers stays a reading key, though it decides
    # which samples share a batch (as trainer.devices does for any data): fewer workers is the fix the stream's
    # refusal names.
    reading_keys = DataSource.reading_keys

    def check(self) -> None:
        super().check()
        if not (self.train and self.val):
            raise DeitTrainError(
                "data=webdataset needs data.train=SHARDS and data.val=SHARDS, e.g. "
                "data.train=/data/train-{000000..000127}.tar (deit-shard writes them)"
            )

    def class_names(self) -> list[str]:
        """_info.json's "classes" (deit-shard writes them), else "0".."num_classes-1"."""
        from deit_train.data.shards import INFO_FILE, expand, read_info

        info = read_info(expand(self.train))
        if "classes" in info:
            return [str(name) for name in info["classes"]]
        if "num_classes" in info:
            return [str(i) for i in range(int(info["num_classes"]))]
        raise DeitTrainError(
            f'data.train={self.train}: no {INFO_FILE} with "classes" (or "num_classes") beside the '
            f'shards; write one there, e.g. {{"classes": ["cat", "dog"]}} (deit-shard writes it)'
        )

    def split(self, split: str, transform) -> Shards:
        """The split's shards, checked (each local one a file; validation shards apart from the training shards and
        labelled alike), with the training epoch's sample count. Streamed: the loader deals them to ranks and
        workers."""
        from deit_train.data.shards import Shards

        pattern = self.train if split == "train" else self.val
        urls = self.shard_urls(split, pattern)
        classes = self.class_names()
        if split != "train":
            self.check_validation(urls, classes)
        samples = self.epoch_samples(urls) if split == "train" else None
        return Shards(
            pattern,
            urls,
            split == "train",
            transform,
            len(classes),
            samples,
            self.shuffle_buffer,
            self.max_image_pixels,
            self.skip_corrupt,
        )

    def shard_urls(self, split: str, pattern: str) -> list[str]:
        """The pattern's shards; a local file that is not there is named, rather than counted as samples that
        will not come."""
        from deit_train.data.shards import expand

        urls = expand(pattern)
        missing = [
            url
            for url, parsed in ((url, urlparse(url)) for url in urls)
            if parsed.scheme in ("", "file") and not os.path.isfile(parsed.path if parsed.scheme else url)
        ]
        if missing:
            raise DeitTrainError(
                f"data.{split}={pattern}: {len(missing)} of its {len(urls)} shards are not "
                f"files ({', '.join(missing[:3])}); correct the pattern or write them"
            )
        return urls

    def epoch_samples(self, urls: list[str]) -> int:
        """data.train_samples, else the training shards' lengths in their _info.json."""
        if self.train_samples is not None:
            return self.train_samples
        from deit_train.data.shards import INFO_FILE, read_info, shard_lengths

        lengths = shard_lengths(read_info(urls))
        names = [os.path.basename(url) for url in urls]
        if not all(name in lengths for name in names):
            raise DeitTrainError(
                f"data.train={self.train}: the number of training samples is unknown (no "
                f"{INFO_FILE} with these shards' lengths beside them); set data.train_samples=N"
            )
        return sum(lengths[name] for name in names)

    def check_validation(self, urls: list[str], classes: list[str]) -> None:
        """The validation shards are not the training shards, and label their samples as the training shards do:
        their own _info.json (a split written apart), where it is another file, lists the same classes in the same
        order."""
        from deit_train.data.shards import INFO_FILE, expand, read_info

        training = expand(self.train)
        shared = sorted(set(urls) & set(training))
        if shared and len(shared) == len(urls):
            raise DeitTrainError(
                f"data.val={self.val} names the training shards (all {len(urls)} of its shards are in "
                f"data.train): val/acc1 would score images the student trained on. Point data.val at "
                f"the validation shards (deit-shard writes val-*.tar beside train-*.tar)"
            )
        if shared:
            log.warning(
                "data.val=%s: %d of its %d shards are also training shards (%s): val/acc1 scores images the "
                "student trains on",
                self.val,
                len(shared),
                len(urls),
                shared[0],
            )
        folder = lambda first: first.rsplit("/", 1)[0] if "/" in first else "."  # noqa: E731
        if folder(urls[0]) == folder(training[0]):
            return
        info = read_info(urls)
        if "classes" in info:
            check_same_classes(
                [str(name) for name in info["classes"]],
                classes,
                f"data.val={self.val}",
                f"its {INFO_FILE}",
                f"the training shards' {INFO_FILE}",
                "Its labels would be read as "
                "other classes: write both splits with one deit-shard run, or relabel the validation "
                "shards in the training shards' order",
            )

    def images_only(self, split: str, transform):
        raise DeitTrainError(
            "task=mim reads map-style images (data=imagefolder, data=hf, data=cifar10/100); shards "
            "stream: unpack them into a folder, or use the images they were written from"
        )

    def identity(self, shards: Shards, workers: int) -> str:
        """The shards (with their sizes where local), the epoch's sample count and the number of workers (which
        decides the batches)."""
        parts = [f"webdataset\t{shards.num_samples}\t{max(1, workers)}"]
        for url in shards.urls:
            size = os.path.getsize(url) if not urlparse(url).scheme and os.path.exists(url) else ""
            parts.append(f"{url}\t{size}")
        return "\n".join(parts)

    def batches_per_rank(self, shards: Shards, world_size: int, batch_size: int, workers: int) -> int:
        return shards.batches(world_size, batch_size, workers)

    def loader(self, shards: Shards, plan: LoaderPlan) -> ShardLoader:
        """The stream deals its shards to ranks and workers and seeds each view by the sample's key; no sampler."""
        import torch

        from deit_train.cluster import worker_options
        from deit_train.data.shards import ShardLoader

        stream = shards.stream(
            plan.world_size, plan.rank, plan.batch_size, plan.workers, plan.seed, plan.repeats if plan.train else 1
        )
        return ShardLoader(
            stream,
            epoch=plan.epoch,
            batch_size=plan.batch_size,
            drop_last=plan.train,
            num_workers=plan.workers,
            pin_memory=plan.pin_memory,
            **worker_options(plan.workers),
            # As for map-style data: the workers' seed is drawn from here, not from the process's generator, which
            # the model's randomness follows (persistent workers draw it once, a resumed run's anew).
            generator=torch.Generator().manual_seed(plan.seed),
        )

    def first_batches(self, shards: Shards, images: int, batch_size: int, seed: int):
        """Up to `images` validation samples for the checks before training (labels.py), stratified by their labels
        (ShardSample): shards are often written class by class, and the stream's first images are a few classes."""
        from torch.utils.data import DataLoader

        from deit_train.data.shards import ShardSample

        return DataLoader(ShardSample(shards, images, seed), batch_size=batch_size)
