"""The streaming of data=webdataset's tar shards (the source and its keys: data/sources/webdataset.py, whose docstring
tells how an epoch's samples are dealt to ranks and workers): the shard list and its lengths, the stream of each
(rank, worker) slot, the stratified sample of validation shards, and the loader that gives the stream its epoch."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from deit_train.data.extras import require
from deit_train.data.images import READ_ERRORS, read_rgb, reason
from deit_train.data.views import TrainingViews, seeded, view_key, view_seed
from deit_train.errors import DataError, DeitTrainError
from deit_train.labels import stratified_indices

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "pgm")
INFO_FILE = "_info.json"
SHARD_STREAM, SAMPLE_STREAM = 3, 4  # keep the epoch's shard order and each slot's sample order apart


def wds():
    return require("webdataset", "webdataset", "data=webdataset")


def expand(urls: str) -> list[str]:
    return wds().shardlists.expand_urls(urls)


def open_url(url: str):
    """A shard as a binary stream: webdataset's openers (files, pipe:, http, gs, ...), else fsspec (s3:// ...)."""
    scheme = urlparse(url).scheme
    if scheme and scheme != "file" and scheme not in wds().gopen.gopen_schemes:
        return require("fsspec", "webdataset", f"the shard URL {url}").open(url, "rb").open()
    return wds().gopen(url)


def samples(urls: list[str]) -> Iterator[dict]:
    """The samples of these shards, in order: dicts of __key__, __url__ and one entry per file extension."""
    tariterators = wds().tariterators

    def stream(url: str):
        try:
            opened = open_url(url)
        except OSError as error:
            raise DeitTrainError(f"cannot open the shard {url}: {error}") from error
        yield {"url": url, "stream": opened}
        opened.close()

    for url in urls:  # a sample never spans two shards
        try:
            yield from tariterators.group_by_keys(tariterators.tar_file_expander(stream(url)))
        except tarfile.TarError as error:
            raise DataError(
                f"the shard {url} cannot be read as a tar file ({error}): truncated or not a shard; write it again"
            ) from error


def read_info(urls: list[str]) -> dict:
    """The _info.json beside the first shard ({} where there is none, or it cannot be reached)."""
    first = urls[0]
    if first.startswith("pipe:"):
        return {}
    location = first.rsplit("/", 1)[0] + "/" + INFO_FILE if "/" in first else INFO_FILE
    try:
        if not urlparse(location).scheme and not Path(location).exists():
            return {}
        with open_url(location) as file:
            return json.load(file)
    except (OSError, ValueError, DeitTrainError):
        return {}


def shard_lengths(info: dict) -> dict[str, int]:
    """{shard file name: samples} over every split of _info.json (timm's layout: splits.<name>.filenames and
    shard_lengths)."""
    lengths = {}
    for split in info.get("splits", {}).values():
        lengths.update(
            zip(map(os.path.basename, split.get("filenames", [])), split.get("shard_lengths", []), strict=False)
        )
    return lengths


