"""Read weights from the files users bring, without ever executing pickled code.

Accepted: a deit-train Lightning checkpoint (`.ckpt`, student weights under `student.`, or a task=mim run's
encoder under `model.encoder.`); a torch state dict (`.pth`/`.pt`, bare or wrapped as the official DeiT
`{"model": ...}` or timm's `{"state_dict": ...}`); `.safetensors`; or a directory: a Hugging Face transformers
DeiT (`config.json` with `model_type: deit` and its weights, any DeiT class, v4 or v5 names) or a timm export
(`config.json` with `architecture`, `model.safetensors`), as `deit-export` writes them. Weights are always
returned under timm's names.
"""

import json
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from torch import nn

from deit_train.errors import DeitTrainError
from deit_train.models.transformers_format import is_transformers_state, transformers_to_timm

StateDict = dict[str, torch.Tensor]


def read_checkpoint(path: str | Path) -> dict:
    """The raw object stored in a torch checkpoint, loaded with weights_only=True."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DeitTrainError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise DeitTrainError(
            f"{path} holds Python objects besides tensors and was refused (it is read with "
            f"weights_only=True so that no code inside it runs). Re-save it as a plain state dict "
            f"or .safetensors. Detail: {str(error).splitlines()[0]}"
        ) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise DeitTrainError(
            f"{path} is not a readable torch checkpoint (truncated or corrupt?): {error}"
        ) from error


@dataclass
class RunCheckpoint:
    """A deit-train Lightning checkpoint: the module's weights, the run config and the data's class names."""

    state_dict: StateDict
    config: dict | None
    class_names: list[str] | None

    @classmethod
    def of(cls, stored: object) -> "RunCheckpoint | None":
        """The checkpoint, or None when `stored` is not a Lightning checkpoint."""
        if not (
            isinstance(stored, dict) and "state_dict" in stored and "pytorch-lightning_version" in stored
        ):
            return None
        config = (stored.get("hyper_parameters") or {}).get("config")
        return cls(stored["state_dict"], config or None, stored.get("class_names"))

    def part(self, prefix: str) -> StateDict:
        """The weights of one submodule (`student.`, `ema.module.`, `model.encoder.`), prefix removed."""
        return {k.removeprefix(prefix): v for k, v in self.state_dict.items() if k.startswith(prefix)}


@dataclass
class Weights:
    state: StateDict
    class_names: list[str] | None = None  # known for deit-train checkpoints


def load_weights(path: str | Path) -> Weights:
    """Model weights from any accepted file or export directory, under timm's names, wrappers removed."""
    path = Path(path).expanduser()
    weights = load_export_directory(path) if path.is_dir() else load_weights_file(path)
    if is_transformers_state(weights.state):
        try:
            weights.state = transformers_to_timm(weights.state)
        except KeyError as error:
            raise DeitTrainError(f"{path}: unknown tensor in transformers DeiT weights: {error}") from error
    return weights


def load_weights_file(path: Path) -> Weights:
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise DeitTrainError(f"checkpoint {path} does not exist")
        try:
            return Weights(load_safetensors(str(path)))
        except (SafetensorError, OSError) as error:
            raise DeitTrainError(f"{path} is not a readable .safetensors file: {error}") from error
    stored = read_checkpoint(path)
    if not isinstance(stored, dict):
        raise DeitTrainError(f"{path} does not hold a state dict (found {type(stored).__name__})")
    run = RunCheckpoint.of(stored)
    if run is not None:
        # A classification run's student, or a masked-image-modeling run's encoder (task=mim).
        for prefix in ("student.", "model.encoder."):
            if student := run.part(prefix):
                return Weights(student, run.class_names)
        raise DeitTrainError(f"{path} is a Lightning checkpoint without student weights")
    for wrapper in ("model", "state_dict", "model_state"):
        if isinstance(stored.get(wrapper), dict):
            stored = stored[wrapper]
            break
    state = {k.removeprefix("module."): v for k, v in stored.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise DeitTrainError(f"{path} holds no tensors")
    return Weights(state)


def read_export_config(directory: Path) -> dict:
    """config.json of a transformers or timm export directory; anything else is refused by name."""
    config_file = directory / "config.json"
    not_an_export = (
        f"{directory} is a directory but not a DeiT export: expected config.json with the weights "
        f"(a transformers DeiT directory or one written by deit-export)"
    )
    if not config_file.is_file():
        inside = [f"{directory / name}" for name in ("transformers", "timm") if (directory / name).is_dir()]
        hint = f" (pass one of {inside})" if inside else ""
        raise DeitTrainError(f"{not_an_export}; config.json is missing{hint}")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DeitTrainError(f"{config_file} is not valid JSON: {error}") from error
    if config.get("model_type") != "deit" and "architecture" not in config:
        found = config.get("model_type") or config.get("architectures") or sorted(config)[:5]
        raise DeitTrainError(f"{not_an_export}; its config.json describes {found}")
    return config


def load_export_directory(directory: Path) -> Weights:
    config = read_export_config(directory)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            weights = load_weights_file(directory / name)
            break
    else:
        raise DeitTrainError(f"{directory} has a config.json but no model.safetensors or pytorch_model.bin")
    if config.get("model_type") == "deit":  # transformers
        labels = config.get("id2label") or {}
        names = [labels[key] for key in sorted(labels, key=int)]
        if names and names != [f"LABEL_{i}" for i in range(len(names))]:
            weights.class_names = names
    else:  # timm's save_for_hf layout
        weights.class_names = config.get("label_names")
    return weights


def load_into(model: nn.Module, state: StateDict, source: str, what: str) -> None:
    """Strictly load `state` into `model`; any missing, unexpected or mis-shaped tensor is named."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise DeitTrainError(
            f"{source} does not match the {what} architecture: "
            f"{len(missing)} missing tensors (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}). Is it a checkpoint of this model?"
        )
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise DeitTrainError(
                f"{source}: tensor {key} has shape {tuple(state[key].shape)} but the {what} "
                f"expects {tuple(tensor.shape)}"
            )
    model.load_state_dict(state, strict=True)


def classifier_keys(model: nn.Module) -> list[str]:
    """State-dict names of the classification head(s): `fc.*` of a ResNet, `head.*` and `head_dist.*` of a
    distilled DeiT, whatever timm's get_classifier() points at."""
    heads = model.get_classifier()
    heads = heads if isinstance(heads, tuple) else (heads,)
    ids = {id(param) for head in heads for param in head.parameters()}
    return [name for name, param in model.named_parameters() if id(param) in ids]
