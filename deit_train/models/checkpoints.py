"""Read weights from the files users bring, without ever executing pickled code.

Accepted: a deit-train Lightning checkpoint (`.ckpt`, student weights under `student.`, or a task=mim run's
encoder under `model.encoder.`); a torch state dict (`.pth`/`.pt`, bare or wrapped as the official DeiT
`{"model": ...}` or timm's `{"state_dict": ...}`); `.safetensors`; or a directory: a Hugging Face transformers
DeiT or ViT (`config.json` with `model_type: deit` or `vit` and its weights, any of their classes, v4 or v5 names)
or a timm export (`config.json` with `architecture`, `model.safetensors`), as `deit-export` writes them. Weights
are always returned under timm's names.
"""

import argparse
import contextlib
import io
import json
import pickle
import pickletools
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from torch import nn

from deit_train.errors import DeitTrainError
from deit_train.models.hub import local_path
from deit_train.models.transformers_format import is_transformers_state, transformers_to_timm

StateDict = dict[str, torch.Tensor]


# Objects the official DeiT training checkpoints hold besides tensors (their `args`): plain data, safe to build.
SAFE_GLOBALS = [argparse.Namespace]


def describe_file(path: Path) -> str:
    """What a file is, from its first bytes: for the messages that say why it cannot serve."""
    if path.stat().st_size == 0:
        return "an empty file"
    with open(path, "rb") as file:
        head = file.read(1024)
    if head.startswith(b"PK\x03\x04"):  # torch's zip format, or another zip
        first = head[30 : 30 + int.from_bytes(head[26:28], "little")].decode(errors="replace")
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            return "a truncated torch checkpoint" if "/" in first else "a truncated zip archive"
        return "a torch checkpoint" if any(n.endswith("data.pkl") for n in names) else "a zip archive"
    if len(head) >= 9 and int.from_bytes(head[:8], "little") < path.stat().st_size and head[8:9] == b"{":
        return "a safetensors file"
    if head[:1] == b"\x80":
        return "a pickle file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = "\x00"
    if "\x00" in text:
        return f"not a checkpoint (unrecognised binary content starting {head[:8].hex(' ')})"
    first_line = text.strip().splitlines()[0][:40] if text.strip() else ""
    return f"a text file (starting {first_line!r})"


def source(flag: str, path: Path) -> str:
    """How a message names the file: `model.init=PATH`, or the bare PATH of a command's argument."""
    return f"{path}" if flag == "MODEL" else f"{flag} ({path})" if "=" in flag else f"{flag}={path}"


