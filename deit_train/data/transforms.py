"""DeiT's train and eval transforms, built from timm's transform factory and augmentations. Each takes a decoded
PIL image or an EncodedImage (data/images.py: open_image), which its first step decodes as `decode` says
(data/decode.py: exact, or a large JPEG at a reduced scale). Training's transforms stop at uint8 pixels (with random
erasing's draws); the device makes the floats (data/pixels.py)."""

import math

import torch
from omegaconf import DictConfig
from PIL import Image
from timm.data import create_transform
from timm.data.transforms import MaybePILToTensor, RandomResizedCropAndInterpolation
from torchvision import transforms as T

from deit_train.data.decode import RandomResizedCrop, ResizeShortSide, check_decode
from deit_train.data.pixels import IMAGENET_MEAN, IMAGENET_STD, DrawErasing

VIEW_DTYPE = torch.uint8  # what a view is when a worker hands it over (data/pixels.py)


def eval_transform(augment: DictConfig, img_size: int, decode: str = "exact"):
    """The official DeiT eval transform: resize the short side to floor(img_size / crop_pct) (bicubic), center
    crop img_size, ImageNet mean/std. crop_pct is set explicitly (0.875 in DeiT; timm's model default is 0.9
    and is not inherited). The workers stop at uint8 pixels; the device normalises them (data/pixels.py)."""
    return resize_crop_transform(eval_resize_size(img_size, augment.eval_crop_pct), img_size, decode, uint8_tail())


def eval_resize_size(img_size: int, crop_pct: float) -> int:
    return math.floor(img_size / crop_pct)  # as timm's transforms_imagenet_eval


def resize_crop_transform(resize_size: int, crop_size: int, decode: str = "exact", tail: list | None = None):
    """Resize the short side (bicubic), center crop, then `tail` (default: float_tail, normalised floats, what
    deit-eval and deit-predict read on the CPU). The crop sits at floor((side - crop) / 2), as in transformers'
    image processors, so that a deit-export preprocessor reproduces it exactly; torchvision's CenterCrop rounds
    instead, which puts the window one pixel further right/down on about one image shape in four."""
    return T.Compose(
        [
            ResizeShortSide(resize_size, decode),  # torchvision's bicubic Resize, which also decodes
            CenterCrop(crop_size),
            *(float_tail() if tail is None else tail),
        ]
    )


# The ends of the transforms. Training's loaders stop at uint8 pixels (with random erasing's draws) and the device
# makes the floats (data/pixels.py: model_input); tools outside Lightning make them on the CPU.
def float_tail() -> list:
    """Normalised fp32 CHW: what model_input makes on the device from uint8_tail's pixels, computed the same way."""
    return [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def uint8_tail(reprob: float = 0.0) -> list:
    """uint8 CHW pixels; with reprob > 0, random erasing's draws beside them (an ErasableView)."""
    return [MaybePILToTensor(), DrawErasing(reprob)] if reprob > 0 else [MaybePILToTensor()]


class CenterCrop(torch.nn.Module):
    """A square center crop at floor offsets (see eval_transform). Images smaller than the crop are an error
    of the resize before it, never padded."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        left, top = (width - self.size) // 2, (height - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))

    def __repr__(self) -> str:
        return f"CenterCrop(size={self.size}, offsets=floor)"


def train_transform(augment: DictConfig, img_size: int, decode: str = "exact"):
    """augment.crop chooses the geometry: random_resized (DeiT Table 9; DeiT III on ImageNet-21k), simple_random
    (DeiT III's SRC) or center (no augmentation: the eval transform). Then, whatever the crop, timm's own later
    stages: its auto-augment policy chosen by prefix as timm chooses it (rand-*: RandAugment, DeiT's; augmix-*;
    anything else, e.g. '3a' for DeiT III's 3-Augment) and colour jitter (off beside a policy other than '3a', as
    in timm), then random erasing. The workers stop at uint8 pixels and erasing's draws (uint8_tail); the device
    normalises and erases (data/pixels.py)."""
    check_decode(decode)
    if augment.crop == "center":
        return eval_transform(augment, img_size, decode)
    if augment.crop not in ("random_resized", "simple_random"):
        raise ValueError(f"augment.crop must be random_resized, simple_random or center, got {augment.crop!r}")
    crop, policy_and_jitter, _to_uint8 = create_transform(
        img_size,
        is_training=True,
        scale=tuple(augment.scale),
        auto_augment=augment.auto_augment,
        color_jitter=augment.color_jitter,
        interpolation=augment.train_interpolation,
        mean=IMAGENET_MEAN,  # the policies' fill colour
        std=IMAGENET_STD,
        use_prefetcher=True,  # ends at uint8 pixels: no ToTensor, Normalize, RandomErasing
        separate=True,
    )
    if augment.crop == "random_resized":
        crop = with_decoding_crop(crop, decode)
    else:  # Simple random crop (DeiT III, section 3.2): resize the short side, random crop with 4 px reflect padding
        crop = T.Compose(
            [
                ResizeShortSide(img_size, decode),  # torchvision's bicubic Resize, which also decodes
                T.RandomCrop(img_size, padding=4, padding_mode="reflect"),
                T.RandomHorizontalFlip(),
            ]
        )
    return T.Compose([crop, policy_and_jitter, *uint8_tail(augment.reprob)])


def with_decoding_crop(transform: T.Compose, decode: str) -> T.Compose:
    """timm's train transform with its first step, the RandomResizedCropAndInterpolation, replaced by the same crop
    that also decodes (data/decode.py); every later step is timm's, untouched."""
    first = transform.transforms[0]
    if not isinstance(first, RandomResizedCropAndInterpolation):
        raise TypeError(f"timm's train transform no longer starts with its RandomResizedCrop: {first}")
    transform.transforms[0] = RandomResizedCrop(first, decode)
    return transform
