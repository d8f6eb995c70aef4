"""The Lightning data module: datasets, DeiT transforms and loaders for any world size."""

import logging
import math
from functools import cached_property

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Subset

from deit_train.cluster import data_worker_init
from deit_train.data.datasets import find_class_names, open_split
from deit_train.data.images import unreadable
from deit_train.data.samplers import RepeatedAugmentationSampler, ShardedEvalSampler
from deit_train.data.transforms import eval_transform, train_transform
from deit_train.data.views import SeededViews
from deit_train.data.webdataset import ShardLoader, Shards
from deit_train.errors import DeitTrainError
from deit_train.schema import check_batch

log = logging.getLogger(__name__)


class DeiTDataModule(L.LightningDataModule):
    def __init__(self, data: DictConfig, augment: DictConfig, img_size: int, seed: int = 0) -> None:
        super().__init__()
        self.data = data
        self.augment = augment
        self.img_size = img_size
        self.seed = seed

    @cached_property
    def class_names(self) -> list[str]:
        """Read from the data (folder names or the dataset's own list); this fixes the heads' size."""
        names = find_class_names(self.data)
        if len(names) < 2:
            raise DeitTrainError(f"the data has {len(names)} class(es); classification needs at least 2")
        return names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def per_device_batch_size(self) -> int:
        """data.batch_size is the global batch of one optimizer step; each device loads its share of each of
        the accumulated micro-batches."""
        world_size = self.trainer.world_size if self.trainer is not None else 1
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        # The schema checks this rule when the config names the devices; with devices=auto only the trainer knows.
        check_batch(self.data.batch_size, world_size, accumulate, mixes=self.augment.mixup > 0 or self.augment.cutmix > 0)
        return self.data.batch_size // (world_size * accumulate)

    def steps_per_epoch(self) -> int:
        """Optimizer steps in an epoch of each device, counted without making the loader (tasks/module.py)."""
        trainer = self.trainer
        if isinstance(self.train_set, Shards):  # data=webdataset: the stream's own count (data/webdataset.py)
            per_rank = self.train_set.batches(trainer.world_size, self.per_device_batch_size, self.data.num_workers)
        else:
            per_rank = math.ceil(len(self.train_set) / trainer.world_size) // self.per_device_batch_size  # samplers.py
        batches = limited(per_rank, trainer.limit_train_batches)
        return max(1, math.ceil(batches / trainer.accumulate_grad_batches))

    def setup(self, stage: str | None = None) -> None:
        if not hasattr(self, "train_set"):  # once: the scan and the trainer both ask
            self.train_set, self.val_set = self.open_datasets()

    def scan(self) -> None:
        """data.scan: open every image file of both splits before training, and report the unreadable ones together
        instead of failing on the first of them mid-epoch."""
        if self.data.scan == "off":
            return
        self.setup()
        full, max_pixels = self.data.scan == "full", self.data.max_image_pixels
        paths = [path for dataset in (self.train_set, self.val_set) for path in image_paths(dataset)]
        stored = [inner(d) for d in (self.train_set, self.val_set) if hasattr(inner(d), "unreadable")]
        if stored:  # data=hf: the images inside the dataset's files
            paths = [f"{d.root}[{i}]" for d in stored for i in range(len(d))]  # counted in the summary
            log.info("checking %d images (data.scan=%s; data.scan=off skips this)", len(paths), self.data.scan)
            problems = [problem for d in stored for problem in d.unreadable(full, max_pixels)]
        elif not paths:  # CIFAR and other in-memory data; shards (read as they stream)
            return
        else:
            log.info("checking %d image files (data.scan=%s; data.scan=off skips this)", len(paths), self.data.scan)
            problems = unreadable(paths, full=full, max_pixels=max_pixels)
        if not problems:
            return
        listed = "; ".join(f"{path} ({why})" for path, why in problems[:3])
        summary = f"{len(problems)} of {len(paths)} image files cannot be read: {listed}{' ...' * (len(problems) > 3)}"
        if self.data.skip_corrupt:
            log.warning("%s. data.skip_corrupt=true: each is replaced by the next readable image", summary)
            return
        raise DeitTrainError(f"{summary}. Remove or replace them, or set data.skip_corrupt=true to train without "
                             f"them (data.scan=off skips this check)")  # fmt: skip

    def open_datasets(self) -> tuple[Dataset, Dataset]:
        """(training set, validation set): labelled images with the train and eval transforms."""
        train = open_split(self.data, "train", train_transform(self.augment, self.img_size))
        val = open_split(self.data, "val", eval_transform(self.augment, self.img_size))
        return train, val

    def validation_sample(self, images: int, batch_size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Up to `images` validation images with the eval transform, as (images, labels) batches, for the checks
        before training (labels.py): a seeded random subset of a map-style set (its images are stored class by
        class), the first images of streamed shards."""
        self.setup()
        dataset = self.val_set
        if isinstance(dataset, Shards):
            stream = dataset.stream(1, 0, batch_size, 0, self.seed, 1)
            loader = ShardLoader(stream, epoch=lambda: 0, batch_size=batch_size)
        else:
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed))
            loader = DataLoader(Subset(dataset, order[:images].tolist()), batch_size=batch_size)
        batches, seen = [], 0
        for batch in loader:
            batches.append(batch[:2])
            seen += len(batch[1])
            if seen >= images:
                break
        return batches

    def loader(self, dataset, train: bool) -> DataLoader:
        if isinstance(dataset, Shards):
            return self.shard_loader(dataset, train)
        workers = self.data.num_workers
        sampler = None
        if train:
            # Training views are reproducible (data/views.py): the sampler yields (index, epoch, repeat) keys, the
            # dataset draws each view under that key's seed. Repeated augmentation when augment.repeated_aug > 1.
            trainer = self.trainer
            world_size = trainer.world_size if trainer is not None else 1
            sampler = RepeatedAugmentationSampler(
                dataset,
                repeats=self.repeats(world_size),
                num_replicas=world_size,
                rank=trainer.global_rank if trainer is not None else 0,
                seed=self.seed,
                keys=True,
            )
            # The epoch the loader starts in, a resumed run's included: Lightning sets it only after it made the
            # first iterator, whose workers (num_workers > 0) fetch their first indices at once.
            sampler.set_epoch(trainer.fit_loop.epoch_progress.current.processed if trainer is not None else 0)
            dataset = SeededViews(dataset, self.seed)
        elif self.trainer is not None and self.trainer.world_size > 1:
            sampler = ShardedEvalSampler(dataset, self.trainer.world_size, self.trainer.global_rank)
        return DataLoader(
            dataset,
            batch_size=self.per_device_batch_size,
            sampler=sampler,
            # Mixup/CutMix pair each image with its mirror in the batch: every batch must be full and even.
            drop_last=train,
            num_workers=workers,
            pin_memory=self.data.pin_memory and torch.cuda.is_available(),  # pinning serves copies to a GPU
            persistent_workers=workers > 0,
            # The loader's own seed draws (one per iterator; persistent workers make fewer) leave the process's
            # generator alone, so the student's randomness (drop path) does not depend on num_workers either.
            generator=torch.Generator().manual_seed(self.seed),
            worker_init_fn=data_worker_init if workers > 0 else None,
        )

    def shard_loader(self, shards: Shards, train: bool) -> ShardLoader:
        """data=webdataset: the stream deals its shards to ranks and workers and seeds each view by the sample's key
        (data/webdataset.py); no sampler."""
        trainer, workers = self.trainer, self.data.num_workers
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        repeats = self.repeats(world_size) if train else 1
        stream = shards.stream(world_size, rank, self.per_device_batch_size, workers, self.seed, repeats)
        return ShardLoader(
            stream,
            epoch=lambda: trainer.current_epoch if trainer is not None else 0,
            batch_size=self.per_device_batch_size,
            drop_last=train,
            num_workers=workers,
            pin_memory=self.data.pin_memory and torch.cuda.is_available(),
            worker_init_fn=data_worker_init if workers > 0 else None,
            # As for map-style data: the workers' seed is drawn from here, not from the process's generator, which
            # the model's randomness follows (persistent workers draw it once, a resumed run's anew).
            generator=torch.Generator().manual_seed(self.seed),
        )

    def repeats(self, world_size: int) -> int:
        """augment.repeated_aug, with one process only if augment.repeated_aug_single_process (DeiT's code repeats
        only when distributed: one process would see a third of the distinct images per epoch, with x3)."""
        repeats = self.augment.repeated_aug
        if repeats > 1 and world_size == 1 and not self.augment.repeated_aug_single_process:
            log.info("repeated augmentation (x%d) off with one process; augment.repeated_aug_single_process=true "
                     "turns it on", repeats)  # fmt: skip
            return 1
        return repeats

    def train_dataloader(self) -> DataLoader:
        loader = self.loader(self.train_set, train=True)
        if len(loader) == 0:
            raise DeitTrainError(
                f"data.batch_size={self.data.batch_size} puts {loader.batch_size} images per device in a batch, but "
                f"each device draws only {len(loader.sampler)} training images per epoch: not one full batch. Lower "
                f"data.batch_size (it is the global batch)"
            )
        if self.trainer is not None:  # small data or limit_train_batches: log (and check for NaN) once an epoch
            batches = limited(len(loader), self.trainer.limit_train_batches)
            self.trainer.log_every_n_steps = max(1, min(self.trainer.log_every_n_steps, batches))
        return loader

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.val_set, train=False)


def limited(batches: int, limit: int | float | None) -> int:
    """The batches an epoch runs under Lightning's limit_train_batches (a count, or a fraction of the epoch)."""
    if limit is None:
        return batches
    return min(batches, int(limit)) if isinstance(limit, int) else max(1, int(batches * limit))


def inner(dataset: Dataset) -> Dataset:
    """The dataset inside the wrappers (SkipCorrupt)."""
    while hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return dataset


def image_paths(dataset: Dataset) -> list[str]:
    """The image files behind a dataset (through the wrappers: SkipCorrupt, MaskedImages), none for in-memory data."""
    while dataset is not None and not hasattr(dataset, "samples") and not hasattr(dataset, "files"):
        dataset = getattr(dataset, "dataset", None) or getattr(dataset, "images", None)
    if dataset is None:
        return []
    return [path for path, _ in dataset.samples] if hasattr(dataset, "samples") else [str(p) for p in dataset.files]
