"""The student: a distilled DeiT (timm's VisionTransformerDistilled) or any single-head timm classifier."""

import types
from fnmatch import fnmatch
from pathlib import Path

import timm
import torch
from omegaconf import DictConfig
from timm.models.deit import VisionTransformerDistilled
from torch import nn

from deit_train.cluster import once_per_node
from deit_train.errors import DeitTrainError
from deit_train.models.architecture import VIT_ARCHITECTURE_FIELDS
from deit_train.models.init import initialize_from


def create_timm_model(name: str, what: str, **kwargs) -> nn.Module:
    """timm.create_model with a clear error for an unknown name or an unreachable weight hub."""
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0].split('_')[0]}*")[:10]
        raise DeitTrainError(f"unknown timm model {name!r} for the {what}. Similar names: {close}")
    try:
        if not kwargs.get("pretrained"):
            return timm.create_model(name, **kwargs)
        # every task of a node would download the same weights at once: the first fetches, the others then read
        # them from the shared download cache (torch hub's folder, beside the Hugging Face cache)
        with once_per_node(f"weights-{name.replace('/', '_')}", Path(torch.hub.get_dir())):
            return timm.create_model(name, **kwargs)
    except TypeError as error:  # an argument the architecture does not take (model.kwargs, or a ViT size on a convnet)
        raise DeitTrainError(
            f"timm's {name!r} ({what}) does not take these arguments: {error}. Remove them (model.kwargs, or "
            f"the ViT sizes model.patch_size/depth/embed_dim/num_heads=null)"
        ) from error
    except (OSError, RuntimeError, ValueError) as error:
        if kwargs.get("pretrained"):
            raise DeitTrainError(
                f"could not load pretrained weights for {name!r} ({what}): {error}. Without network, "
                f"download the weights elsewhere and pass a checkpoint path instead."
            ) from error
        raise


def build_student(cfg: DictConfig, num_classes: int) -> nn.Module:
    """The model config's timm architecture with `num_classes` outputs on each head."""
    kwargs = {k: cfg[k] for k in VIT_ARCHITECTURE_FIELDS if cfg[k] is not None}
    if kwargs:  # a ViT: the data resolution is also the model's
        kwargs["img_size"] = cfg.img_size
    if cfg.drop_path_rate is not None:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    kwargs.update(cfg.kwargs)
    model = create_timm_model(cfg.name, "student", pretrained=cfg.pretrained, num_classes=num_classes, **kwargs)
    if cfg.init:
        initialize_from(model, cfg.init)
    if cfg.trainable is not None:
        freeze_all_but(model, list(cfg.trainable))
    if is_distilled(model):
        model.set_distilled_training(True)
    return model


def freeze_all_but(model: nn.Module, patterns: list[str]) -> None:
    """Only parameters whose name matches one of `patterns` train (FixRes fine-tunes the classifier alone); the
    others keep their weights. BatchNorm statistics still follow the data in training mode."""
    trained = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(any(fnmatch(name, pattern) for pattern in patterns))
        if parameter.requires_grad:
            trained.append(name)
    if not trained:
        names = [name for name, _ in model.named_parameters()]
        raise DeitTrainError(
            f"model.trainable={patterns} matches none of the {len(names)} parameters of {type(model).__name__} "
            f"(they are named like {names[0]}, ..., {names[-1]})"
        )


def compile_student(model: nn.Module, backend: str = "inductor") -> None:
    """torch.compile the feature extractor, where nearly all the compute is; forward and forward_heads
    both go through it. The state dict keeps its plain names.

    The class's function is compiled and bound to this instance, not the instance's bound method: a copy of the
    model (the EMA's deepcopy) then binds the same compiled function to itself and runs its own weights. A compiled
    bound method would be copied as it is and keep running the original's weights (the EMA's heads on the
    student's backbone)."""
    compiled = torch.compile(type(model).forward_features, backend=backend)
    model.forward_features = types.MethodType(compiled, model)


def is_distilled(model: nn.Module) -> bool:
    return isinstance(model, VisionTransformerDistilled)


def forward_heads(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(class-head logits, distillation-head logits) in train and eval mode alike; (logits, None) for a
    single-head model. timm's own forward averages the two heads outside distilled training."""
    if not is_distilled(model):
        return model(images), None
    return heads_on(model, model.forward_features(images))


def heads_on(model: nn.Module, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """forward_heads from the output of forward_features (or of forward_intermediates, the same tensor)."""
    if not is_distilled(model):
        return model.forward_head(features), None
    cls_token, dist_token = model.head_drop(features[:, 0]), model.head_drop(features[:, 1])
    return model.head(cls_token), model.head_dist(dist_token)


def average_heads(cls_logits: torch.Tensor, dist_logits: torch.Tensor | None) -> torch.Tensor:
    """The model's prediction: the average of the class and distillation heads (DeiT section 4)."""
    return cls_logits if dist_logits is None else (cls_logits + dist_logits) / 2


def describe(model: nn.Module) -> str:
    params = sum(p.numel() for p in model.parameters()) / 1e6
    heads = "class + distillation heads" if is_distilled(model) else "single head"
    return f"{type(model).__name__} ({params:.2f}M params, {heads})"
