"""What a data source is: one object, chosen by conf/data/<name>.yaml's `_target_`, that answers everything the rest
of the code asks of the data. Its dataclass fields are its config (typed by Hydra as the config composes, each
`checked` rule applied by `check`); the fields here are every source's, a subclass adds its own.

The data module (data/datamodule.py), the teacher cache, masked image modeling and the console tools ask the
source; none of them asks which source it is. What a subclass provides:

    class_names()                the classes in label order, read from the data (this fixes the heads' size)
    split(split, transform)      "train" or "val" as a dataset of (transform(image), label)
    images_only(split, ...)      the same images without labels (task=mim)
    unreadable(dataset, full)    data.scan: (images looked at, [(where, problem)]) before training
    identity(dataset, workers)   what the teacher cache keys the training data by

and, where the source is not a map-style dataset (WebDataset shards stream), its own `loader`,
`batches_per_rank` and `first_batches`; for the console tools, which build a source from what the user typed
(locate.py), `evaluation` (deit-eval) and `stored_splits` (deit-shard). A new source is one file with a subclass
and one yaml; `register` gives the yaml its typed schema (tests/test_data_sources.py defines a CSV source inside a
test).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from omegaconf import DictConfig, OmegaConf

from deit_train.errors import DeitTrainError
from deit_train.schema import AutoOr, OneOf, Range, check_fields, checked, store_schema

if TYPE_CHECKING:
    from torch.utils.data import DataLoader, Dataset

# torch, the loaders and the datasets are imported where a split is opened or loaded: composing a config, and every
# refusal the config alone decides, imports no torch (the command line answers in a fraction of a second).


@dataclass
class LoaderPlan:
    """How one split is loaded on this rank: what the data module knows from the trainer and the config."""

    train: bool
    world_size: int
    rank: int
    batch_size: int  # per device and micro-batch
    workers: int
    seed: int
    repeats: int  # repeated augmentation (1: off), training only
    epoch: Callable[[], int]  # the epoch the loader is in (a resumed run's included)
    pin_memory: bool


@dataclass
class StoredSplit:
    """One split's images as stored, for deit-shard to copy: how many, and the i-th as (its bytes, its label)."""

    name: str
    size: int
    read: Callable[[int], tuple[bytes, int]]


