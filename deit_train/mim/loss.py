"""The masked-image-modeling objective."""

import torch
import torch.nn.functional as F


def masked_reconstruction_loss(
    images: torch.Tensor, reconstruction: torch.Tensor, bool_masked_pos: torch.Tensor, patch_size: int
) -> torch.Tensor:
    """SimMIM's objective (Xie et al. 2022, eq. 1), as transformers' DeiTForMaskedImageModeling computes it: the L1
    distance between the reconstruction and the (normalised) input on masked pixels only, divided by the number of
    masked pixels times channels. bool_masked_pos: (batch, patches) over the model's patch grid, True = masked."""
    batch, channels, height, width = images.shape
    mask = bool_masked_pos.reshape(batch, height // patch_size, width // patch_size)
    mask = mask.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).unsqueeze(1).type_as(images)
    l1 = F.l1_loss(reconstruction, images, reduction="none")
    return (l1 * mask).sum() / (mask.sum() + 1e-5) / channels
