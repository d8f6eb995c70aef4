"""A trained model ready for inference, from whatever file or directory it was saved as.

Sources: a deit-train checkpoint (`.ckpt`; the run config inside rebuilds the student), a transformers DeiT
directory or a timm export directory (both as `deit-export` writes them). deit-eval, deit-predict and
deit-export all start here, so they see the same model, class names and eval transform.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import timm
from omegaconf import OmegaConf
from torch import nn

from deit_train.data.transforms import eval_resize_size, resize_crop_transform
from deit_train.errors import DeitTrainError
from deit_train.models import build_student
from deit_train.models.checkpoints import load_into, load_weights, read_export_config, read_run_checkpoint
from deit_train.schema import ModelConfig

log = logging.getLogger(__name__)

DEFAULT_CROP_PCT = 0.875  # DeiT's eval crop, for exports that do not say theirs


@dataclass
class TrainedModel:
    model: nn.Module  # in eval mode; a distilled DeiT's forward averages its two heads
    class_names: list[str]
    img_size: int  # the center crop
    resize_size: int  # the short side before cropping: floor(img_size / crop_pct)

    def transform(self):
        """The eval transform the model was validated with (data/transforms.py)."""
        return resize_crop_transform(self.resize_size, self.img_size)


def load_trained_model(source: str | Path, ema: bool = False) -> TrainedModel:
    """The model in `source`; `ema=True` takes a deit-train checkpoint's EMA weights (ema.decay was set)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise DeitTrainError(f"{path} does not exist: pass a deit-train .ckpt or a deit-export directory")
    if path.is_dir():
        if ema:
            raise DeitTrainError("--ema reads a deit-train .ckpt; an export holds one set of weights")
        config = read_export_config(path)
        trained = from_transformers(path, config) if config.get("model_type") == "deit" else from_timm(path)
    else:
        trained = from_checkpoint(path, ema)
    trained.model.eval()
    return trained


def from_checkpoint(path: Path, ema: bool) -> TrainedModel:
    run = read_run_checkpoint(path, "MODEL")
    if run.class_names is None:
        raise DeitTrainError(f"{path} is a deit-train checkpoint without classes (task=mim): fine-tune it first "
                             f"(deit-train model.init={path} ...)")  # fmt: skip
    cfg = OmegaConf.create(run.config)
    class_names = list(run.class_names)
    model_cfg = OmegaConf.merge(
        OmegaConf.structured(ModelConfig), cfg.model, {"init": None, "pretrained": False}
    )
    student = build_student(model_cfg, len(class_names))
    state = run.part("ema.module." if ema else "student.")
    if not state:
        what = "EMA weights (the run did not set ema.decay)" if ema else "student weights"
        raise DeitTrainError(f"{path} holds no {what}")
    load_into(student, state, str(path), "student")
    if hasattr(student, "set_distilled_training"):
        student.set_distilled_training(False)  # forward = the average of both heads
    img_size = cfg.model.img_size
    return TrainedModel(student, class_names, img_size, eval_resize_size(img_size, cfg.augment.eval_crop_pct))


def from_transformers(directory: Path, config: dict) -> TrainedModel:
    """A timm VisionTransformerDistilled holding a transformers DeiT's weights."""
    weights = load_weights(directory, "MODEL")
    if "head_dist.weight" not in weights.state:
        raise DeitTrainError(
            f"{directory} is a transformers DeiT without the two heads of "
            f"DeiTForImageClassificationWithTeacher; fine-tune it first (model.init={directory})"
        )
    num_classes = weights.state["head.weight"].shape[0]
    model = timm.create_model(
        "deit_tiny_distilled_patch16_224",  # an architecture name only: every size comes from config.json
        pretrained=False,
        num_classes=num_classes,
        img_size=config["image_size"],
        patch_size=config["patch_size"],
        embed_dim=config["hidden_size"],
        depth=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        mlp_ratio=config["intermediate_size"] / config["hidden_size"],
        qkv_bias=config.get("qkv_bias", True),
    )
    load_into(model, weights.state, str(directory), "DeiT described by its config.json")
    class_names = weights.class_names or [str(i) for i in range(num_classes)]
    img_size = config["image_size"]
    resize_size = eval_resize_size(img_size, DEFAULT_CROP_PCT)
    processor_file = directory / "preprocessor_config.json"
    if processor_file.is_file():  # deit-export's: shortest-edge resize, then center crop
        processor = json.loads(processor_file.read_text())
        if "shortest_edge" in (processor.get("size") or {}) and processor.get("crop_size"):
            img_size, resize_size = processor["crop_size"]["height"], processor["size"]["shortest_edge"]
    return TrainedModel(model, class_names, img_size, resize_size)


def from_timm(directory: Path) -> TrainedModel:
    """A timm export (timm's save_for_hf layout), through timm's own local-dir loader."""
    try:
        model = timm.create_model(f"local-dir:{directory}", pretrained=True)
    except (RuntimeError, OSError, ValueError, KeyError) as error:
        raise DeitTrainError(f"{directory}: timm could not load this export: {error}") from error
    cfg = model.pretrained_cfg
    class_names = cfg.get("label_names") or [str(i) for i in range(model.num_classes)]
    img_size = cfg["input_size"][-1]
    resize_size = eval_resize_size(img_size, cfg.get("crop_pct", DEFAULT_CROP_PCT))
    return TrainedModel(model, list(class_names), img_size, resize_size)
