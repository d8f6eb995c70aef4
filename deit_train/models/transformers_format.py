"""One key mapping between timm's VisionTransformerDistilled and Hugging Face transformers' DeiT, both ways.

timm                                transformers (v5 names; v4 names in brackets, read only)
cls_token, dist_token, pos_embed    deit.embeddings.{cls_token, distillation_token, position_embeddings}
patch_embed.proj                    deit.embeddings.patch_embeddings.projection
blocks.i.norm1 / norm2              deit.layers.i.layernorm_before / layernorm_after   [deit.encoder.layer.i.]
blocks.i.attn.qkv (fused q;k;v)     deit.layers.i.attention.{q,k,v}_proj   [attention.attention.{query,key,value}]
blocks.i.attn.proj                  deit.layers.i.attention.o_proj         [attention.output.dense]
blocks.i.mlp.fc1 / fc2              deit.layers.i.mlp.fc1 / fc2            [intermediate.dense / output.dense]
norm                                deit.layernorm
head / head_dist                    cls_classifier / distillation_classifier  (WithTeacher)
                                    classifier (DeiTForImageClassification: class token only)

Both put the tokens in the same order (class, distillation, patches). timm's LayerNorm eps is 1e-6 and
transformers' DeiT default is 1e-12, so an exported config says 1e-6.
"""

import re

import torch

StateDict = dict[str, torch.Tensor]

# Per-block names without the `blocks.i.` / `deit.layers.i.` prefix, timm -> transformers (v5).
_BLOCK = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.proj": "attention.o_proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_TOP = {
    "cls_token": "deit.embeddings.cls_token",
    "dist_token": "deit.embeddings.distillation_token",
    "pos_embed": "deit.embeddings.position_embeddings",
    "patch_embed.proj": "deit.embeddings.patch_embeddings.projection",
    "norm": "deit.layernorm",
    "head": "cls_classifier",
    "head_dist": "distillation_classifier",
}
# transformers v4 names (still on the hub) -> v5 names; applied before reading.
_V4_TO_V5 = [
    (r"\.encoder\.layer\.", ".layers."),
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
]


_HEADS = ("cls_classifier.", "distillation_classifier.", "classifier.")
# DeiTForMaskedImageModeling's mask token and pixel decoder: pre-training only, not part of a classifier.
_MIM_ONLY = ("deit.embeddings.mask_token", "embeddings.mask_token", "decoder.")


def is_transformers_state(state: StateDict) -> bool:
    """Whether `state` uses transformers' DeiT names (with or without the `deit.` base-model prefix)."""
    return any(re.match(r"^(deit\.)?embeddings\.patch_embeddings\.", key) for key in state)


def timm_to_transformers(state: StateDict) -> StateDict:
    """A timm VisionTransformerDistilled state dict under DeiTForImageClassificationWithTeacher's names."""
    converted = {}
    for key, tensor in state.items():
        name, _, param = key.rpartition(".")
        if key in _TOP:  # parameters without a .weight/.bias suffix
            converted[_TOP[key]] = tensor
        elif name in _TOP:
            converted[f"{_TOP[name]}.{param}"] = tensor
        elif match := re.match(r"^blocks\.(\d+)\.(.+)$", name):
            block, inner = match.groups()
            prefix = f"deit.layers.{block}."
            if inner == "attn.qkv":
                for part, chunk in zip("qkv", tensor.chunk(3, dim=0), strict=True):
                    converted[f"{prefix}attention.{part}_proj.{param}"] = chunk.clone()
            elif inner in _BLOCK:
                converted[f"{prefix}{_BLOCK[inner]}.{param}"] = tensor
            else:
                raise KeyError(f"no transformers name for timm tensor {key}")
        else:
            raise KeyError(f"no transformers name for timm tensor {key}")
    return converted


def transformers_to_timm(state: StateDict) -> StateDict:
    """A transformers DeiT state dict (v4 or v5 names; any of the DeiT classes)
    under timm's VisionTransformerDistilled names. DeiTModel's pooler and DeiTForMaskedImageModeling's mask token
    and decoder, which a timm classifier lacks, are dropped; a single
    `classifier` (DeiTForImageClassification) becomes `head`; the caller decides what the distillation
    head starts from."""
    renamed = {}
    for key, tensor in state.items():
        if key.startswith(_MIM_ONLY):
            continue
        if not key.startswith(("deit.", *_HEADS)):  # DeiTModel saves without the base-model prefix
            key = "deit." + key
        for old, new in _V4_TO_V5:
            key = re.sub(old, new, key)
        renamed[key] = tensor
    to_timm_top = {v: k for k, v in _TOP.items()} | {"classifier": "head"}
    to_timm_block = {v: k for k, v in _BLOCK.items()}
    converted: StateDict = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in renamed.items():
        name, _, param = key.rpartition(".")
        if key in to_timm_top:
            converted[to_timm_top[key]] = tensor
        elif name in to_timm_top:
            converted[f"{to_timm_top[name]}.{param}"] = tensor
        elif name.startswith("deit.pooler."):
            continue
        elif match := re.match(r"^deit\.layers\.(\d+)\.(.+)$", name):
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


def transformers_config(student: torch.nn.Module, class_names: list[str]) -> dict:
    """DeiTConfig fields that rebuild `student` (a timm VisionTransformerDistilled) in transformers."""
    block = student.blocks[0]
    return {
        "model_type": "deit",
        "architectures": ["DeiTForImageClassificationWithTeacher"],
        "image_size": student.patch_embed.img_size[0],
        "patch_size": student.patch_embed.patch_size[0],
        "num_channels": student.patch_embed.proj.in_channels,
        "hidden_size": student.embed_dim,
        "num_hidden_layers": len(student.blocks),
        "num_attention_heads": block.attn.num_heads,
        "intermediate_size": block.mlp.fc1.out_features,
        "hidden_act": "gelu",  # timm's nn.GELU: the exact (erf) form
        "qkv_bias": block.attn.qkv.bias is not None,
        "layer_norm_eps": block.norm1.eps,  # 1e-6 in timm; transformers' default 1e-12 would drift
        "encoder_stride": student.patch_embed.patch_size[0],
        "id2label": dict(enumerate(class_names)),
        "label2id": {name: index for index, name in enumerate(class_names)},
    }
