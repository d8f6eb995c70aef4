"""Start a student from trained weights (model.init=PATH): fine-tuning on new data or a new resolution.

A new resolution resamples the patch position embeddings (bicubic, class and distillation tokens kept as they are,
DeiT section 6.3 / FixRes). Any other difference in the backbone is an error that names the tensor. The heads are
decided once the data's classes are known (settle_heads; build_student does not know them):

- weights that name their classes: each of the data's classes takes the heads' row of its name (the same names in
  another order, or a subset of them: the rows are picked by name); model.init_class_map renames the weights'
  classes to the data's where they correspond under other names. Classes the weights do not have: both heads start
  fresh (fine-tuning onto new classes, docs/recipes.md), with one line saying so; the backbone is kept.
- weights that name none (a plain state dict): kept when their number of classes is the data's and, on the data,
  their outputs are not shown to be in another order (labels.py: OrderCheck, in tasks/classify.py); else both heads
  start fresh with one line (model.init_unchecked_order=true keeps them).
"""

import logging
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from timm.layers import resample_abs_pos_embed
from torch import nn

from deit_train.errors import DeitTrainError
from deit_train.labels import class_difference, shortened
from deit_train.models.architecture import network_sizes, overrides_for, recorded_sizes, same_architecture
from deit_train.models.checkpoints import classifier_keys, load_into, load_weights, non_finite

log = logging.getLogger(__name__)


@dataclass
class KeptHeads:
    """model.init's classification heads until the data's classes decide them: where from, the classes they were
    trained on (None: the weights do not name them, e.g. a plain state dict), their tensors, and the student's own
    initial heads (a fresh start)."""

    source: str
    class_names: list[str] | None
    weights: dict[str, torch.Tensor]
    fresh: dict[str, torch.Tensor]

    def start_fresh(self, student: nn.Module, why: str) -> None:
        """Both heads back to the student's initial ones, the backbone kept, with one line saying why."""
        set_heads(student, self.fresh, self.source)
        log.warning("model.init=%s: %s: both heads start fresh, the rest of its weights is kept", self.source, why)


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
    heads = classifier_keys(student)
    if weights.run is not None:
        check_recorded_architecture(weights.run.model_config(), student, state, source)
    check_distillation_token(state, expected, source)
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
    if resized and not weights.class_names:
        log.warning(
            "model.init: %d classes in %s, %d here: both heads start fresh",
            state[resized[0]].shape[0],
            source,
            expected[resized[0]].shape[0],
        )
        state.update({key: expected[key] for key in heads})
    elif had_heads and all(key in state for key in heads):
        # decided by settle_heads once the data's classes are known (build_student does not know them)
        student.kept_heads = KeptHeads(
            source,
            list(weights.class_names) if weights.class_names else None,
            {key: state[key] for key in heads},
            {key: expected[key].clone() for key in heads},
        )
        state.update({key: expected[key] for key in resized})  # loaded by settle_heads, row by row
    if "pos_embed" in expected and "pos_embed" in state and state["pos_embed"].shape != expected["pos_embed"].shape:
        state["pos_embed"] = resample_position_embeddings(student, state["pos_embed"], source)
    # Anything else that differs is an error naming the tensor.
    load_into(student, state, f"model.init={source}", "student")


def settle_heads(student: nn.Module, class_names: list[str], class_map: object = None) -> KeptHeads | None:
    """model.init's heads on the data's classes: by name where the weights name their classes (each data class takes
    the row of its name, after `class_map`: {the weights' name: the data's}; none for some: both heads fresh, one
    line), else returned for the check on the data (tasks/classify.py). Refuses a class map that does not fit."""
    class_map = pairs(class_map)
    kept = getattr(student, "kept_heads", None)
    if kept is None:
        if class_map:
            log.warning("model.init_class_map is unused: model.init's heads are not kept (see the line above)")
        return None
    del student.kept_heads  # decided once
    if kept.class_names is None:
        if class_map:
            raise DeitTrainError(
                f"model.init_class_map: model.init={kept.source} names no classes, so none can be mapped: save it "
                f"with its class names (a deit-train checkpoint or export names them), or drop the map"
            )
        return kept
    rows, missing = rows_by_name(kept, class_names, class_map)
    if missing and class_map:
        raise DeitTrainError(
            f"model.init_class_map: the data's classes {shortened(missing)} have no row in model.init={kept.source}'s "
            f"heads (its classes: {shortened(kept.class_names)}): map a class of the weights to each of them, or "
            f"drop the map to start both heads fresh"
        )
    if missing:
        difference = class_difference(kept.class_names, class_names, "its heads", "the data")
        kept.start_fresh(
            student,
            f"its classes are not the data's ({difference}); model.init_class_map={{its_name: data_name, ...}} keeps "
            f"its heads where the classes correspond",
        )
        return None
    set_heads(student, {key: tensor[rows] for key, tensor in kept.weights.items()}, kept.source)
    if rows != list(range(len(kept.class_names))):
        log.warning(
            "model.init: its heads' rows taken by class name (%d of its %d classes, in the data's order)",
            len(rows),
            len(kept.class_names),
        )
    return None