class Shards:
    """One split's shards and transform, before the loader deals them to ranks and workers (ShardStream); what
    ShardSource.split read from its keys (num_samples: the training epoch's samples over all ranks)."""

    def __init__(
        self,
        pattern: str,
        urls: list[str],
        train: bool,
        transform,
        num_classes: int,
        num_samples: int | None,
        shuffle_buffer: int,
        max_pixels: int | None,
        skip_corrupt: bool,
    ) -> None:
        self.pattern, self.urls, self.train, self.transform = pattern, urls, train, transform
        self.num_classes, self.num_samples, self.shuffle_buffer = num_classes, num_samples, shuffle_buffer
        self.max_pixels, self.skip_corrupt = max_pixels, skip_corrupt

    def batches(self, world_size: int, batch_size: int, workers: int) -> int:
        """Full training batches per rank and epoch, a multiple of the workers where there are as many: every
        worker then yields as many, and reads no sample twice if its shards hold that many."""
        batches, workers = self.num_samples // world_size // batch_size, max(1, workers)
        return batches - batches % workers if batches >= workers else batches

    def stream(self, world_size: int, rank: int, batch_size: int, workers: int, seed: int, repeats: int):
        slots = world_size * max(1, workers)
        if self.train and len(self.urls) < slots:
            raise DeitTrainError(
                f"data.train={self.pattern} has {len(self.urls)} shard(s) for {world_size} device(s) x "
                f"{max(1, workers)} data-loader worker(s): each worker reads its own shards. Lower "
                f"data.num_workers or write more, smaller shards (deit-shard --shard-samples)"
            )
        if not self.train and len(self.urls) < world_size:
            raise DeitTrainError(
                f"data.val={self.pattern} has {len(self.urls)} shard(s) for {world_size} devices: each "
                f"device validates its own shards; write the split in more shards"
            )
        stream = ShardStream(self, world_size, rank, batch_size, max(1, workers), seed, repeats)
        if self.train and stream.batches == 0:
            raise DeitTrainError(
                f"data.batch_size puts {batch_size} images per device in a batch, but each device draws "
                f"only {self.num_samples // world_size} training samples per epoch: not one full batch. "
                f"Lower data.batch_size (it is the global batch)"
            )
        return stream


def key_hash(key: str) -> int:
    """A sample's __key__ as a 63-bit integer: its view seed and its place in the teacher cache's view keys."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


class ShardStream(IterableDataset):
    """The samples one rank reads from its shards in one epoch (module docstring); `epoch` is set by ShardLoader."""

    def __init__(
        self, shards: Shards, world_size: int, rank: int, batch_size: int, workers: int, seed: int, repeats: int
    ) -> None:
        self.shards, self.world_size, self.rank, self.workers = shards, world_size, rank, workers
        self.batch_size, self.seed, self.repeats = batch_size, seed, repeats
        # In shared memory: the loader's persistent workers hold copies of this stream, and read the epoch of each
        # pass from here when it starts.
        self.shared_epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.skipped = 0

    @property
    def epoch(self) -> int:
        return int(self.shared_epoch)

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        self.shared_epoch.fill_(epoch)

    @property
    def batches(self) -> int:
        return self.shards.batches(self.world_size, self.batch_size, self.workers)

    def __len__(self) -> int:
        if not self.shards.train:
            raise TypeError("a validation stream has no length: each rank reads its own shards in full")
        return self.batches * self.batch_size

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.training(worker, workers) if self.shards.train else self.validation(worker, workers)

    def validation(self, worker: int, workers: int) -> Iterator[tuple]:
        mine = self.shards.urls[self.rank :: self.world_size][worker::workers]
        for sample in samples(mine):
            decoded = self.decode(sample)
            if decoded is not None:
                yield self.shards.transform(decoded[0]), decoded[1]

    def training(self, worker: int, workers: int) -> Iterator[tuple]:
        urls = list(self.shards.urls)
        random.Random(view_seed(self.seed, self.epoch, SHARD_STREAM)).shuffle(urls)
        slot, slots = self.rank * workers + worker, self.world_size * workers
        mine = urls[slot::slots]
        rng = random.Random(view_seed(self.seed, self.epoch, slot, SAMPLE_STREAM))
        quota = len(range(worker, self.batches, workers)) * self.batch_size  # this worker's batches of the rank's

        def copies() -> Iterator[tuple[dict, int]]:
            """All of the slot's samples once (x repeats), then again, in another order, while short of its quota."""
            count = 0
            while count < quota:
                for sample in samples(rng.sample(mine, len(mine))):
                    for repeat in range(self.repeats):
                        count += 1
                        yield sample, repeat

        shuffled = wds().shuffle(bufsize=self.shards.shuffle_buffer, initial=self.shards.shuffle_buffer, rng=rng)
        produced = 0
        for sample, repeat in shuffled(copies()):
            if produced == quota:
                return
            key = key_hash(sample["__key__"])
            with seeded(view_seed(self.seed, self.epoch, key, repeat)):
                decoded = self.decode(sample)
                if decoded is None:
                    continue
                image = self.shards.transform(decoded[0])
            produced += 1
            yield TrainingViews(image, decoded[1], view_key(key, repeat, image))

    def decode(self, sample: dict):
        """(RGB image, label), or None for a corrupt image under data.skip_corrupt (with a counted warning)."""
        name = f"{sample.get('__url__')}:{sample['__key__']}"
        try:
            stored = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
            if stored is None or "cls" not in sample:
                raise ValueError(f"no image ({', '.join(IMAGE_KEYS)}) or no .cls label; it has {sorted(sample)}")
            label = int(sample["cls"])
            image = read_rgb(io.BytesIO(stored), self.shards.max_pixels)
        except READ_ERRORS as error:
            if not self.shards.skip_corrupt:
                raise DataError(
                    f"corrupt sample {name}: {reason(error)}. Rewrite the shard, or set "
                    f"data.skip_corrupt=true to skip such samples with a warning."
                ) from error
            self.skipped += 1
            warnings.warn(
                f"skipped the corrupt sample {name}: {reason(error)} ({self.skipped} skipped so far in this process)",
                stacklevel=2,
            )
            return None
        if not 0 <= label < self.shards.num_classes:
            raise DataError(
                f"sample {name} has label {label}, outside the {self.shards.num_classes} classes of the "
                f"shards' {INFO_FILE}: rewrite the shard, or correct {INFO_FILE}"
            )
        return image, label


