"""The Lightning data module: datasets, DeiT transforms and loaders for any world size."""

import logging
from functools import cached_property

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from deit_train.cluster import data_worker_init
from deit_train.data.datasets import find_class_names, open_split
from deit_train.data.samplers import RepeatedAugmentationSampler, ShardedEvalSampler
from deit_train.data.transforms import eval_transform, train_transform
from deit_train.data.views import SeededViews
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

    def setup(self, stage: str | None = None) -> None:
        self.train_set, self.val_set = self.open_datasets()

    def open_datasets(self) -> tuple[Dataset, Dataset]:
        """(training set, validation set): labelled images with the train and eval transforms."""
        train = open_split(self.data, "train", train_transform(self.augment, self.img_size))
        val = open_split(self.data, "val", eval_transform(self.augment, self.img_size))
        return train, val

    def loader(self, dataset, train: bool) -> DataLoader:
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
        if self.trainer is not None:  # small data: log (and check for NaN) at least once an epoch
            self.trainer.log_every_n_steps = max(1, min(self.trainer.log_every_n_steps, len(loader)))
        return loader

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.val_set, train=False)
