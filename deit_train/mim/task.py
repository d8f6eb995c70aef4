"""task=mim: SimMIM pre-training (Xie et al. 2022; transformers' DeiTForMaskedImageModeling) of a DeiT encoder on
unlabeled images. The encoder reconstructs masked 32 px blocks (L1 on masked pixels, mim/loss.py; its LightningModule
is mim/module.py); its checkpoint then starts a classification run: model.init=<run>/checkpoints/last.ckpt."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from deit_train.errors import DeitTrainError
from deit_train.schema import Range, checked, refuse
from deit_train.tasks.task import Built, Task, register

if TYPE_CHECKING:
    from deit_train.data.sources import DataSource
    from deit_train.mim.data import MaskedImageDataModule
    from deit_train.mim.model import MaskedImageModel
    from deit_train.models.checkpoints import RunCheckpoint
    from deit_train.models.trained_model import TrainedModel

log = logging.getLogger("deit_train")


def patch_size(model: DictConfig) -> int:
    """The student's patch size as its config builds it: model.patch_size (a DeiT config), else timm.create_model's
    model.kwargs.patch_size, else the one its timm name says (vit_small_patch8_224), else ViT's 16. The masks'
    blocks are cut on it (a wrong one fails mid-run); build() compares it with the network's."""
    found = re.search(r"patch(\d+)", str(model.name))
    return int(model.patch_size or model.kwargs.get("patch_size") or (found and found.group(1)) or 16)


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
        if not str(cfg.model.name).startswith("deit"):  # timm's deit module registers every deit_*, deit3_* name
            import timm

            vits = {*timm.list_models(module="vision_transformer"), *timm.list_models(module="deit")}
            if timm.models.get_arch_name(cfg.model.name) not in vits:
                raise DeitTrainError(
                    f"task=mim needs a ViT/DeiT student; model.name={cfg.model.name} has no patch "
                    f"embedding (model=deit_tiny, deit_small, ...)"
                )
        size, block, patch = cfg.model.img_size, cfg.task.mask_patch_size, patch_size(cfg.model)
        if size % block:
            raise refuse("task.mask_patch_size", block, f"a divisor of model.img_size={size}")
        if block % patch:
            raise refuse("task.mask_patch_size", block, f"a multiple of model.patch_size={patch}")

    def check_data(self, source: DataSource) -> None:
        """Unlabelled images: no class folders to check (the folder's presence is the source's own rule)."""

    def datamodule(self, cfg: DictConfig, source: DataSource) -> MaskedImageDataModule:
        """The source's images without labels, each with its SimMIM mask."""
        from deit_train.mim.data import MaskedImageDataModule
        from deit_train.mim.masking import MaskGenerator

        masks = MaskGenerator(cfg.model.img_size, self.mask_patch_size, patch_size(cfg.model), self.mask_ratio)
        return MaskedImageDataModule(source, cfg.augment, cfg.model.img_size, cfg.seed, masks)

    def build(self, cfg: DictConfig, datamodule: MaskedImageDataModule) -> Built:
        """The student's encoder (no heads) with a mask token and a pixel decoder, on unlabeled images."""
        from deit_train.mim.model import MaskedImageModel
        from deit_train.mim.module import MIMModule
        from deit_train.models.student import build_student, compile_student, describe
        from deit_train.tasks.module import run_config

        encoder = build_student(cfg.model, num_classes=0)
        if not hasattr(encoder, "patch_embed") or not hasattr(encoder, "_pos_embed"):
            raise DeitTrainError(
                f"task=mim needs a ViT/DeiT student; model.name={cfg.model.name} has no patch embedding"
            )
        built_patch = encoder.patch_embed.patch_size[0]
        if built_patch != patch_size(cfg.model):  # a name whose number is not its patch: the masks would not fit
            raise DeitTrainError(
                f"model.name={cfg.model.name} has {built_patch} px patches, not the {patch_size(cfg.model)} its config "
                f"says: set model.patch_size={built_patch} (or +model.kwargs.patch_size)"
            )
        if cfg.compile:
            compile_student(encoder)
        model = MaskedImageModel(encoder)
        if cfg.model.init:
            continue_pretraining(model, cfg.model.init)
        masks = datamodule.masks
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

    @classmethod
    def inference_model(cls, run: RunCheckpoint, path: Path, ema: bool, classifier: bool) -> TrainedModel:
        """The masked image model (encoder, mask token, decoder) where no classifier is asked for (deit-export);
        a classifier is refused naming the fine-tuning that makes one."""
        from deit_train.mim.model import MaskedImageModel
        from deit_train.models.checkpoints import load_into
        from deit_train.models.student import build_student
        from deit_train.models.trained_model import TrainedModel

        if classifier:
            raise DeitTrainError(
                f"{path} is a deit-train task=mim run: an encoder without classifier heads. Fine-tune it first "
                f"(deit-train model.init={path} ...)"
            )
        if ema:
            raise DeitTrainError(f"--ema: {path} is a deit-train task=mim run, which keeps no EMA weights: drop --ema")
        # MIMModule keeps its MaskedImageModel as `model` and names the encoder inside it as the student
        model = MaskedImageModel(build_student(run.model_config(), num_classes=0))
        load_into(model, run.part(run.student_prefix.removesuffix("encoder.")), str(path), "masked image model")
        return TrainedModel.of_run(model, [], run)


def continue_pretraining(model: MaskedImageModel, source: str) -> None:
    """model.init from a task=mim run's checkpoint continues its pre-training: its mask token and decoder too, not
    only the encoder (which model.init has loaded). Other sources start them fresh."""
    from deit_train.models.checkpoints import read_run_checkpoint

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


register("mim", MaskedImageModeling)
