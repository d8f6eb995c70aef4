"""The Lightning data module: a data source's splits (data/sources/), DeiT's transforms and the loaders for any world
size. It asks the source everything about the data; what it adds is the trainer's side: the batch per device, the
epoch's step count, repeated augmentation, data.scan."""

import logging
import math
import shutil
from functools import cached_property
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from deit_train.cluster import usable_cpus
from deit_train.data.sources import DataSource, LoaderPlan, build_source
from deit_train.data.transforms import VIEW_DTYPE, eval_transform, train_transform
from deit_train.errors import DeitTrainError
from deit_train.schema import check_batch

log = logging.getLogger(__name__)

SHARED_MEMORY = "/dev/shm"  # where torch's workers put the batches they hand over (Linux)
# The training transforms decode what the source hands them: a decoded image as it is (timm's own steps), an
# undecoded one (data.decode=reduced) at the scale its crop allows (data/decode.py). Validation decodes every image
# whole, whatever data.decode says: metrics.json is then what deit-eval, an exported model's processor and the
# official evaluation compute on the saved weights.
DECODES = "reduced"
EVAL_DECODE = "exact"
PREFETCH_FACTOR = 2  # torch's DataLoader default: batches each worker prepares ahead


class DeiTDataModule(L.LightningDataModule):
    def __init__(self, source: DataSource | DictConfig, augment: DictConfig, img_size: int, seed: int = 0) -> None:
        super().__init__()
        self.source = source if isinstance(source, DataSource) else build_source(source)
        self.augment = augment
        self.img_size = img_size
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    @property
    def data(self) -> DataSource:  # the data config's keys (batch_size, num_workers, ...), as the source holds them
        return self.source

    @cached_property
    def class_names(self) -> list[str]:
        """Read from the data (folder names or the dataset's own list); this fixes the heads' size."""
        return self.source.labelled_classes()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def world(self) -> tuple[int, int]:
        """(world size, this rank)."""
        return (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)

    @property
    def per_device_batch_size(self) -> int:
        """data.batch_size is the global batch of one optimizer step; each device loads its share of each of
        the accumulated micro-batches."""
        world_size = self.trainer.world_size if self.trainer is not None else 1
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        # The schema checks this rule when the config names the devices; with devices=auto only the trainer knows.
        check_batch(
            self.data.batch_size, world_size, accumulate, mixes=self.augment.mixup > 0 or self.augment.cutmix > 0
        )
        return self.data.batch_size // (world_size * accumulate)

    def check_batch_fits(self, world_size: int, accumulate: int) -> None:
        """Before anything is written: the global batch splits over the devices the config names, and each device
        draws at least one full batch of training images per epoch (the source knows how many it holds)."""
        mixes = self.augment.mixup > 0 or self.augment.cutmix > 0
        check_batch(self.data.batch_size, world_size, accumulate, mixes=mixes)
        self.setup()
        per_device = self.data.batch_size // (world_size * accumulate)
        workers = self.data.num_workers if isinstance(self.data.num_workers, int) else 0
        if self.source.batches_per_rank(self.train_set, world_size, per_device, workers) == 0:
            sized = hasattr(self.train_set, "__len__")  # a stream of shards counts batches, not images
            raise self.too_few_images(per_device, math.ceil(len(self.train_set) / world_size) if sized else None)

    def too_few_images(self, per_device: int, per_epoch: int | None) -> DeitTrainError:
        drawn = f"only {per_epoch} training images" if per_epoch is not None else "fewer training images"
        return DeitTrainError(
            f"data.batch_size={self.data.batch_size} puts {per_device} images per device in a batch, but each "
            f"device draws {drawn} per epoch: not one full batch. Lower data.batch_size (it is the global batch)"
        )

    def steps_per_epoch(self) -> int:
        """Optimizer steps in an epoch of each device, counted without making the loader (tasks/module.py)."""
        trainer = self.trainer
        per_rank = self.source.batches_per_rank(
            self.train_set, trainer.world_size, self.per_device_batch_size, self.workers
        )
        batches = limited(per_rank, trainer.limit_train_batches)
        return max(1, math.ceil(batches / trainer.accumulate_grad_batches))

    @cached_property
    def workers(self) -> int:
        """data.num_workers, or for auto the CPUs this task may use (cluster.usable_cpus: its own under Slurm's
        binding, else the node's shared by its devices; physical cores), one left to the device's main process,
        and no more than shared memory can hold the batches of (check_shared_memory)."""
        if self.data.num_workers != "auto":
            return self.data.num_workers
        devices = self.trainer.num_devices if self.trainer is not None else 1
        cpus = usable_cpus(devices)
        wanted = max(0, cpus - 1)
        workers = min(wanted, self.workers_shared_memory_holds())
        log.info(
            "data.num_workers=auto: %d data-loader worker(s) for this device (%d CPU core(s) for it%s)",
            workers,
            cpus,
            f"; shared memory holds the batches of {workers}, not {wanted}" if workers < wanted else "",
        )
        return workers

    def shared_memory_bytes(self, workers: int) -> int:
        """What `workers` workers per loader keep in shared memory (/dev/shm): prefetch_factor (2) batches per
        worker and loader, the training and validation loaders, every device's loaders on this node together."""
        devices = self.trainer.num_devices if self.trainer is not None else 1
        view_bytes = 3 * self.img_size**2 * torch.empty(0, dtype=VIEW_DTYPE).element_size()  # one image as it leaves
        return devices * 2 * workers * PREFETCH_FACTOR * view_bytes * self.per_device_batch_size

    def workers_shared_memory_holds(self) -> int:
        if not Path(SHARED_MEMORY).is_dir():
            return 2**31
        return int(shutil.disk_usage(SHARED_MEMORY).free // max(1, self.shared_memory_bytes(1)))

    def check_shared_memory(self) -> None:
        """A container's default 64 MB of /dev/shm ends a run with many workers with a bus error mid-epoch: checked
        before the first batch instead, naming what is needed (num_workers=auto chooses fewer by itself)."""
        if self.workers == 0 or not Path(SHARED_MEMORY).is_dir():
            return
        devices = self.trainer.num_devices if self.trainer is not None else 1
        needed = self.shared_memory_bytes(self.workers)
        batch_bytes = self.shared_memory_bytes(1) / (devices * 2 * PREFETCH_FACTOR)
        free = shutil.disk_usage(SHARED_MEMORY).free
        if needed > free:
            raise DeitTrainError(
                f"data.num_workers={self.workers} keep about {needed / 2**20:.0f} MB of batches in shared memory "
                f"({devices} device(s) x 2 loaders x {self.workers} workers x {PREFETCH_FACTOR} batches of "
                f"{batch_bytes / 2**20:.1f} MB), but {SHARED_MEMORY} has {free / 2**20:.0f} MB free: give the "
                f"container more (docker run --shm-size={math.ceil(needed * 1.5 / 2**30)}g, or --ipc=host), or "
                f"lower data.num_workers or data.batch_size"
            )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:  # once: the scan and the trainer both ask
            self.train_set, self.val_set = self.open_datasets()

    def identity(self) -> str:
        """The training data's identity for the teacher cache (the source says what it is)."""
        self.setup()
        return self.source.identity(self.train_set, self.workers)

    def scan(self) -> None:
        """data.scan: open every image of both splits before training, and report the unreadable ones together
        instead of failing on the first of them mid-epoch."""
        if self.data.scan == "off":
            return
        self.setup()
        full = self.data.scan == "full"
        found = [self.source.unreadable(split, full) for split in self.splits]
        looked_at, problems = sum(count for count, _ in found), [problem for _, listed in found for problem in listed]
        if looked_at:
            log.info("checked %d images (data.scan=%s; data.scan=off skips this)", looked_at, self.data.scan)
        if not problems:
            return
        listed = "; ".join(f"{path} ({why})" for path, why in problems[:3])
        summary = f"{len(problems)} of {looked_at} images cannot be read: {listed}{' ...' * (len(problems) > 3)}"
        if self.data.skip_corrupt:
            log.warning("%s. data.skip_corrupt=true: each is replaced by the next readable image", summary)
            return
        raise DeitTrainError(
            f"{summary}. Remove or replace them, or set data.skip_corrupt=true to train without "
            f"them (data.scan=off skips this check)"
        )

    def open_datasets(self) -> tuple[Dataset, Dataset]:
        """(training set, validation set) as the loaders serve them; the source's own splits stay in self.splits."""
        self.splits = self.open_splits()
        return self.splits

    def open_splits(self) -> tuple[Dataset, Dataset]:
        """The source's training and validation splits: labelled images with the train and eval transforms."""
        train = self.source.split("train", train_transform(self.augment, self.img_size, DECODES))
        val = self.source.split("val", eval_transform(self.augment, self.img_size, EVAL_DECODE))
        return train, val

    def validation_sample(self, images: int, batch_size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Up to `images` validation images with the eval transform, as (images, labels) batches, for the checks
        before training (labels.py), chosen by the source (a seeded random subset, or a stream's first images)."""
        self.setup()
        batches, seen = [], 0
        for batch in self.source.first_batches(self.splits[1], images, batch_size, self.seed):
            batches.append(batch[:2])
            seen += len(batch[1])
            if seen >= images:
                break
        return batches

    def loader(self, dataset: Dataset, train: bool) -> DataLoader:
        world_size, rank = self.world
        trainer = self.trainer
        plan = LoaderPlan(
            train=train,
            world_size=world_size,
            rank=rank,
            batch_size=self.per_device_batch_size,
            workers=self.workers,
            seed=self.seed,
            repeats=self.repeats(world_size) if train else 1,
            epoch=lambda: trainer.fit_loop.epoch_progress.current.processed if trainer is not None else 0,
            pin_memory=self.data.pin_memory and torch.cuda.is_available(),  # pinning serves copies to a GPU
        )
        return self.source.loader(dataset, plan)

    def repeats(self, world_size: int) -> int:
        """augment.repeated_aug, with one process only if augment.repeated_aug_single_process (DeiT's code repeats
        only when distributed: one process would see a third of the distinct images per epoch, with x3)."""
        repeats = self.augment.repeated_aug
        if repeats > 1 and world_size == 1 and not self.augment.repeated_aug_single_process:
            log.info(
                "repeated augmentation (x%d) off with one process; augment.repeated_aug_single_process=true "
                "turns it on",
                repeats,
            )
            return 1
        return repeats

    def train_dataloader(self) -> DataLoader:
        self.check_shared_memory()
        loader = self.loader(self.train_set, train=True)
        if len(loader) == 0:  # devices=auto: only the trainer knew how many share the data
            raise self.too_few_images(loader.batch_size, len(loader.sampler))
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