def read_torch_file(path: Path, flag: str, mmap: bool = False) -> object:
    """The object in a torch checkpoint, loaded with weights_only=True (no pickled code runs), or a DeitTrainError
    that says what the file is instead and what `flag` expects. `mmap`: its tensors mapped, not read (what a caller
    that wants the recorded config alone needs)."""
    named = source(flag, path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise DeitTrainError(f"{named} {what}: expected {EXPECTED[flag]}")
    kind = describe_file(path)
    if kind.startswith("a truncated"):
        if flag == "resume=true":  # the run's own last.ckpt: its other checkpoint may be whole
            raise DeitTrainError(
                f"{named} is {kind} (cut short); continue from the run's other checkpoint, "
                f"ckpt_path={path.parent / 'best.ckpt'}, if it is intact"
            )
        raise DeitTrainError(f"{named} is {kind} (cut short: an interrupted download or copy?); fetch it again")
    if kind not in ("a torch checkpoint", "a pickle file"):
        raise DeitTrainError(f"{named} is {kind}: expected {EXPECTED[flag]}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS), warnings.catch_warnings():
            # torch warns of any pickle protocol but 2 before refusing or reading: the outcome says all
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        if name := next(iter(foreign_globals(path)), None):
            raise DeitTrainError(
                f"{named} holds Python objects besides tensors ({name}), which loading would have to run as "
                f"code: refused. Where you trust the file, load it yourself and save the weights alone "
                f"(torch.save(model.state_dict(), ...) or safetensors)"
            ) from error
        raise DeitTrainError(f"{named} is {kind} that cannot be read as a checkpoint (corrupt?)") from error
    except Exception as error:  # a damaged file can make the unpickler fail in any way
        detail = str(error).splitlines()[0][:120] if str(error).strip() else type(error).__name__
        raise DeitTrainError(f"{named} is {kind} that cannot be read: truncated or corrupt ({detail})") from error


def foreign_globals(path: Path) -> list[str]:
    """The Python objects a pickle (or a torch checkpoint's data.pkl) names besides torch's tensors and plain
    containers, read from its opcodes without running it."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
        else:
            data = path.read_bytes()
    except (StopIteration, zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError):
        return []
    names, strings, stream = [], [], io.BytesIO(data)
    with contextlib.suppress(Exception):  # the end of the pickles (raw tensor bytes follow in the legacy format)
        while stream.tell() < len(data):
            for opcode, argument, _ in pickletools.genops(stream):
                if "UNICODE" in opcode.name:
                    strings.append(argument)
                elif opcode.name == "GLOBAL":
                    names.append(argument.replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
    plain = ("torch.", "collections.OrderedDict", "argparse.Namespace")
    return [name for name in names if not name.startswith(plain)]


# What each flag that reads a checkpoint expects, for the messages that refuse something else.
EXPECTED = {
    "resume=true": "a deit-train run checkpoint (<run>/checkpoints/last.ckpt)",
    "model.init": "a deit-train .ckpt, a timm or official DeiT .pth/.pt state dict, .safetensors, or a "
    "transformers / deit-export directory",
    "teacher.checkpoint": "a classifier's weights: a deit-train .ckpt, a .pth/.pt state dict, .safetensors, or a "
    "timm export directory",
    "MODEL": "a deit-train .ckpt or a deit-export directory",
}
EXPECTED["ckpt_path"] = EXPECTED["resume=true"] + "; to start from weights instead, use model.init"


@dataclass
class RunCheckpoint:
    """A deit-train Lightning checkpoint: the module's weights, the run config, the data's class names, the epoch
    it ended, and the prefix of the weights that start a student."""

    state_dict: StateDict
    config: dict | None
    class_names: list[str] | None
    epoch: int | None
    student_prefix: str
    weights_files: dict[str, str]  # the sha256 of the weights files its config names, by key (run_dir.weights_files)

    @classmethod
    def of(cls, stored: object) -> "RunCheckpoint | None":
        """The checkpoint, or None when `stored` is not a deit-train Lightning checkpoint."""
        if not (isinstance(stored, dict) and "state_dict" in stored and "pytorch-lightning_version" in stored):
            return None
        config = (stored.get("hyper_parameters") or {}).get("config")
        if not (isinstance(config, dict) and "model" in config and "loss" in config):
            return None
        metadata = stored.get("deit_train") or {}
        prefix, files = metadata.get("student", "student."), metadata.get("weights_files") or {}
        return cls(stored["state_dict"], config, stored.get("class_names"), stored.get("epoch"), prefix, files)

    def part(self, prefix: str) -> StateDict:
        """The weights of one submodule (`student.`, `ema.module.`, `model.encoder.`), prefix removed."""
        return {k.removeprefix(prefix): v for k, v in self.state_dict.items() if k.startswith(prefix)}

    @property
    def task(self) -> str | None:
        """The class of the task that trained it, as its run config names it (task._target_); None where it names
        none."""
        task = self.config.get("task")
        return task.get("_target_") if isinstance(task, dict) else None

    def model_config(self) -> DictConfig:
        """The model config that built its network, as build_student takes it to rebuild it (sizes, patch, kwargs: a
        timm name alone would not rebuild a custom DeiT), without its model.init or a download."""
        from deit_train.schema import ModelConfig

        model = self.config["model"]
        return OmegaConf.merge(OmegaConf.structured(ModelConfig), model, {"init": None, "pretrained": False})


def non_finite(state: dict) -> list[str]:
    """The names of a state dict's floating-point tensors that hold NaN or inf (a diverged run's weights)."""
    return [
        name for name, t in state.items() if torch.is_tensor(t) and t.is_floating_point() and not t.isfinite().all()
    ]


def is_lightning_checkpoint(stored: object) -> bool:
    return isinstance(stored, dict) and "pytorch-lightning_version" in stored


def read_run_checkpoint(path: str | Path, flag: str) -> RunCheckpoint:
    """A deit-train run checkpoint, or a DeitTrainError naming what the file is instead."""
    path = Path(path).expanduser()
    stored = read_torch_file(path, flag)
    run = RunCheckpoint.of(stored)
    if run is None:
        what = (
            "a Lightning checkpoint of another program"
            if is_lightning_checkpoint(stored)
            else "a state dict (weights only)"
            if isinstance(stored, dict)
            else f"a {type(stored).__name__}"
        )
        raise DeitTrainError(
            f"{source(flag, path)} is {what}, not a deit-train run checkpoint: expected {EXPECTED[flag]}"
        )
    return run


@dataclass
class Weights:
    state: StateDict
    class_names: list[str] | None = None  # known for deit-train checkpoints and exports
    run: RunCheckpoint | None = None  # a deit-train run's checkpoint: its config records the model and the task
    # the (mean, std) its network was trained on, where its timm export's config.json says (pretrained_cfg)
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None


def load_weights(path: str | Path, flag: str = "model.init") -> Weights:
    """Model weights from any accepted file or export directory (or a Hub model id: models/hub.py), under timm's
    names, wrappers removed."""
    path = local_path(path, flag)
    weights = load_export_directory(path, flag) if path.is_dir() else load_weights_file(path, flag)
    if path.name == "model.safetensors" and (path.parent / "config.json").is_file():  # the file of an export
        with contextlib.suppress(DeitTrainError):  # a folder that is no export: nothing to read
            weights.normalization = export_normalization(read_export_config(path.parent))
    if is_transformers_state(weights.state):
        try:
            weights.state = transformers_to_timm(weights.state)
        except KeyError as error:
            raise DeitTrainError(
                f"{source(flag, path)}: unknown tensor in transformers DeiT/ViT weights: {error}"
            ) from error
    return weights


def load_weights_file(path: Path, flag: str) -> Weights:
    if path.is_file() and describe_file(path) == "a safetensors file":
        try:
            return Weights(load_safetensors(str(path)))
        except (SafetensorError, OSError, ValueError) as error:
            raise DeitTrainError(
                f"{source(flag, path)} is a safetensors file that cannot be read (truncated or corrupt?): {error}"
            ) from error
    stored = read_torch_file(path, flag)
    if not isinstance(stored, dict):
        raise DeitTrainError(
            f"{source(flag, path)} holds a {type(stored).__name__}, not weights: expected {EXPECTED[flag]}"
        )
    if is_lightning_checkpoint(stored):
        run = RunCheckpoint.of(stored)
        if run is None:
            raise DeitTrainError(
                f"{source(flag, path)} is a Lightning checkpoint of another program: its weights are "
                f"named after that program's modules. Save the model's own state_dict() and pass "
                f"that file"
            )
        return Weights(run.part(run.student_prefix), run.class_names, run)
    for wrapper in ("model", "state_dict", "model_state", "module"):
        if isinstance(stored.get(wrapper), dict):
            stored = stored[wrapper]
            break
    state = {k.removeprefix("module."): v for k, v in stored.items() if isinstance(k, str) and torch.is_tensor(v)}
    if not state:
        raise DeitTrainError(
            f"{source(flag, path)} holds no tensors (keys: {sorted(map(str, stored))[:5]}): expected {EXPECTED[flag]}"
        )
    return Weights(state)


TRANSFORMERS_MODEL_TYPES = ("deit", "vit")  # config.json's model_type of the transformers classes we read


def read_export_config(directory: Path) -> dict:
    """config.json of a transformers or timm export directory; anything else is refused by name."""
    config_file = directory / "config.json"
    not_an_export = (
        f"{directory} is a directory but not a DeiT export: expected config.json with the weights "
        f"(a transformers DeiT or ViT directory, or one written by deit-export)"
    )
    if not config_file.is_file():
        inside = [f"{directory / name}" for name in ("transformers", "timm") if (directory / name).is_dir()]
        hint = f" (pass one of {inside})" if inside else ""
        missing = "is a folder, not a file" if config_file.exists() else "is missing"
        raise DeitTrainError(f"{not_an_export}; config.json {missing}{hint}")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DeitTrainError(f"{config_file} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise DeitTrainError(f"{config_file} holds a {type(config).__name__}, not a model config (a JSON object)")
    if config.get("model_type") not in TRANSFORMERS_MODEL_TYPES and "architecture" not in config:
        found = config.get("model_type") or config.get("architectures") or sorted(config)[:5]
        raise DeitTrainError(f"{not_an_export}; its config.json describes {found}")
    return config


def load_export_directory(directory: Path, flag: str) -> Weights:
    config = read_export_config(directory)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            weights = load_weights_file(directory / name, flag)
            break
    else:
        raise DeitTrainError(f"{directory} has a config.json but no model.safetensors or pytorch_model.bin")
    if config.get("model_type") in TRANSFORMERS_MODEL_TYPES:
        labels = config.get("id2label") or {}
        if not isinstance(labels, dict) or not all(str(key).isdigit() for key in labels):
            raise DeitTrainError(
                f'{directory}/config.json: id2label must map class indices ("0", "1", ...) to '
                f"names; it is {str(labels)[:60]}"
            )
        if sorted(int(key) for key in labels) != list(range(len(labels))):
            raise DeitTrainError(f"{directory}/config.json: id2label's indices are not 0..{len(labels) - 1}")
        names = [str(labels[key]) for key in sorted(labels, key=int)]
        if names and names != [f"LABEL_{i}" for i in range(len(names))]:
            weights.class_names = names
    else:  # timm's save_for_hf layout
        weights.class_names = config.get("label_names")
    weights.normalization = export_normalization(config)
    return weights


def export_normalization(config: dict) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The (mean, std) a timm export's config.json records for its network's input (pretrained_cfg), if any."""
    pretrained = config.get("pretrained_cfg") or {}
    if pretrained.get("mean") and pretrained.get("std"):
        return tuple(pretrained["mean"]), tuple(pretrained["std"])
    return None


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
