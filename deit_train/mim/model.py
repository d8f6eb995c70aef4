"""The masked image model (SimMIM; transformers' DeiTForMaskedImageModeling): a DeiT encoder whose masked patch
embeddings are replaced by a learned mask token (class and distillation tokens kept), and a one-layer decoder,
a 1x1 convolution to stride^2 x 3 channels and a PixelShuffle, that maps the patch tokens back to pixels."""

import torch
from timm.layers import trunc_normal_
from torch import nn


class MaskedImageModel(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder  # a headless timm VisionTransformer(Distilled): num_classes=0
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        trunc_normal_(self.mask_token, std=0.02)  # SimMIM's initialisation
        stride = encoder.patch_embed.patch_size[0]  # encoder_stride: one token per patch
        channels = encoder.patch_embed.proj.in_channels
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.embed_dim, stride**2 * channels, kernel_size=1), nn.PixelShuffle(stride)
        )

    def no_weight_decay(self) -> set[str]:
        """Parameters timm's optimizer factory keeps out of weight decay, besides norms and biases."""
        return {"mask_token"} | {f"encoder.{name}" for name in self.encoder.no_weight_decay()}

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_embed.patch_size[0]

    def forward(self, images: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        """The reconstructed images, the same shape as `images`."""
        encoder = self.encoder
        tokens = encoder.patch_embed(images)  # (batch, patches, dim)
        masked = bool_masked_pos.unsqueeze(-1).type_as(tokens)
        tokens = tokens * (1 - masked) + self.mask_token.type_as(tokens) * masked
        tokens = encoder._pos_embed(tokens)  # prepends the class (and distillation) token
        tokens = encoder.norm_pre(encoder.patch_drop(tokens))
        tokens = encoder.norm(encoder.blocks(tokens))
        patches = tokens[:, encoder.num_prefix_tokens :]
        height, width = encoder.patch_embed.grid_size
        grid = patches.transpose(1, 2).reshape(len(images), -1, height, width)
        return self.decoder(grid)
