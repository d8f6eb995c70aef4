"""Images cross from the loader workers to the device as uint8; the cheap per-pixel work runs on the device.

The workers end every transform with the view's pixels as a uint8 CHW tensor (a quarter of fp32's bytes through
shared memory and the host-to-device copy, as timm's PrefetchLoader), and, for training with random erasing, the
erasing's random draws as a few integers beside them (ErasableView). The device then makes the model's input
(model_input): float, ImageNet mean/std, and the erased rectangle filled with normal noise.

The draws are made in the worker under the view's seed (data/views.py) with the calls, in the order, of timm's
RandomErasing (mode pixel, one rectangle), so a view erases the rectangle the worker-side timm pipeline would erase.
The noise is timm's distribution (standard normal per pixel and channel, in normalised space) drawn from a
counter-based generator (data/noise.py) keyed by a seed drawn with the rectangle: a function of the view alone (not
of the batch, the worker, the order of the steps or the device: CPU and CUDA give the same bits), and made for the
whole batch in a fixed number of ops, however many images are erased (tests/test_pixels.py).
"""

import functools
import math
import random
from typing import NamedTuple

import torch

from deit_train.data import noise

# ImageNet's channel mean and std (timm's IMAGENET_DEFAULT_MEAN/STD): the student's, teacher's, MIM pictures' and
# exported preprocessors' normalisation. The one place they are written.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ERASE_FIELDS = 5  # top, left, height, width, noise seed; height 0: nothing erased


class ErasableView(NamedTuple):
    """A training view as the worker hands it over: uint8 pixels (C, H, W) and its erasing draw (ERASE_FIELDS
    int64). Collated, pinned and moved as a pair: (N, C, H, W) pixels and (N, ERASE_FIELDS) draws."""

    pixels: torch.Tensor
    erase: torch.Tensor


class DrawErasing:
    """The worker's share of random erasing: timm's RandomErasing(probability, mode='pixel', max_count=1) draws,
    with Python's `random` in the same calls and order (random_erasing.py: _erase), made into integers; the
    pixels are left alone. A noise seed is drawn after them (timm draws nothing more: the view's other draws are
    unchanged). min_area, max_area and the aspect range are timm's defaults."""

    def __init__(self, probability: float, min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3):
        self.probability = probability
        self.min_area, self.max_area = min_area, max_area
        self.log_aspect_ratio = (math.log(min_aspect), math.log(1 / min_aspect))

    def draw(self, height: int, width: int) -> list[int]:
        if random.random() > self.probability:
            return [0] * ERASE_FIELDS
        area = height * width
        for _attempt in range(10):
            target_area = random.uniform(self.min_area, self.max_area) * area  # / count, count = 1
            aspect_ratio = math.exp(random.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < width and h < height:
                top = random.randint(0, height - h)
                left = random.randint(0, width - w)
                return [top, left, h, w, random.getrandbits(63)]  # the noise's seed (data/noise.py: stream_keys)
        return [0] * ERASE_FIELDS

    def __call__(self, pixels: torch.Tensor) -> ErasableView:
        return ErasableView(pixels, torch.tensor(self.draw(*pixels.shape[-2:]), dtype=torch.int64))

    def __repr__(self) -> str:
        return f"DrawErasing(p={self.probability}, mode=pixel, count=1)"


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (N, C, H, W) on the device as fp32 with ImageNet's mean/std, computed as torchvision's ToTensor
    and Normalize compute it ((x / 255 - mean) / std, each rounded to fp32): the same floats as the worker-side
    transform gave, and as deit-eval's CPU transform gives (data/transforms.py: resize_crop_transform)."""
    mean, std = mean_std(pixels.device)
    return pixels.to(torch.float32).div_(full_scale(pixels.device)).sub_(mean).div_(std)


@functools.cache
def mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """IMAGENET_MEAN and IMAGENET_STD as fp32 (1, C, 1, 1) tensors on `device`, copied there once (as ordinary
    tensors, even when first asked for under inference_mode: a later caller may need them in autograd)."""
    with torch.inference_mode(False):
        column = lambda values: torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)  # noqa: E731
        return column(IMAGENET_MEAN), column(IMAGENET_STD)


@functools.cache
def full_scale(device: torch.device) -> torch.Tensor:
    """255 as a 0-dim fp32 tensor on `device`. Divided by a Python number, CUDA multiplies by its fp32 reciprocal,
    one bit off ToTensor's true division for about half the pixel values; by a device tensor it divides."""
    with torch.inference_mode(False):
        return torch.tensor(255.0, dtype=torch.float32, device=device)


def erase_(images: torch.Tensor, erase: torch.Tensor) -> torch.Tensor:
    """Fill each image's drawn rectangle (ErasableView.erase, (N, ERASE_FIELDS) on the host) with standard normal
    noise, per pixel and channel in timm's (C, h, w) order, element k of the rectangle being number k of the stream
    keyed by the draw's noise seed (data/noise.py). One batch-wide pass over the erased pixels only: a table of the
    erased images (a row each, built on the host, so the device is never asked for a count), then each erased
    element's image, position and noise, written with one index_put_."""
    images = images.contiguous()  # written through its flat view (a collated batch is contiguous already)
    erase = erase.to("cpu")
    index = (erase[:, 2] > 0).nonzero().squeeze(1)
    top, left, h, w, seed = erase[index].unbind(1)
    channels, height, width = images.shape[1:]
    area = h * w
    counts = area * channels  # the rectangles' elements; their noise comes in Box-Muller pairs
    pairs = (counts + 1) // 2
    total, total_pairs = int(counts.sum()), int(pairs.sum())
    if total == 0:
        return images
    keys = noise.stream_keys(seed)
    first = index * (channels * height * width) + top * width + left  # flat index of the rectangle's first pixel
    rows = (counts.cumsum(0) - counts, area, w, first, pairs.cumsum(0) - pairs, keys[:, 0], keys[:, 1], counts, pairs)
    table = torch.stack(rows)  # (9, erased images): each row contiguous
    if images.device.type == "cuda":
        table = table.pin_memory()  # a non-blocking copy from pageable memory may wait for the stream
    table = table.to(images.device, non_blocking=True)
    # the noise: each rectangle's pairs 0 .. pairs - 1 (output_size: no device sync)
    pair_owner = torch.repeat_interleave(table[8], output_size=total_pairs)
    pair_start, k0, k1 = table[4:7, pair_owner]
    pair = torch.arange(total_pairs, device=images.device) - pair_start
    values = noise.standard_normal_pairs(torch.stack([k0, k1], 1), pair).flatten()
    # where each element goes: element k of a rectangle, (c, y, x) row-major, takes its number k
    owner = torch.repeat_interleave(table[7], output_size=total)
    its_start, its_area, its_width, its_first, its_pairs = table[:5, owner]
    offset = torch.arange(total, device=images.device) - its_start
    channel, within = offset // its_area, offset % its_area
    row, column = within // its_width, within % its_width
    target = its_first + channel * (height * width) + row * width + column
    # index_put_, not put_: under trainer.deterministic CUDA refuses put_ and has a deterministic index_put_
    images.view(-1).index_put_((target,), values[its_pairs * 2 + offset].to(images.dtype))
    return images


def model_input(images) -> torch.Tensor:
    """What the networks read, from what the loader gives: an ErasableView batch is normalised and erased, uint8
    pixels normalised; float images (made elsewhere, already normalised) pass unchanged."""
    if isinstance(images, ErasableView):
        return erase_(normalize(images.pixels), images.erase)
    if isinstance(images, torch.Tensor) and images.dtype == torch.uint8:
        return normalize(images)
    return images
