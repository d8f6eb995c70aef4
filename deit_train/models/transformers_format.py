"""One key mapping between timm's ViTs and Hugging Face transformers' DeiT and ViT classes, both ways.

transformers' DeiT and ViT share their encoder names and differ in the base-model prefix (`deit.` / `vit.`; none in
DeiTModel / ViTModel files) and in DeiT's distillation token. Names below are without that prefix.

timm                                transformers (v5 names; v4 names in brackets, read only)
cls_token, dist_token, pos_embed    embeddings.{cls_token, distillation_token, position_embeddings}
patch_embed.proj                    embeddings.patch_embeddings.projection
blocks.i.norm1 / norm2              layers.i.layernorm_before / layernorm_after   [encoder.layer.i.]
blocks.i.attn.qkv (fused q;k;v)     layers.i.attention.{q,k,v}_proj   [attention.attention.{query,key,value}]
blocks.i.attn.proj                  layers.i.attention.o_proj         [attention.output.dense]
blocks.i.mlp.fc1 / fc2              layers.i.mlp.fc1 / fc2            [intermediate.dense / output.dense]
norm                                layernorm
outside the base model:
head, head_dist                     cls_classifier, distillation_classifier   (DeiTForImageClassificationWithTeacher)
head                                classifier     (DeiTForImageClassification, ViTForImageClassification)
mask_token, decoder.0 (mim/model)   embeddings.mask_token (in the base), decoder.0   (...ForMaskedImageModeling)
-                                   pooler.dense   (DeiTModel / ViTModel; not written, dropped on reading)

Both put the tokens in the same order (class, distillation, patches). timm's LayerNorm eps is 1e-6 and
transformers' default is 1e-12, so an exported config says 1e-6.
"""

import re

import torch
from torch import nn

from deit_train.errors import DeitTrainError

StateDict = dict[str, torch.Tensor]

# Per-block names without the `blocks.i.` / `layers.i.` prefix, timm -> transformers (v5).
_BLOCK = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.proj": "attention.o_proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
# Inside the base model, timm -> transformers.
_BASE = {
    "cls_token": "embeddings.cls_token",
    "dist_token": "embeddings.distillation_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj": "embeddings.patch_embeddings.projection",
    "norm": "layernorm",
    "mask_token": "embeddings.mask_token",
}
# Outside the base model, per transformers class: timm -> transformers.
WITH_TEACHER_HEADS = {"head": "cls_classifier", "head_dist": "distillation_classifier"}
CLASSIFIER_HEAD = {"head": "classifier"}
MIM_DECODER = {"decoder.0": "decoder.0"}
# transformers v4 names (still on the hub) -> v5 names, on names without the base prefix; applied before reading.
_V4_TO_V5 = [
    (r"^encoder\.layer\.", "layers."),
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
]
# Read from transformers, never part of a timm classifier: DeiTModel's pooler, the masked-image-modeling parts.
_DROPPED = ("pooler.", "embeddings.mask_token", "decoder.")


def require_transformers(what: str):
    """The transformers package, or one DeitTrainError naming the extra that installs it."""
    try:
        import transformers
    except ImportError as error:
        raise DeitTrainError(f"{what} needs transformers: pip install 'deit-train[hf]'") from error
    return transformers


def is_transformers_state(state: StateDict) -> bool:
    """Whether `state` uses transformers' DeiT or ViT names (with or without the base-model prefix)."""
    return any(re.match(r"^((deit|vit)\.)?embeddings\.patch_embeddings\.", key) for key in state)


def timm_to_transformers(
    state: StateDict, base: str = "deit", outside: dict[str, str] = WITH_TEACHER_HEADS
) -> StateDict:
    """A timm ViT state dict (with mim/model.py's mask_token and decoder where present) under a transformers
    class's names: the encoder under `base.` (deit, vit; "" for DeiTModel / ViTModel), the tensors named in
    `outside` (the class's heads or decoder, timm -> transformers) beside it. Any other tensor is a KeyError."""
    prefix = f"{base}." if base else ""
    converted = {}
    for key, tensor in state.items():
        name, _, param = key.rpartition(".")
        if key in _BASE:  # parameters without a .weight/.bias suffix
            converted[prefix + _BASE[key]] = tensor
        elif name in _BASE:
            converted[f"{prefix}{_BASE[name]}.{param}"] = tensor
        elif name in outside:
            converted[f"{outside[name]}.{param}"] = tensor
        elif match := re.match(r"^blocks\.(\d+)\.(.+)$", name):
            block, inner = match.groups()
            layer = f"{prefix}layers.{block}."
            if inner == "attn.qkv":
                for part, chunk in zip("qkv", tensor.chunk(3, dim=0), strict=True):
                    converted[f"{layer}attention.{part}_proj.{param}"] = chunk.clone()
            elif inner in _BLOCK:
                converted[f"{layer}{_BLOCK[inner]}.{param}"] = tensor
            else:
                raise KeyError(f"no transformers name for timm tensor {key}")
        else:
            raise KeyError(f"no transformers name for timm tensor {key}")
    return converted


