"""SimMIM's random block masks (Xie et al. 2022, section 3.1), drawn in the data path with each image.

The image is cut into mask patches (32 px in SimMIM); ceil(ratio x count) of them, chosen uniformly without
replacement, are masked; the mask is then expressed on the model's patch grid (each mask patch covers
(mask_patch / model_patch)^2 model patches), flattened in row-major order as transformers' `bool_masked_pos`.
"""

import math

import torch
from torch.utils.data import Dataset


class MaskGenerator:
    """Sizes as the MIM task checked them: mask_patch_size divides img_size and is a multiple of the model's patch."""

    def __init__(self, img_size: int, mask_patch_size: int, model_patch_size: int, mask_ratio: float) -> None:
        self.grid = img_size // mask_patch_size  # mask patches per side
        self.scale = mask_patch_size // model_patch_size  # model patches per mask patch, per side
        self.mask_count = math.ceil(self.grid**2 * mask_ratio)

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A flat bool mask over the model's patches, True where masked."""
        masked = torch.zeros(self.grid**2, dtype=torch.bool)
        masked[torch.randperm(self.grid**2, generator=generator)[: self.mask_count]] = True
        grid = masked.view(self.grid, self.grid)
        return grid.repeat_interleave(self.scale, 0).repeat_interleave(self.scale, 1).flatten()


class MaskedImages(Dataset):
    """(image, mask) pairs. Training masks are drawn with the view's seed (data/views.py: SeededViews); `fixed=True`
    (validation) draws each image's mask from its index, so the validation loss compares across epochs."""

    def __init__(self, images: Dataset, masks: MaskGenerator, fixed: bool = False) -> None:
        self.images = images
        self.masks = masks
        self.fixed = fixed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        generator = torch.Generator().manual_seed(index) if self.fixed else None
        return image, self.masks(generator)
