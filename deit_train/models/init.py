"""Start a student from trained weights (model.init=PATH): fine-tuning on new data or a new resolution.

A new number of classes resets both heads; a new resolution resamples the patch position embeddings
(bicubic, class and distillation tokens kept as they are, DeiT section 6.3 / FixRes). Any other difference
is an error that names the tensor. Heads kept (the same number of classes) are only trained on when they are the
data's classes: by name where the weights name them (check_init_classes), else on the data (tasks/classify.py).
"""

import logging
from dataclasses import dataclass

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from deit_train.errors import DeitTrainError
from deit_train.labels import check_same_classes
from deit_train.models.checkpoints import classifier_keys, load_into, load_weights, non_finite

log = logging.getLogger(__name__)


@dataclass
class KeptHeads:
    """The classification heads model.init kept: where from, and the classes they were trained on (None: the weights
    do not name them, e.g. a plain state dict)."""

    source: str
    class_names: list[str] | None


def initialize_from(student: nn.Module, source: str) -> None:
    """Load `source` (deit-train .ckpt, timm / official DeiT .pth or .safetensors, a transformers DeiT or ViT
    directory or a deit-export directory) into `student`."""
    weights = load_weights(source, "model.init")
    state = dict(weights.state)
    diverged = non_finite(state)
    if diverged:
        raise DeitTrainError(
            f"model.init={source} has non-finite weights ({len(diverged)} tensors, e.g. "
            f"{diverged[0]}): its run diverged; start from an earlier checkpoint of it"
        )
    expected = student.state_dict()
    check_distillation_token(state, expected, source)
    heads = classifier_keys(student)
    had_heads = any(key in state for key in heads)
    encoder_present = set(expected) - set(heads) <= set(state)
    # An encoder without heads: transformers' DeiTModel / ViTModel / ...ForMaskedImageModeling, a task=mim checkpoint.
    if heads and encoder_present and not any(key in state for key in heads):
        log.warning("model.init: %s has no classification heads: both heads start fresh", source)
        state.update({key: expected[key] for key in heads})
    elif "head.weight" in state and "head_dist.weight" in expected and "head_dist.weight" not in state:
        # transformers' DeiTForImageClassification: one head, on the class token.
        log.warning("model.init: %s has one head: the distillation head starts as a copy of it", source)
        state.update({key: state[key.replace("head_dist", "head")] for key in heads if "head_dist" in key})
    resized = [key for key in heads if key in state and state[key].shape != expected[key].shape]
    if resized:
        log.warning(
            "model.init: %d classes in %s, %d here: both heads start fresh",
            state[resized[0]].shape[0],
            source,
            expected[resized[0]].shape[0],
        )
        state.update({key: expected[key] for key in heads})
    elif had_heads:
        # read by check_init_classes once the data's classes are known (build_student does not know them)
        student.kept_heads = KeptHeads(source, list(weights.class_names) if weights.class_names else None)
    if "pos_embed" in expected and "pos_embed" in state and state["pos_embed"].shape != expected["pos_embed"].shape:
        state["pos_embed"] = resample_position_embeddings(student, state["pos_embed"], source)
    # Anything else that differs is an error naming the tensor.
    load_into(student, state, f"model.init={source}", "student")


def check_init_classes(student: nn.Module, class_names: list[str]) -> KeptHeads | None:
    """The heads model.init kept, checked against the data's classes by name and order (refused otherwise); returns
    them when the weights name no classes, for a check on the data, else None."""
    kept = getattr(student, "kept_heads", None)
    if kept is None:
        return None
    if kept.class_names is None:
        return kept
    heads = ", ".join(sorted({key.rsplit(".", 1)[0] + ".*" for key in classifier_keys(student)}))
    check_same_classes(
        kept.class_names,
        class_names,
        f"model.init={kept.source}",
        "its heads",
        "the data",
        f"Its heads would predict the wrong labels. Give the data its classes in the same order, or, to start the "
        f"heads fresh, pass its weights without the head tensors ({heads}: an encoder-only state dict)",
    )
    return None


def check_distillation_token(state: dict, expected: dict, source: str) -> None:
    """A ViT's weights into a ViT student: both with the distillation token (DeiT) or both without (a ViT, a plain
    DeiT); the other way round the token and the position embedding's prefix cannot be made up or dropped."""
    if "cls_token" not in state or ("dist_token" in state) == ("dist_token" in expected):
        return
    if "dist_token" in state:
        raise DeitTrainError(
            f"model.init={source} is a distilled DeiT (class and distillation tokens) but this student is a plain ViT "
            f"(class token only): start a distilled student from it (model=deit_tiny, deit_small, deit_base, ...)"
        )
    raise DeitTrainError(
        f"model.init={source} is a ViT without distillation token (transformers' ViT classes, a plain DeiT) but "
        f"this student is a distilled DeiT: start a plain student from it (model=deit_tiny_plain, ...)"
    )


def resample_position_embeddings(student: nn.Module, pos_embed: torch.Tensor, source: str) -> torch.Tensor:
    # class (+ distillation) token(s): kept bit for bit; DeiT III (no_embed_class) has position embeddings on the
    # patches only
    prefix = 0 if getattr(student, "no_embed_class", False) else student.num_prefix_tokens
    new_grid = list(student.patch_embed.grid_size)
    old_tokens = pos_embed.shape[1] - prefix
    old_side = int(old_tokens**0.5)
    if old_side * old_side != old_tokens or pos_embed.shape[2] != student.pos_embed.shape[2]:
        raise DeitTrainError(
            f"model.init={source}: pos_embed {tuple(pos_embed.shape)} is not a square grid of this width; "
            f"this student expects {tuple(student.pos_embed.shape)}"
        )
    log.warning(
        "model.init: position embeddings resampled from %dx%d to %dx%d patches (bicubic)",
        old_side,
        old_side,
        *new_grid,
    )
    # As the official DeiT fine-tuning code: plain bicubic (timm's default adds antialiasing, another kernel).
    return resample_abs_pos_embed(
        pos_embed, new_size=new_grid, num_prefix_tokens=prefix, interpolation="bicubic", antialias=False
    )
