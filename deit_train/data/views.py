"""Reproducible training views: every random choice of a training input derives from the run's seed and where the
input sits, never from worker or process state.

A sample's view (crop, flip, RandAugment, colour jitter, random erasing, a MIM mask) is drawn from the seed
(seed, epoch, sample index, repeat); a batch's Mixup/CutMix draw from (seed, epoch, batch index, rank). The order
of the samples comes from the sampler, seeded by (seed, epoch). So the same configuration yields bit-identical
batches whatever data.num_workers is. What a view does depend on: the seed, the data (its file list), the
augment config and image size, and, through the order and the split of each batch over ranks, the global batch
size and the world size. This is what lets the teacher cache (teacher.cache) serve the exact view the student sees.
"""

import random
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from deit_train.data.pixels import ErasableView, model_input

# Streams keep the seeds of batch-level draws (Mixup/CutMix) and of the model's own randomness (drop path, in
# tasks/module.py) apart from the sample-level ones.
MIXUP_STREAM = 1
MODEL_STREAM = 2


def view_seed(*keys: int) -> int:
    """A 32-bit seed from integer keys (NumPy's SeedSequence hashes them: nearby keys give unrelated streams)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's CPU generators (timm's and torchvision's transforms draw from all three)
    for the block, and restore their previous states after it, so the process's own streams are untouched."""
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)  # the CPU generator only: torch.manual_seed would reset CUDA's too
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


class TrainingViews(NamedTuple):
    """A training sample, as SeededViews (map-style data) or the shard stream (data/shards.py) yields it, and, once
    collated (torch's default_collate and pin_memory keep a NamedTuple's type, Lightning's copy too), a training
    batch. Validation batches are (images, labels) or, for task=mim, (images, masks) pairs."""

    images: torch.Tensor | ErasableView  # uint8 pixels, (C, H, W) or (N, C, H, W), with their erasing draw
    targets: torch.Tensor  # class labels; task=mim: the masks (mim/masking.py)
    view_keys: torch.Tensor  # view_key(): which view each image is, for the teacher cache; stays on the host


class SeededViews(Dataset):
    """Indexed by the sampler's (index, epoch, repeat) keys; returns the wrapped dataset's (image, target) drawn
    under that key's seed, as TrainingViews."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):  # samples, classes, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key: tuple[int, int, int] | int):
        # A plain index comes from a sampler Lightning put in place of ours (trainer.overfit_batches: a sequential
        # one): the same first view of each image every epoch, which is what overfitting a few batches asks for.
        index, epoch, repeat = (key, 0, 0) if isinstance(key, int) else key
        with seeded(view_seed(self.seed, epoch, index, repeat)):
            image, target = self.dataset[index]  # (image, label) or task=mim's (image, mask)
        return TrainingViews(image, target, view_key(index, repeat, image))


def view_key(sample_id: int, repeat: int, image: torch.Tensor | ErasableView) -> torch.Tensor:
    """[sample id, repeat, CRC-32 of the view's pixels and erasing draw]: which view this is and what it holds. The
    teacher cache serves a stored output only for a batch whose keys match (teacher/cache.py), so an image edited in
    place, a data root switched to other files of the same names, shards rewritten, or another erasing draw are taught
    anew, not from the old outputs. Computed in the worker on the finished uint8 view (data/pixels.py; about 0.05 ms
    for 3x224x224); the keys stay on the host. The erased rectangle's noise is a function of the draw's seed."""
    pixels, erase = (image.pixels, image.erase) if isinstance(image, ErasableView) else (image, None)
    checksum = zlib.crc32(pixels.detach().contiguous().numpy().data)
    if erase is not None:
        checksum = zlib.crc32(erase.to(torch.int64).contiguous().numpy().data, checksum)
    return torch.tensor([sample_id, repeat, checksum])


class ViewsOnDevice:
    """A LightningModule mixin, for every task: a batch's images arrive as uint8 pixels (data/pixels.py) and become
    the model's input on the device, after the copy (on_after_batch_transfer: float, ImageNet mean/std, random
    erasing's noise), before the training or validation step (and so before Mixup/CutMix and the teacher).

    What the device needs not read stays on the host: a training batch's view keys, where the teacher cache matches
    them (teacher/cache.py; moving them there made every cached step wait for a device-to-host copy to read them
    back), and the erasing draws, which index the rectangles. The pixels, targets and masks go to the device (a
    pinned loader's copy is non-blocking: Lightning's move_data_to_device)."""

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        if not isinstance(batch, TrainingViews):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        images = batch.images
        pixels = images.pixels if isinstance(images, ErasableView) else images
        pixels, targets = super().transfer_batch_to_device((pixels, batch.targets), device, dataloader_idx)
        images = ErasableView(pixels, images.erase) if isinstance(images, ErasableView) else pixels
        return TrainingViews(images, targets, batch.view_keys)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """The images (a batch's first part) as the networks read them, in the dtype the trainer's precision gives
        floats (bf16-true, 64-true: Lightning converts a float batch before the copy, a uint8 one it leaves)."""
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        if not isinstance(batch, list | tuple) or not batch:
            return batch
        images = batch[0]
        if isinstance(images, ErasableView) or (isinstance(images, torch.Tensor) and images.dtype == torch.uint8):
            images = model_input(images)
            trainer = getattr(self, "_trainer", None)
            if trainer is not None:
                images = trainer.precision_plugin.convert_input(images)
            batch = batch._replace(images=images) if isinstance(batch, TrainingViews) else (images, *batch[1:])
        return batch
