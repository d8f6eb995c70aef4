"""Read weights from the files users bring, without ever executing pickled code.

Accepted: a deit-train Lightning checkpoint (`.ckpt`, student weights under `student.`), a torch state
dict (`.pth`/`.pt`, bare or wrapped as the official DeiT `{"model": ...}` or timm's
`{"state_dict": ...}`), or `.safetensors`.
"""

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from torch import nn

from deit_train.errors import DeitTrainError

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
class Weights:
    state: StateDict
    class_names: list[str] | None = None  # known for deit-train checkpoints


def load_weights(path: str | Path) -> Weights:
    """Model weights from any accepted file, with wrapper prefixes removed."""
    path = Path(path).expanduser()
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
    if "state_dict" in stored and "pytorch-lightning_version" in stored:
        student = {
            k.removeprefix("student."): v for k, v in stored["state_dict"].items() if k.startswith("student.")
        }
        if not student:
            raise DeitTrainError(f"{path} is a Lightning checkpoint without student weights")
        return Weights(student, stored.get("class_names"))
    for wrapper in ("model", "state_dict", "model_state"):
        if isinstance(stored.get(wrapper), dict):
            stored = stored[wrapper]
            break
    state = {k.removeprefix("module."): v for k, v in stored.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise DeitTrainError(f"{path} holds no tensors")
    return Weights(state)


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