def pairs(class_map: object) -> dict[str, str]:
    """model.init_class_map as {name in the weights: name in the data}: from a mapping, or from [[name, name], ...]."""
    if class_map is None:
        return {}
    if isinstance(class_map, Mapping):
        return {str(theirs): str(ours) for theirs, ours in class_map.items()}
    is_pair = lambda pair: isinstance(pair, Sequence) and not isinstance(pair, str) and len(pair) == 2  # noqa: E731
    if isinstance(class_map, Sequence) and not isinstance(class_map, str) and all(map(is_pair, class_map)):
        return {str(theirs): str(ours) for theirs, ours in class_map}
    raise DeitTrainError(
        f"model.init_class_map={class_map!r}: give {{name_in_weights: name_in_data, ...}}, or "
        f"[[name in weights, name in data], ...] for names with spaces"
    )


def rows_by_name(kept: KeptHeads, class_names: list[str], class_map: dict) -> tuple[list[int], list[str]]:
    """The weights' row for each of the data's classes, by name (after `class_map`, names compared in Unicode NFC),
    and the data's classes without one. Refuses a map that names classes neither side has."""
    unknown = [name for name in class_map if name not in kept.class_names]
    strays = [name for name in class_map.values() if name not in class_names]
    if unknown or strays:
        what = f"{shortened(unknown)} are not classes of model.init={kept.source}" if unknown else ""
        what += "; " if unknown and strays else ""
        what += f"{shortened(strays)} are not classes of the data" if strays else ""
        raise DeitTrainError(
            f"model.init_class_map: {what} (its classes: {shortened(kept.class_names)}; the data's: "
            f"{shortened(class_names)}): write it as {{name in the weights: name in the data}}"
        )
    nfc = lambda name: unicodedata.normalize("NFC", str(name))  # noqa: E731
    row = {}
    for index, name in enumerate(kept.class_names):
        row.setdefault(nfc(class_map.get(name, name)), index)
    rows = [row.get(nfc(name)) for name in class_names]
    return [r for r in rows if r is not None], [name for name, r in zip(class_names, rows, strict=True) if r is None]


def set_heads(student: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    with torch.no_grad():
        for key, tensor in tensors.items():
            parameter = student.get_parameter(key)
            if parameter.shape != tensor.shape:
                raise DeitTrainError(
                    f"model.init={source}: tensor {key} has shape {tuple(tensor.shape)} but the student expects "
                    f"{tuple(parameter.shape)}"
                )
            parameter.copy_(tensor)


def check_recorded_architecture(recorded: DictConfig, student: nn.Module, state: dict, source: str) -> None:
    """A deit-train run's weights start a student of the architecture the run recorded (its name, and its ViT sizes);
    another is refused naming both and the overrides that build the recorded one. Another image size is the same
    architecture: the position embeddings are resampled (the 384 px fine-tuning presets start from 224 px runs)."""
    configured = getattr(student, "pretrained_cfg", {}).get("architecture")
    run = f"model.init={source} is a deit-train run of {recorded.name}"
    fix = f"start from it with {overrides_for(recorded)}"
    if recorded_sizes(recorded):
        fix += " (at any model.img_size: its position embeddings are resampled)"
    if configured is not None and not same_architecture(recorded.name, configured):
        raise DeitTrainError(f"{run}, not model.name={configured}: {fix}")
    expected = student.state_dict()
    backbone = set(expected) - set(classifier_keys(student)) - {"pos_embed"}
    mismatched = backbone ^ (set(state) - set(classifier_keys(student)) - {"pos_embed"})
    mismatched |= {key for key in backbone & set(state) if state[key].shape != expected[key].shape}
    if mismatched and network_sizes(student) and recorded_sizes(recorded) != network_sizes(student):
        raise DeitTrainError(
            f"{run} with {recorded_sizes(recorded) or 'its own sizes'}, not this student's {network_sizes(student)}: "
            f"{fix}"
        )


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
