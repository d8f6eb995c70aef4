"""task=mim: SimMIM pre-training (Xie et al. 2022; transformers' DeiTForMaskedImageModeling) of a DeiT encoder on
unlabeled images. The encoder reconstructs masked 32 px blocks (L1 on masked pixels, loss.py); its checkpoint then
starts a classification run: model.init=<run>/checkpoints/last.ckpt."""

import logging
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from omegaconf import DictConfig
from torch import nn
from torchvision.utils import make_grid, save_image

from deit_train.data.pixels import mean_std
from deit_train.errors import DeitTrainError
from deit_train.mim.data import MaskedImageDataModule
from deit_train.mim.loss import masked_reconstruction_loss
from deit_train.mim.masking import MaskGenerator
from deit_train.mim.model import MaskedImageModel
from deit_train.models import build_student, compile_student, describe
from deit_train.models.checkpoints import read_run_checkpoint
from deit_train.schema import Range, checked, refuse
from deit_train.tasks.module import TrainingModule, run_config
from deit_train.tasks.task import Built, Task

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
        images, masks, _view_keys = batch
        loss = self.reconstruction_loss(images, masks)
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


@dataclass
class MaskedImageModeling(Task):
    optimized_metric: str = "val/loss"  # the reconstruction loss: best.ckpt and Optuna minimise it
    optimized_mode: str = "min"
    # SimMIM's 32 px blocks: a multiple of the model's patch size that divides the image size
    mask_patch_size: int = checked(32, Range(1, None, "a block size >= 1"))
    mask_ratio: float = checked(0.6, Range(0.0, 1.0, "a share in (0, 1)", low_open=True, high_open=True))
    pictures: int = checked(8, Range(0, None, "a number of pictures >= 0"))  # reconstructions drawn per validation

    def check(self, cfg: DictConfig) -> None:
        super().check(cfg)
        if cfg.loss.distillation_type != "none" or cfg.loss.feature_weight > 0 or cfg.teacher.name is not None:
            raise DeitTrainError(
                "task=mim pre-trains without labels or teacher: drop loss=/teacher= here and distil when "
                "fine-tuning from its checkpoint (model.init=<run>/checkpoints/last.ckpt loss=hard_distill "
                "teacher=...)"
            )
        vits = {*timm.list_models(module="vision_transformer"), *timm.list_models(module="deit")}
        if timm.models.get_arch_name(cfg.model.name) not in vits:
            raise DeitTrainError(
                f"task=mim needs a ViT/DeiT student; model.name={cfg.model.name} has no patch "
                f"embedding (model=deit_tiny, deit_small, ...)"
            )
        size, block, patch = cfg.model.img_size, cfg.task.mask_patch_size, cfg.model.patch_size or 16
        if size % block:
            raise refuse("task.mask_patch_size", block, f"a divisor of model.img_size={size}")
        if block % patch:
            raise refuse("task.mask_patch_size", block, f"a multiple of model.patch_size={patch}")

    def build(self, cfg: DictConfig) -> Built:
        """The student's encoder (no heads) with a mask token and a pixel decoder, on unlabeled images."""
        encoder = build_student(cfg.model, num_classes=0)
        if not hasattr(encoder, "patch_embed") or not hasattr(encoder, "_pos_embed"):
            raise DeitTrainError(
                f"task=mim needs a ViT/DeiT student; model.name={cfg.model.name} has no patch embedding"
            )
        if cfg.compile:
            compile_student(encoder)
        model = MaskedImageModel(encoder)
        if cfg.model.init:
            continue_pretraining(model, cfg.model.init)
        masks = MaskGenerator(cfg.model.img_size, self.mask_patch_size, model.patch_size, self.mask_ratio)
        datamodule = MaskedImageDataModule(cfg.data, cfg.augment, cfg.model.img_size, cfg.seed, masks)
        log.info(
            "masked image modeling: encoder %s, %d of %d blocks masked",
            describe(encoder),
            masks.mask_count,
            masks.grid**2,
        )
        module = MIMModule(
            model,
            optim=cfg.optim,
            global_batch_size=cfg.data.batch_size,
            seed=cfg.seed,
            pictures=self.pictures,
            pictures_dir=Path(cfg.paths.output_dir) / "reconstructions",
            config=run_config(cfg),
        )
        return Built(datamodule, module)


def continue_pretraining(model: MaskedImageModel, source: str) -> None:
    """model.init from a task=mim run's checkpoint continues its pre-training: its mask token and decoder too, not
    only the encoder (which model.init has loaded). Other sources start them fresh."""
    path = Path(source).expanduser()
    if not path.is_file():
        return
    try:
        run = read_run_checkpoint(path, "model.init")
    except DeitTrainError:  # weights, not a run: the encoder alone
        return
    rest = {
        key.removeprefix("model."): tensor
        for key, tensor in run.state_dict.items()
        if key.startswith(("model.mask_token", "model.decoder."))
    }
    if rest:
        model.load_state_dict({**model.state_dict(), **rest})
        log.info("model.init: mask token and decoder from %s", source)
