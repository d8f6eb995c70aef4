"""Whether a deit-train run's checkpoint holds the network a config names: the comparison a run checkpoint given as
teacher.checkpoint (teacher/network.py) and as model.init (models/init.py) both make before loading it, so that
another architecture is refused naming both instead of listing tensors that do not fit."""

from functools import lru_cache

import timm
import torch
from omegaconf import DictConfig
from timm.models import split_model_name_tag
from torch import nn

from deit_train.schema import VIT_ARCHITECTURE_FIELDS


@lru_cache(maxsize=64)
def same_architecture(name: str, other: str) -> bool:
    """Whether two timm names build the same network but for its input size: one architecture with another weights
    tag (resnet50.a1_in1k is resnet50), or the same class whose tensors have the same shapes except the position
    embeddings (deit_base_distilled_patch16_384 is deit_base_distilled_patch16_224 at 384 px: model.init resamples
    them). Both built on the meta device: no weights, no memory, a fraction of a second."""
    name, other = split_model_name_tag(name)[0], split_model_name_tag(other)[0]
    if name == other:
        return True
    if not (timm.is_model(name) and timm.is_model(other)):
        return False
    try:
        with torch.device("meta"):
            networks = [timm.create_model(arch, pretrained=False, num_classes=1) for arch in (name, other)]
    except (RuntimeError, NotImplementedError, TypeError, ValueError):  # a network whose construction reads values
        return False  # two names, and no way to show them one network
    shapes = [{k: v.shape for k, v in network.state_dict().items() if k != "pos_embed"} for network in networks]
    return type(networks[0]) is type(networks[1]) and shapes[0] == shapes[1]


def recorded_sizes(model: DictConfig) -> str:
    """The ViT sizes a run's model config set, as `patch_size=4 embed_dim=32 ...` (empty: the architecture's own)."""
    return " ".join(f"{key}={model[key]}" for key in VIT_ARCHITECTURE_FIELDS if model.get(key) is not None)


def network_sizes(network: nn.Module) -> str:
    """A built ViT's sizes, as recorded_sizes writes them (empty for another network)."""
    if not (hasattr(network, "patch_embed") and hasattr(network, "blocks") and len(network.blocks)):
        return ""
    blocks = network.blocks
    sizes = (network.patch_embed.patch_size[0], network.embed_dim, len(blocks), blocks[0].attn.num_heads)
    return " ".join(f"{key}={size}" for key, size in zip(VIT_ARCHITECTURE_FIELDS, sizes, strict=True))


def overrides_for(model: DictConfig) -> str:
    """The model group overrides that build a run's recorded network: its conf/model preset (`model=deit_tiny`),
    else its name, ViT sizes and timm.create_model arguments (model.kwargs)."""
    preset = preset_for(model)
    if preset is not None:
        return f"model={preset}"
    sizes = [f"model.{size}" for size in recorded_sizes(model).split()]
    named = [f"model.name={model.name}", *sizes] if sizes else [f"model=timm model.name={model.name}"]
    named += [f"+model.kwargs.{key}={value}" for key, value in (model.get("kwargs") or {}).items()]
    return " ".join(named)


def preset_for(model: DictConfig) -> str | None:
    """The conf/model preset whose own file names this model config's network (its name, ViT sizes and kwargs), at
    its image size where one is; None where none does."""
    from pathlib import Path

    from omegaconf import OmegaConf

    import deit_train.conf  # the config groups (deit_train.config registers the schemas: it imports the tasks)

    found = []
    for path in sorted(Path(deit_train.conf.__file__).parent.joinpath("model").glob("*.yaml")):
        preset = OmegaConf.load(path)
        same = (
            preset.get("name") == model.name
            and all(preset.get(key) == model.get(key) for key in VIT_ARCHITECTURE_FIELDS)
            and dict(preset.get("kwargs") or {}) == dict(model.get("kwargs") or {})
        )
        if same:
            found.append((preset.get("img_size", 224) != model.img_size, path.stem))
    return min(found)[1] if found else None
