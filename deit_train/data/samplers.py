"""Repeated augmentation (Hoffer et al. 2020; DeiT section 6 and its RASampler).

Each epoch draws len(dataset) samples in total over all ranks: ceil(len / repeats) distinct images, each `repeats`
times. The copies of one image sit in consecutive positions of the global order, which is dealt to the ranks
round-robin, so with several ranks each copy lands on a different rank and gets its own augmentation; with one
process the copies share a batch (batch augmentation). Unlike the official sampler there is no rounding down to a
multiple of 256, so small datasets still yield batches, and it works without a distributed group too.
"""

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler


class RepeatedAugmentationSampler(DistributedSampler):
    """A DistributedSampler (so that Lightning keeps it rather than wrapping it in its own), with rank and world
    size given explicitly so that it also serves a single process. set_epoch is the parent's."""

    def __init__(
        self,
        dataset: Dataset,
        repeats: int = 3,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        keys: bool = False,
    ) -> None:
        """keys=True yields (index, epoch, repeat) view keys for SeededViews instead of bare indices."""
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.dataset_size = len(dataset)
        self.repeats = repeats
        self.samples_per_rank = math.ceil(self.dataset_size / num_replicas)
        self.keys = keys

    def global_order(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The order of all ranks together, before dealing: each image `repeats` times in a row; and each
        position's repeat number (which copy of its image it is)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            images = torch.randperm(self.dataset_size, generator=generator)
        else:
            images = torch.arange(self.dataset_size)
        order = images.repeat_interleave(self.repeats)
        copies = torch.arange(self.repeats).repeat(self.dataset_size)
        total = self.samples_per_rank * self.num_replicas
        if total > len(order):  # tiny datasets with repeats=1: wrap around so every rank gets as many
            extra = total - len(order)
            order = torch.cat([order, order[:extra]])
            copies = torch.cat([copies, copies[:extra] + self.repeats])  # a further copy: its own view
        return order[:total], copies[:total]

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int, int]]:
        order, copies = self.global_order()
        indices = order[self.rank :: self.num_replicas].tolist()
        if not self.keys:
            return iter(indices)
        repeats = copies[self.rank :: self.num_replicas].tolist()
        return iter([(index, self.epoch, repeat) for index, repeat in zip(indices, repeats, strict=True)])

    def __len__(self) -> int:
        return self.samples_per_rank


class ShardedEvalSampler(DistributedSampler):
    """Validation under DDP with every image counted exactly once: rank r takes images r, r + world, ...
    (Lightning's DistributedSampler pads the set to a multiple of the world size, counting a few twice). Ranks
    may then see one batch more or less, which evaluation allows: nothing is all-reduced per step."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))