def transformers_to_timm(state: StateDict) -> StateDict:
    """A transformers DeiT or ViT state dict (v4 or v5 names; any of their classes) under timm's names. The pooler,
    mask token and decoder, which a timm classifier lacks, are dropped; `classifier` and `cls_classifier` become
    `head`, `distillation_classifier` `head_dist`; the caller decides what a missing head starts from."""
    to_timm = {v: k for k, v in _BASE.items()} | {
        "classifier": "head",
        "cls_classifier": "head",
        "distillation_classifier": "head_dist",
    }
    to_timm_block = {v: k for k, v in _BLOCK.items()}
    converted: StateDict = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        key = re.sub(r"^(deit|vit)\.", "", key)
        for old, new in _V4_TO_V5:
            key = re.sub(old, new, key)
        if key.startswith(_DROPPED):
            continue
        name, _, param = key.rpartition(".")
        if key in to_timm:
            converted[to_timm[key]] = tensor
        elif name in to_timm:
            converted[f"{to_timm[name]}.{param}"] = tensor
        elif match := re.match(r"^layers\.(\d+)\.(.+)$", name):
            block, inner = match.groups()
            if part := re.fullmatch(r"attention\.([qkv])_proj", inner):
                qkv.setdefault((block, param), {})[part.group(1)] = tensor
            elif inner in to_timm_block:
                converted[f"blocks.{block}.{to_timm_block[inner]}.{param}"] = tensor
            else:
                raise KeyError(f"no timm name for transformers tensor {key}")
        else:
            raise KeyError(f"no timm name for transformers tensor {key}")
    for (block, param), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"block {block}: attention {param} lacks one of q/k/v (found {sorted(parts)})")
        converted[f"blocks.{block}.attn.qkv.{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return converted


def transformers_config(encoder: torch.nn.Module, class_names: list[str], architecture: str) -> dict:
    """DeiTConfig / ViTConfig fields that rebuild `encoder` (a timm VisionTransformer or VisionTransformerDistilled)
    as the transformers class `architecture`; model_type says which config."""
    block = encoder.blocks[0]
    labels = {"id2label": dict(enumerate(class_names)), "label2id": {n: i for i, n in enumerate(class_names)}}
    return {
        "model_type": "deit" if architecture.startswith("DeiT") else "vit",
        "architectures": [architecture],
        "image_size": encoder.patch_embed.img_size[0],
        "patch_size": encoder.patch_embed.patch_size[0],
        "num_channels": encoder.patch_embed.proj.in_channels,
        "hidden_size": encoder.embed_dim,
        "num_hidden_layers": len(encoder.blocks),
        "num_attention_heads": block.attn.num_heads,
        "intermediate_size": block.mlp.fc1.out_features,
        "hidden_act": "gelu",  # timm's nn.GELU: the exact (erf) form
        "qkv_bias": block.attn.qkv.bias is not None,
        "layer_norm_eps": block.norm1.eps,  # 1e-6 in timm; transformers' default 1e-12 would drift
        "encoder_stride": encoder.patch_embed.patch_size[0],  # the masked-image-modeling decoder's upsampling
        **(labels if class_names else {}),
    }


def why_no_transformers_class(model: torch.nn.Module) -> str | None:
    """What in `model` transformers' DeiT and ViT classes have no place for, in a few words; None when one of them
    holds it exactly (a timm ViT as DeiT trains it: pre-norm blocks, exact GELU, the class token's head)."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        return f"a {type(model).__name__} (its DeiT and ViT classes hold timm's VisionTransformer)"
    blocks = list(model.blocks)
    problems = [
        (any(not isinstance(block.ls1, nn.Identity) for block in blocks), "LayerScale (DeiT III)"),
        (model.no_embed_class, "position embeddings on the patches only (DeiT III)"),
        (any(type(block) is not Block for block in blocks), f"{type(blocks[0]).__name__} blocks"),
        (model.global_pool != "token", f"global_pool={model.global_pool!r} (transformers reads the class token)"),
        (model.num_prefix_tokens != (2 if isinstance(model, VisionTransformerDistilled) else 1), "register tokens"),
        (not isinstance(model.norm_pre, nn.Identity) or not isinstance(model.fc_norm, nn.Identity), "norm_pre/fc_norm"),
        (any(not isinstance(block.attn.q_norm, nn.Identity) for block in blocks), "QK normalisation"),
        (
            any(getattr(block.mlp.act, "approximate", None) != "none" for block in blocks),
            "an MLP activation other than the exact GELU",
        ),
        (model.patch_embed.proj.bias is None, "a patch embedding without bias"),
    ]
    return next((reason for problem, reason in problems if problem), None)