@dataclass
class DataSource:
    # global, over all devices and accumulated micro-batches
    batch_size: int = checked(1024, Range(1, None, "a batch size >= 1"))
    # data-loader processes per device; auto: the CPUs this process may use, shared by the devices on its node
    num_workers: Any = checked("auto", AutoOr(Range(0, None, "a number of processes >= 0", integer=True)))
    pin_memory: bool = True
    skip_corrupt: bool = False  # true: replace a corrupt image by the next one, with a counted warning
    # before training, open every image file: header (fast: non-images, empty files, oversized images), full (decode
    # each: also truncated files), off (huge datasets you trust); problems are reported together
    scan: str = checked("header", OneOf("header", "full", "off"))
    # larger images are refused as corrupt (Pillow's decompression-bomb limit); null: no limit
    max_image_pixels: int | None = checked(89_478_485, Range(1, None, "a number of pixels >= 1, or null"))

    # The keys that say how the data is read, not what it is: a resumed run may change them (run_dir.check_resume);
    # a change to any other key of the source changes what is trained and is refused. A subclass adds its own.
    reading_keys: ClassVar[tuple[str, ...]] = ("num_workers", "pin_memory", "skip_corrupt", "scan", "max_image_pixels")

    def check(self) -> None:
        """Each field's rule; a subclass adds the rules of its own keys (a required path, ...). Raises
        DeitTrainError naming the key."""
        check_fields(OmegaConf.structured(self), type(self), "data")

    def class_names(self) -> list[str]:
        raise NotImplementedError

    def labelled_classes(self) -> list[str]:
        """class_names, for a task that learns them: at least two."""
        names = self.class_names()
        if len(names) < 2:
            raise DeitTrainError(f"the data has {len(names)} class(es); classification needs at least 2")
        return names

    def split(self, split: str, transform) -> Dataset:
        raise NotImplementedError

    def images_only(self, split: str, transform) -> Dataset:
        """The split's images without their labels (task=mim)."""
        from deit_train.data.wrappers import WithoutLabels

        return WithoutLabels(self.split(split, transform))

    def unreadable(self, dataset: Dataset, full: bool) -> tuple[int, list[tuple[str, str]]]:
        """data.scan of one split this source opened: (images looked at, [(where, problem)]). Default: nothing to
        look at (images in memory, or read as they stream)."""
        return 0, []

    def identity(self, dataset: Dataset, workers: int) -> str:
        """The training data's identity for the teacher cache (teacher/cache.py): what decides which images the
        views are drawn from, without reading every file (each view's pixels are checked per batch instead)."""
        raise NotImplementedError

    def skipping(self, dataset: Dataset) -> Dataset:
        """data.skip_corrupt for a map-style split: a corrupt image replaced by the next readable one."""
        from deit_train.data.wrappers import SkipCorrupt

        return SkipCorrupt(dataset) if self.skip_corrupt else dataset

    def evaluation(self, split: str, transform, class_names: list[str]) -> Dataset:
        """deit-eval: one split, labelled in the model's class order (`class_names`, matched by name)."""
        raise DeitTrainError(f"deit-eval does not read {type(self).__name__} data")

    def stored_splits(self) -> tuple[list[StoredSplit], list[str]]:
        """deit-shard: the training and validation images as stored, with their labels; and the class names."""
        raise DeitTrainError(f"deit-shard does not read {type(self).__name__} data")

    # Map-style loading: a source whose splits are indexable datasets keeps these.

    def batches_per_rank(self, dataset: Dataset, world_size: int, batch_size: int, workers: int) -> int:
        """Full training batches per rank and epoch, counted without making the loader (samplers.py)."""
        return math.ceil(len(dataset) / world_size) // batch_size

    def loader(self, dataset: Dataset, plan: LoaderPlan) -> DataLoader:
        import torch
        from torch.utils.data import DataLoader

        from deit_train.cluster import worker_options
        from deit_train.data.samplers import RepeatedAugmentationSampler, ShardedEvalSampler
        from deit_train.data.views import SeededViews

        sampler = None
        if plan.train:
            # Training views are reproducible (data/views.py): the sampler yields (index, epoch, repeat) keys, the
            # dataset draws each view under that key's seed. Repeated augmentation when plan.repeats > 1.
            sampler = RepeatedAugmentationSampler(
                dataset, repeats=plan.repeats, num_replicas=plan.world_size, rank=plan.rank, seed=plan.seed, keys=True
            )
            # The epoch the loader starts in, a resumed run's included: Lightning sets it only after it made the
            # first iterator, whose workers (num_workers > 0) fetch their first indices at once.
            sampler.set_epoch(plan.epoch())
            dataset = SeededViews(dataset, plan.seed)
        elif plan.world_size > 1:
            sampler = ShardedEvalSampler(dataset, plan.world_size, plan.rank)
        return DataLoader(
            dataset,
            batch_size=plan.batch_size,
            sampler=sampler,
            # Mixup/CutMix pair each image with its mirror in the batch: every batch must be full and even.
            drop_last=plan.train,
            num_workers=plan.workers,
            pin_memory=plan.pin_memory,
            persistent_workers=plan.workers > 0,
            # The loader's own seed draws (one per iterator; persistent workers make fewer) leave the process's
            # generator alone, so the student's randomness (drop path) does not depend on num_workers either.
            generator=torch.Generator().manual_seed(plan.seed),
            **worker_options(plan.workers),
        )

    def first_batches(self, dataset: Dataset, images: int, batch_size: int, seed: int) -> Iterable:
        """Batches of up to `images` images of a split, for the checks before training (labels.py): a seeded random
        subset, stratified where the split lists its labels (`targets`: torchvision's, Hugging Face's), covering
        every class evenly (a map-style set stores its images class by class)."""
        import torch
        from torch.utils.data import DataLoader, Subset

        from deit_train.labels import stratified_indices

        targets = getattr(dataset, "targets", None)
        if targets is not None and len(targets) == len(dataset):
            chosen = stratified_indices(targets, images, seed)
        else:
            chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:images].tolist()
        return DataLoader(Subset(dataset, chosen), batch_size=batch_size)


def register(name: str, source: type[DataSource]) -> None:
    """conf/data/<name>.yaml's schema, `<name>_schema`: the source's fields, typed, and its `_target_`."""
    store_schema("data", name, source)


def build_source(data: DictConfig) -> DataSource:
    """The source the `data` node names (its `_target_`), with its fields; checked."""
    from hydra.utils import get_class, instantiate

    try:
        target = get_class(data._target_)
    except Exception as error:  # a _target_ that does not import
        detail = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        raise DeitTrainError(f"data._target_={data._target_}: {detail}") from error
    if isinstance(target, type) and issubclass(target, DataSource):
        takes = [f.name for f in dataclasses.fields(target)]
        unknown = sorted(key for key in data if key != "_target_" and key not in takes)
        if unknown:  # added with +data.key=...: the source's constructor would refuse it with Hydra's wrapping
            raise DeitTrainError(
                f"data.{unknown[0]} is not a key of {target.__name__} (data._target_); it takes: {', '.join(takes)}"
            )
    source = instantiate(data, _convert_="all")
    if not isinstance(source, DataSource):
        raise DeitTrainError(
            f"data._target_={data._target_} is a {type(source).__name__}, not a data source "
            f"(deit_train/data/sources/base.py: DataSource)"
        )
    source.check()
    return source