class ShardSample(IterableDataset):
    """A stratified sample of validation shards without random access: the shards in a seeded order, each sample's
    .cls read without decoding its image, the first ceil(images / classes) of each class kept until every class has
    them or 8 x `images` samples were read (a bound on what is read); then labels.stratified_indices picks `images`
    of them, every class in turn, and only those are decoded."""

    def __init__(self, shards: Shards, images: int, seed: int) -> None:
        self.shards, self.images, self.seed = shards, images, seed

    def __iter__(self) -> Iterator[tuple]:
        urls = list(self.shards.urls)
        random.Random(self.seed).shuffle(urls)
        share, classes = -(-self.images // self.shards.num_classes), self.shards.num_classes
        kept: dict[int, list[dict]] = {}
        for read, sample in enumerate(samples(urls), start=1):
            try:
                label = int(sample.get("cls", b""))
            except ValueError:
                label = -1  # decode names the problem
            bucket = kept.setdefault(label, [])
            if len(bucket) < share:
                bucket.append(sample)
            full = len(kept) >= classes and all(len(bucket) >= share for bucket in kept.values())
            if full or read >= 8 * self.images:
                break
        found = [sample for bucket in kept.values() for sample in bucket]
        labels = [label for label, bucket in kept.items() for _ in bucket]
        decoder = ShardStream(self.shards, 1, 0, 1, 0, self.seed, 1)
        for index in stratified_indices(labels, self.images, self.seed):
            decoded = decoder.decode(found[index])
            if decoded is not None:
                yield self.shards.transform(decoded[0]), decoded[1]


class ShardLoader(DataLoader):
    """A DataLoader over a ShardStream that gives the stream its epoch as each pass starts (Lightning sets the
    epoch of samplers only). Its workers persist across epochs (no restart, no re-import per epoch) and read the
    new epoch from the stream's shared memory when the pass begins."""

    def __init__(self, stream: ShardStream, epoch: Callable[[], int], **kwargs) -> None:
        super().__init__(stream, persistent_workers=kwargs.get("num_workers", 0) > 0, **kwargs)
        self.current_epoch = epoch

    def __iter__(self) -> Iterator:
        return DeferredPass(self)


class DeferredPass:
    """One pass of a ShardLoader, begun at its first batch rather than when Lightning asks for the iterator: a
    resumed fit asks before it restores the checkpoint's epoch (estimated_stepping_batches sets up the data)."""

    def __init__(self, loader: ShardLoader) -> None:
        self.loader, self.iterator = loader, None

    def __iter__(self) -> DeferredPass:
        return self

    def __next__(self):
        if self.iterator is None:
            self.loader.dataset.epoch = self.loader.current_epoch()
            self.iterator = DataLoader.__iter__(self.loader)
        return next(self.iterator)
