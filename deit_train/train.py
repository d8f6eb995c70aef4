"""`deit-train`: compose the config, build data, student, teacher and trainer, fit, write metrics.json."""

import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

import deit_train.conf
import deit_train.schema  # noqa: F401  (registers train_schema with Hydra's ConfigStore)
from deit_train.cluster import (
    acknowledge_warning_signals,
    fit_until_preempted,
    requeued_checkpoint,
    slurm_plugins,
)
from deit_train.console import config_summary, quiet_console
from deit_train.data import DeiTDataModule
from deit_train.data.masking import MaskGenerator
from deit_train.errors import DeitTrainError
from deit_train.losses import DistillationLoss
from deit_train.mim_module import MIMModule
from deit_train.models import build_student, compile_student, is_distilled
from deit_train.models.mim import MaskedImageModel
from deit_train.module import DeiTModule, student_summary
from deit_train.schema import check as check_values
from deit_train.teacher import build_teacher

CONFIG_DIR = str(Path(deit_train.conf.__file__).parent)
log = logging.getLogger("deit_train")


def check_config(cfg: DictConfig) -> None:
    """Values and combinations that would fail later or train something other than what the user asked for."""
    # Values left unset: ??? in a config group (data.root), or listed under `required` by a preset (model.init).
    missing = sorted(
        OmegaConf.missing_keys(cfg) | {k for k in cfg.required if OmegaConf.select(cfg, k) is None}
    )
    if missing:
        raise DeitTrainError(
            f"the config needs {', '.join(f'{key}=...' for key in missing)}: add it to the command line"
        )
    check_values(cfg)  # ranges, choices, batch and size rules (schema.py)
    distillation = cfg.loss.distillation_type
    if cfg.task.name == "mim" and (distillation != "none" or cfg.teacher.name is not None):
        raise DeitTrainError(
            "task=mim pre-trains without labels or teacher: drop loss=/teacher= here and distil when fine-tuning "
            "from its checkpoint (model.init=<run>/checkpoints/last.ckpt loss=hard_distill teacher=...)"
        )
    if distillation != "none" and cfg.teacher.name is None:
        raise DeitTrainError(
            f"loss={distillation}_distill needs a teacher: add e.g. teacher=regnety_160 (ImageNet) or "
            f"teacher=timm teacher.name=resnet50 teacher.checkpoint=PATH; or train without one: loss=ce."
        )
    if cfg.task.name == "teacher_cache" and (distillation == "none" or not cfg.teacher.cache):
        raise DeitTrainError(
            "task=teacher_cache fills teacher.cache=DIR for a distillation run: give the run's loss=hard_distill or "
            "soft_distill, its teacher and teacher.cache=DIR"
        )
    if relaunches_ranks_inside_a_sweep(cfg):
        raise DeitTrainError(
            "trainer.strategy=ddp re-launches this script once per rank, which inside a local multirun (-m) "
            "would not find the job's directory. Use trainer=ddp_spawn (or trainer.strategy=ddp_spawn) in sweeps, "
            "or the SLURM launcher (hydra/launcher=slurm), where the ranks are SLURM tasks."
        )


def warn_about_config(cfg: DictConfig) -> None:
    """Settings that do nothing in this run."""
    if cfg.teacher.cache and cfg.loss.distillation_type == "none":
        log.warning("teacher.cache=%s is unused: loss=ce runs no teacher", cfg.teacher.cache)
    if cfg.loss.distillation_type == "none" and cfg.teacher.name is not None:
        log.warning("loss=ce ignores teacher=%s: no teacher is loaded or run.", cfg.teacher.name)


