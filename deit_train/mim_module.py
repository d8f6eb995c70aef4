"""The LightningModule of masked image modeling (task=mim): SimMIM pre-training of a DeiT encoder on unlabeled
images. Its checkpoint's encoder starts a classification run: model.init=<run>/checkpoints/last.ckpt."""

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from omegaconf import DictConfig
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.utils import make_grid, save_image

from deit_train.errors import DeitTrainError
from deit_train.losses import masked_reconstruction_loss
from deit_train.models.mim import MaskedImageModel
from deit_train.optim import configure_optimizers


class MIMModule(L.LightningModule):
    def __init__(
        self,
        model: MaskedImageModel,
        optim: DictConfig,
        global_batch_size: int,
        pictures: int = 8,
        pictures_dir: str | Path | None = None,
        config: dict | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.optim = optim
        self.global_batch_size = global_batch_size
        self.pictures = pictures
        self.pictures_dir = Path(pictures_dir) if pictures_dir else None
        self.save_hyperparameters({"config": config or {}})
        self.picture_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.register_buffer("loss_diverged", torch.tensor(False), persistent=False)

    def reconstruction_loss(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        reconstruction = self.model(images, masks)
        return masked_reconstruction_loss(images, reconstruction, masks, self.model.patch_size)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, masks, _view_keys = batch
        loss = self.reconstruction_loss(images, masks)
        self.loss_diverged |= ~torch.isfinite(loss.detach())
        self.log("train/loss", loss, prog_bar=True)
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.stop_if_diverged()  # a host sync only at log steps
        return loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.stop_if_diverged()  # never replace the last good checkpoint by a diverged model

    def stop_if_diverged(self) -> None:
        if bool(self.loss_diverged):
            raise DeitTrainError(
                f"the reconstruction loss became NaN or inf (detected at step {self.global_step}). The last good "
                f"checkpoint is kept. Lower optim.lr or set trainer.gradient_clip_val=1.0, then resume=true."
            )

    def validation_step(self, batch, batch_idx: int) -> None:
        images, masks = batch
        loss = self.reconstruction_loss(images, masks)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(images))
        if batch_idx == 0:
            self.picture_batch = (images[: self.pictures], masks[: self.pictures])

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or self.picture_batch is None or not self.trainer.is_global_zero:
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
        mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_DEFAULT_STD, device=images.device).view(1, 3, 1, 1)
        show = lambda x: (x.float() * std + mean).clamp(0, 1)  # noqa: E731
        masked_input = torch.where(pixel_mask, torch.full_like(images, 0.5), show(images))
        rows = torch.cat([show(images), masked_input, show(reconstruction)])
        return make_grid(rows, nrow=len(images), padding=2, pad_value=1.0).cpu()

    def configure_optimizers(self):
        return configure_optimizers(self, self.model, self.optim, self.global_batch_size)

    def lr_scheduler_step(self, scheduler, metric) -> None:
        scheduler.step_update(num_updates=self.global_step)
