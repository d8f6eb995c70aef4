"""The first step of every transform: decode the image, a large JPEG at a reduced scale where the crop allows.

A 224 px crop of a 4000x3000 photo needs a few hundred thousand of its 12 million pixels, yet decoding the file
whole is most of the cost (about 4 images/s per worker, issue 30). libjpeg can decode at 1/2, 1/4 or 1/8 of the size
(its DCT scaling, Pillow's `draft`) for a fraction of the work. With data.decode=reduced:

- training (RandomResizedCrop): the crop box is drawn from the size in the file's header, by timm's own get_params
  (and its interpolation choice), so the random draws, hence the boxes and their distribution, are those of timm's
  RandomResizedCropAndInterpolation by construction. The JPEG is then decoded at the largest scale that keeps the
  box at least the output size, the box mapped into the smaller picture (exactly, in fractional pixels) and resized.
- a resize of the short side (DeiT III's simple random crop; crop=center): decoded at the largest scale that keeps
  the short side at least the resize size, then resized from the whole smaller picture to the size the full one
  would get. Validation never reduces (data/datamodule.py: EVAL_DECODE): its metrics are deit-eval's.

Everything else takes the exact path, the same pixels as today: decode=exact, files other than JPEG, crops too small
for any reduction, and images that come already decoded (CIFAR, deit-predict's load_image).
"""

import math
import random

import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T
from torchvision.transforms import functional as F

from deit_train.data.images import DECODE_MODES, EncodedImage
from deit_train.errors import DeitTrainError

SCALES = (8, 4, 2)  # libjpeg's DCT scalings, largest first


def check_decode(decode: str) -> str:
    if decode not in DECODE_MODES:
        raise DeitTrainError(f"data.decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    return decode


def reduction(room: float) -> int:
    """The largest DCT scale s with `room` >= s (room: how many times the needed size the image part is), else 1."""
    return next((scale for scale in SCALES if room >= scale), 1)


def decoded(image: Image.Image | EncodedImage) -> Image.Image:
    """The picture, decoded whole where it is not yet."""
    return image.decode()[0] if isinstance(image, EncodedImage) else image


def shape_only(width: int, height: int) -> torch.Tensor:
    """A tensor of an image's shape that holds one number: timm's get_params reads only the size of its image."""
    return torch.empty(1, 1).expand(height, width)


class RandomResizedCrop(RandomResizedCropAndInterpolation):
    """timm's RandomResizedCropAndInterpolation (the one create_transform built, its settings copied) that also
    takes an EncodedImage, decoded as `decode` says (module docstring). A decoded image takes timm's own path."""

    def __init__(self, timm_crop: RandomResizedCropAndInterpolation, decode: str) -> None:
        self.__dict__.update(vars(timm_crop))  # size, scale, ratio, interpolation as create_transform set them
        self.decode = check_decode(decode)

    def __call__(self, image: Image.Image | EncodedImage) -> Image.Image:
        if isinstance(image, EncodedImage) and (self.decode == "exact" or not image.is_jpeg):
            image = decoded(image)
        if not isinstance(image, EncodedImage):
            return super().__call__(image)
        top, left, height, width, interpolation = self.draw(image.size)
        out_height, out_width = self.size
        picture, scale = image.decode(reduction(min(width / out_width, height / out_height)))
        if scale == 1:
            return F.resized_crop(picture, top, left, height, width, list(self.size), interpolation)
        box = image.reduced_box((left, top, left + width, top + height), scale)
        # Crop to the whole pixels around the box first, so that the filter, like timm's crop-then-resize, reads
        # nothing beyond the crop (but the part of a pixel the box cuts).
        hull = (
            math.floor(box[0]),
            math.floor(box[1]),
            min(math.ceil(box[2]), picture.width),
            min(math.ceil(box[3]), picture.height),
        )
        inside = (box[0] - hull[0], box[1] - hull[1], box[2] - hull[0], box[3] - hull[1])
        return picture.crop(hull).resize((out_width, out_height), F.pil_modes_mapping[interpolation], box=inside)

    def draw(self, size: tuple[int, int]) -> tuple[int, int, int, int, T.InterpolationMode]:
        """(top, left, height, width, interpolation) for an image of `size` (width, height): timm's draws, in
        timm's order (its __call__), the box by its own get_params, then the interpolation."""
        top, left, height, width = self.get_params(shape_only(*size), self.scale, self.ratio)
        if isinstance(self.interpolation, tuple | list):
            return top, left, height, width, random.choice(self.interpolation)
        return top, left, height, width, self.interpolation

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, decode={self.decode})"


class ResizeShortSide(torch.nn.Module):
    """torchvision's Resize(size) of the short side (bicubic) that also takes an EncodedImage, decoded as `decode`
    says (module docstring): the picture has the size and geometry the full decode would give it."""

    def __init__(self, size: int, decode: str) -> None:
        super().__init__()
        self.size, self.decode = size, check_decode(decode)
        self.resize = T.Resize(size, interpolation=T.InterpolationMode.BICUBIC)

    def forward(self, image: Image.Image | EncodedImage) -> Image.Image:
        if isinstance(image, EncodedImage):
            reduce = self.decode == "reduced" and image.is_jpeg
            picture, scale = image.decode(reduction(min(image.size) / self.size) if reduce else 1)
            if scale > 1:
                box = image.reduced_box((0, 0, *image.size), scale)
                return picture.resize(resized_size(image.size, self.size), Image.Resampling.BICUBIC, box=box)
            image = picture
        return self.resize(image)

    def __repr__(self) -> str:
        return f"ResizeShortSide(size={self.size}, interpolation=bicubic, decode={self.decode})"


def resized_size(size: tuple[int, int], short: int) -> tuple[int, int]:
    """(width, height) of torchvision's Resize(short) of an image of `size` (its _compute_resized_output_size)."""
    width, height = size
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short
