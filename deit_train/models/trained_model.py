"""A trained model ready for inference, from whatever file or directory it was saved as.

Sources: a deit-train checkpoint (`.ckpt`; the task its run config records rebuilds its network: Classify the
student, task=mim its masked image model), a transformers DeiT or ViT
directory or a timm export directory (as `deit-export` writes them, or from the hub). deit-eval, deit-predict and
deit-export all start here, so they see the same model, class names and eval transform.

transformers classes and the timm model each becomes (a classifier with a class-token head: their math is
the same; transformers' DeiT and ViT classes are only read here, never run):
  DeiTForImageClassificationWithTeacher   VisionTransformerDistilled (both heads, averaged)
  DeiTForImageClassification              VisionTransformer with the distillation token as its one register token:
                                          the same second token, position-embedded, that the class head ignores
  ViTForImageClassification               VisionTransformer (class token only)
DeiTModel, ViTModel and the ...ForMaskedImageModeling classes have no head: they start a run (model.init).
"""

import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import timm
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from deit_train.data.transforms import eval_resize_size, resize_crop_transform
from deit_train.errors import DeitTrainError
from deit_train.models.checkpoints import (
    TRANSFORMERS_MODEL_TYPES,
    RunCheckpoint,
    load_into,
    load_weights,
    read_export_config,
    read_run_checkpoint,
)

log = logging.getLogger(__name__)

DEFAULT_CROP_PCT = 0.875  # DeiT's eval crop, for exports that do not say theirs


@dataclass
class TrainedModel:
    # in eval mode; a distilled DeiT's forward averages its two heads. A task=mim run's MaskedImageModel where
    # load_trained_model(classifier=False) was asked (deit-export)
    model: nn.Module
    class_names: list[str]  # empty for a task=mim run
    img_size: int  # the center crop
    resize_size: int  # the short side before cropping: floor(img_size / crop_pct)

    def transform(self):
        """The eval transform the model was validated with (data/transforms.py)."""
        return resize_crop_transform(self.resize_size, self.img_size)

    @classmethod
    def of_run(cls, model: nn.Module, class_names: list[str], run: RunCheckpoint) -> "TrainedModel":
        """`model` at the image size and eval crop its run validated at."""
        img_size = run.model_config().img_size
        crop_pct = OmegaConf.select(OmegaConf.create(run.config), "augment.eval_crop_pct", default=DEFAULT_CROP_PCT)
        return cls(model, class_names, img_size, eval_resize_size(img_size, crop_pct))


def load_trained_model(source: str | Path, ema: bool = False, classifier: bool = True) -> TrainedModel:
    """The model in `source`; `ema=True` takes a deit-train checkpoint's EMA weights (ema.decay was set);
    `classifier=False` also accepts a task=mim checkpoint, as its MaskedImageModel."""
    path = Path(source).expanduser()
    if not path.exists():
        raise DeitTrainError(f"{path} does not exist: pass a deit-train .ckpt or a deit-export directory")
    if path.is_dir() and ema:
        raise DeitTrainError("--ema reads a deit-train .ckpt; an export holds one set of weights")
    try:
        if path.is_dir():
            config = read_export_config(path)
            is_transformers = config.get("model_type") in TRANSFORMERS_MODEL_TYPES
            trained = from_transformers(path, config) if is_transformers else from_timm(path)
        else:
            trained = from_checkpoint(path, ema, classifier)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OmegaConfBaseException) as error:
        # a file that passed for one of ours but whose contents are not what deit-train or transformers writes
        what = "its config.json or preprocessor_config.json" if path.is_dir() else "the configuration it stores"
        detail = f"{type(error).__name__}: {str(error).splitlines()[0][:100] if str(error) else ''}"
        raise DeitTrainError(
            f"{path}: {what} is not as deit-train, timm or transformers write it ({detail}); "
            f"export or save the model again"
        ) from error
    check_class_names(trained.class_names, getattr(trained.model, "num_classes", None) or None, path)
    trained.model.eval()
    return trained


def check_class_names(names: object, rows: int | None, path: Path) -> None:
    """One name (a string) per row of the classifier's head (rows; None: not a classifier)."""
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise DeitTrainError(
            f"{path}: its class names are not a list of strings ({str(names)[:60]}): save or export the model again"
        )
    if rows and len(names) != rows:
        raise DeitTrainError(
            f"{path}: {len(names)} class names for a head of {rows} classes: the names belong "
            f"to another model; save or export the model again"
        )


def from_checkpoint(path: Path, ema: bool, classifier: bool) -> TrainedModel:
    """The network the checkpoint's recorded task trained, rebuilt by that task (tasks/task.py: inference_model)."""
    from deit_train.tasks.task import task_of  # tasks build on models: imported where used, never at import

    run = read_run_checkpoint(path, "MODEL")
    return task_of(run, path).inference_model(run, path, ema=ema, classifier=classifier)


def from_transformers(directory: Path, config: dict) -> TrainedModel:
    """A timm ViT holding a transformers DeiT or ViT classifier's weights (the table above)."""
    weights = load_weights(directory, "MODEL")
    state = weights.state
    architecture = (config.get("architectures") or [config["model_type"]])[0]
    if "head.weight" not in state:
        raise DeitTrainError(
            f"{directory} is a transformers {architecture} without a classification head: "
            f"fine-tune it first (deit-train model.init={directory} ...)"
        )
    if config.get("hidden_act", "gelu") != "gelu":
        raise DeitTrainError(
            f"{directory}: hidden_act={config['hidden_act']} in its config.json; timm's ViT "
            f"computes the exact GELU (hidden_act=gelu) only"
        )
    kwargs = {}
    if "head_dist.weight" in state:
        name = "deit_tiny_distilled_patch16_224"
    else:
        name = "deit_tiny_patch16_224"
        if "dist_token" in state:  # DeiTForImageClassification
            kwargs["reg_tokens"] = 1
            state["reg_token"] = state.pop("dist_token")
    num_classes = state["head.weight"].shape[0]
    model = timm.create_model(
        name,  # an architecture name only: every size comes from config.json
        pretrained=False,
        num_classes=num_classes,
        img_size=config["image_size"],
        patch_size=config["patch_size"],
        embed_dim=config["hidden_size"],
        depth=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        mlp_ratio=config["intermediate_size"] / config["hidden_size"],
        qkv_bias=config.get("qkv_bias", True),
        # the hub's DeiT and ViT configs say 1e-12 (transformers' default), ours 1e-6: the file's own value
        norm_layer=partial(nn.LayerNorm, eps=config.get("layer_norm_eps", 1e-12)),
        **kwargs,
    )
    load_into(model, state, str(directory), f"{architecture} described by its config.json")
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
    if model.num_classes == 0:
        raise DeitTrainError(
            f"{directory} is a timm encoder without a classification head (a task=mim run's): "
            f"fine-tune it first (deit-train model.init={directory} ...)"
        )
    cfg = model.pretrained_cfg
    class_names = cfg.get("label_names") or [str(i) for i in range(model.num_classes)]
    img_size = cfg["input_size"][-1]
    resize_size = eval_resize_size(img_size, cfg.get("crop_pct", DEFAULT_CROP_PCT))
    return TrainedModel(
        model, list(class_names) if isinstance(class_names, list | tuple) else class_names, img_size, resize_size
    )
