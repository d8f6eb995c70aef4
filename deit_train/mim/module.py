"""The LightningModule of task=mim (mim/task.py): the encoder reconstructs the masked blocks; validation draws a few
reconstructions."""

import logging
from pathlib import Path

import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from omegaconf import DictConfig
from torch import nn
from torchvision.utils import make_grid, save_image

from deit_train.data.pixels import mean_std
from deit_train.mim.loss import masked_reconstruction_loss
from deit_train.mim.model import MaskedImageModel
from deit_train.tasks.module import TrainingModule

log = logging.getLogger("deit_train")


class MIMModule(TrainingModule):
    student_prefix = "model.encoder."  # the encoder that model.init reads; mask token and decoder beside it
    divergence_advice = "Lower optim.lr or set trainer.gradient_clip_val=1.0"

    def __init__(
        self,
        model: MaskedImageModel,
        optim: DictConfig,
        global_batch_size: int,
        seed: int = 0,
        pictures: int = 8,
        pictures_dir: str | Path | None = None,
        config: dict | None = None,
    ) -> None:
        super().__init__(optim, global_batch_size, seed, config)
        self.model = model
        self.pictures = pictures
        self.pictures_dir = Path(pictures_dir) if pictures_dir else None
        self.picture_batch: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def network(self) -> nn.Module:
        return self.model

    def reconstruction_loss(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        reconstruction = self.model(images, masks)
        return masked_reconstruction_loss(images, reconstruction, masks, self.model.patch_size)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.reconstruction_loss(batch.images, batch.targets)  # data/views.py TrainingViews: masks as targets
        self.track(loss)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, masks = batch
        loss = self.reconstruction_loss(images, masks)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(images))
        if batch_idx == 0:
            self.picture_batch = (images[: self.pictures], masks[: self.pictures])

    def on_validation_epoch_end(self) -> None:
        drawn = self.pictures and self.picture_batch is not None  # task.pictures=0 draws nothing
        if self.trainer.sanity_checking or not drawn or not self.trainer.is_global_zero:
            return
        grid = self.reconstruction_grid(*self.picture_batch)
        if self.pictures_dir is not None:
            self.pictures_dir.mkdir(parents=True, exist_ok=True)
            path = self.pictures_dir / f"epoch_{self.current_epoch:03d}.png"
            save_image(grid, path.with_suffix(".tmp.png"))
            path.with_suffix(".tmp.png").replace(path)
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/reconstruction", grid, self.global_step)
            elif isinstance(logger, WandbLogger):
                logger.log_image("val/reconstruction", [grid], step=self.global_step)

    @torch.no_grad()
    def reconstruction_grid(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Rows: input, masked input (masked patches grey), reconstruction; one column per image."""
        reconstruction = self.model(images, masks).float()
        patch = self.model.patch_size
        side = images.shape[-1] // patch
        pixel_mask = masks.view(-1, 1, side, side).repeat_interleave(patch, 2).repeat_interleave(patch, 3)
        mean, std = mean_std(images.device)
        show = lambda x: (x.float() * std + mean).clamp(0, 1)  # noqa: E731
        masked_input = torch.where(pixel_mask, torch.full_like(images, 0.5), show(images))
        rows = torch.cat([show(images), masked_input, show(reconstruction)])
        return make_grid(rows, nrow=len(images), padding=2, pad_value=1.0).cpu()