def relaunches_ranks_inside_a_sweep(cfg: DictConfig) -> bool:
    """Lightning's `ddp` starts ranks 1..N-1 as new processes of this script with the run directory, not the
    sweep job's directory; under SLURM the ranks are already separate tasks and nothing is re-launched."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return False
    strategy = str(cfg.trainer.strategy)
    devices = cfg.trainer.devices
    several = (
        devices == -1
        or devices == "auto"
        or (isinstance(devices, int) and devices > 1)
        or cfg.trainer.num_nodes > 1
    )
    return strategy == "ddp" and several and "SLURM_NTASKS" not in os.environ


def write_metrics(metrics: dict[str, float], output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    tmp.replace(output_dir / "metrics.json")


def resume_from(cfg: DictConfig, output_dir: Path) -> str | None:
    """The checkpoint to continue from: ckpt_path, or this run's last.ckpt if there is one and resume=true or Slurm
    requeued the job (which runs again in the same directory)."""
    if cfg.ckpt_path:
        if not Path(cfg.ckpt_path).expanduser().is_file():
            raise DeitTrainError(f"ckpt_path={cfg.ckpt_path} does not exist")
        return str(Path(cfg.ckpt_path).expanduser())
    last = output_dir / "checkpoints" / "last.ckpt"
    if requeued := requeued_checkpoint(output_dir):
        return requeued
    if cfg.resume and last.is_file():
        log.info("resuming from %s", last)
        return str(last)
    if cfg.resume:
        log.info("resume=true but %s does not exist yet: starting from scratch", last)
    return None


def logger_run_id(logger_cfg: DictConfig, output_dir: Path) -> dict:
    """A W&B run id derived from the run directory, so that resuming in the same directory continues the same
    W&B run (unless logger.wandb.id is set)."""
    if not logger_cfg._target_.endswith("WandbLogger") or logger_cfg.get("id"):
        return {}
    digest = hashlib.sha1(str(output_dir.resolve()).encode()).hexdigest()[:16]
    return {"id": digest, "resume": "allow"}


@dataclass
class TrainRun:
    """What train() returns: the final validation metrics and the objects it built."""

    metrics: dict[str, float]
    trainer: L.Trainer
    module: L.LightningModule
    datamodule: DeiTDataModule


def train(cfg: DictConfig) -> TrainRun:
    """One training run: builds data, module and trainer from the config, fits, writes metrics.json."""
    quiet_console()
    check_config(cfg)
    warn_about_config(cfg)
    log.info("%s", config_summary(cfg))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and newer
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
    output_dir = Path(cfg.paths.output_dir)
    config = OmegaConf.to_container(cfg, resolve=True)
    build = build_mim if cfg.task.name == "mim" else build_classification  # classify, teacher_cache
    datamodule, module = build(cfg, config)
    # A group entry set to null (callbacks.progress_bar=null) switches that object off.
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    loggers = [instantiate(c, **logger_run_id(c, output_dir)) for c in cfg.logger.values() if c is not None]
    plugins = [instantiate(plugin) for plugin in cfg.trainer.plugins or []] + slurm_plugins()
    acknowledge_warning_signals()
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, plugins=plugins)
    checkpoint = resume_from(cfg, output_dir)
    fit_until_preempted(trainer, module, datamodule=datamodule, ckpt_path=checkpoint, weights_only=True)

    for run_logger in loggers:
        if isinstance(run_logger, WandbLogger) and trainer.is_global_zero:
            run_logger.experiment.finish()  # the next run of a sweep in this process starts its own W&B run
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val")}
    if trainer.is_global_zero:
        write_metrics(metrics, output_dir)
        log.info("final metrics: %s", json.dumps(metrics, sort_keys=True))
    return TrainRun(metrics, trainer, module, datamodule)


def build_classification(cfg: DictConfig, config: dict) -> tuple[DeiTDataModule, DeiTModule]:
    datamodule = DeiTDataModule(cfg.data, cfg.augment, img_size=cfg.model.img_size, seed=cfg.seed)
    return datamodule, build_module(cfg, datamodule.class_names, config)


def build_module(cfg: DictConfig, class_names: list[str], config: dict | None = None) -> DeiTModule:
    """Student, teacher and loss of a classification run (also task=teacher_cache) on these classes."""
    criterion = DistillationLoss(**cfg.loss, label_smoothing=cfg.augment.smoothing)
    teacher = build_teacher(cfg, class_names) if criterion.needs_teacher else None
    student = build_student(cfg.model, len(class_names))
    if criterion.needs_teacher and criterion.alpha == 1.0 and is_distilled(student):
        raise DeitTrainError(
            f"loss.alpha=1.0 gives the class head of the distilled student {cfg.model.name} no training signal, yet "
            f"its predictions are averaged with the distillation head's. Take a single-head student for pure "
            f"distillation (function matching), e.g. model=deit_small_plain, or set loss.alpha below 1."
        )
    if cfg.compile:
        compile_student(student)
    log.info(
        "student %s on %d classes; teacher %s",
        student_summary(student),
        len(class_names),
        cfg.teacher.name if teacher is not None else "none",
    )
    return DeiTModule(
        student=student,
        teacher=teacher,
        criterion=criterion,
        class_names=class_names,
        optim=cfg.optim,
        augment=cfg.augment,
        global_batch_size=cfg.data.batch_size,
        ema_decay=cfg.ema.decay,
        seed=cfg.seed,
        fill_teacher_cache_only=cfg.task.name == "teacher_cache",
        config=config,
    )


def build_mim(cfg: DictConfig, config: dict) -> tuple[DeiTDataModule, MIMModule]:
    """task=mim: the student's encoder (no heads) with a mask token and a pixel decoder, on unlabeled images."""
    encoder = build_student(cfg.model, num_classes=0)
    if not hasattr(encoder, "patch_embed") or not hasattr(encoder, "_pos_embed"):
        raise DeitTrainError(
            f"task=mim needs a ViT/DeiT student; model.name={cfg.model.name} has no patch embedding"
        )
    if cfg.compile:
        compile_student(encoder)
    model = MaskedImageModel(encoder)
    masks = MaskGenerator(cfg.model.img_size, cfg.task.mask_patch_size, model.patch_size, cfg.task.mask_ratio)
    datamodule = DeiTDataModule(
        cfg.data, cfg.augment, img_size=cfg.model.img_size, seed=cfg.seed, masks=masks
    )
    log.info("masked image modeling: encoder %s, %d of %d blocks masked", student_summary(encoder),
             masks.mask_count, masks.grid**2)  # fmt: skip
    module = MIMModule(
        model,
        optim=cfg.optim,
        global_batch_size=cfg.data.batch_size,
        pictures=cfg.task.pictures,
        pictures_dir=Path(cfg.paths.output_dir) / "reconstructions",
        config=config,
    )
    return datamodule, module


def user_message(error: DeitTrainError) -> str:
    """The message alone, also for errors raised in a data-loader worker (which arrive with the worker's
    traceback folded into the text)."""
    text = str(error).strip()
    marker = f"{DeitTrainError.__name__}: "
    return text.rsplit(marker, 1)[-1] if "Original Traceback" in text else text


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg).metrics
    except DeitTrainError as error:
        log.error("%s", user_message(error))
        sys.exit(2)
    # The value sweeps optimise (hparams_search's direction follows task.optimized_mode).
    return metrics.get(cfg.task.optimized_metric)


if __name__ == "__main__":
    # `python -m deit_train.train`: run the function of the importable module, not of __main__, so that launchers
    # that pickle the task (submitit, joblib) pickle a reference to it rather than the function and its globals.
    from deit_train.cli import cli

    cli()
