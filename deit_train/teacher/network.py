"""The teacher's network: any timm classifier, with weights from a checkpoint or the timm hub, frozen."""

import torch
from omegaconf import DictConfig
from torch import nn

from deit_train.errors import DeitTrainError
from deit_train.models.checkpoints import classifier_keys, load_into, load_weights
from deit_train.models.student import create_timm_model


def build_teacher_network(cfg: DictConfig, class_names: list[str]) -> nn.Module:
    """A teacher whose classes are the data's, frozen and in eval mode. Refuses a teacher without weights."""
    num_classes = len(class_names)
    if cfg.checkpoint:
        teacher = create_timm_model(cfg.name, "teacher", pretrained=False, num_classes=num_classes)
        weights = load_weights(cfg.checkpoint, "teacher.checkpoint")
        check_teacher_classes(teacher, weights.state, weights.class_names, class_names, cfg.checkpoint)
        load_into(teacher, weights.state, f"teacher.checkpoint={cfg.checkpoint}", f"teacher {cfg.name}")
    elif cfg.pretrained:
        teacher = create_timm_model(cfg.name, "teacher", pretrained=True)
        if teacher.num_classes != num_classes:
            raise DeitTrainError(
                f"the pretrained teacher {cfg.name} predicts {teacher.num_classes} classes but the data has "
                f"{num_classes}. Fine-tune a teacher on this data first "
                f"(deit-train model=timm model.name={cfg.name} model.pretrained=true loss=ce) and pass "
                f"teacher.checkpoint=<its checkpoints/best.ckpt>."
            )
    else:
        raise DeitTrainError(
            f"the teacher {cfg.name} has no weights: a random teacher would teach noise. Pass "
            f"teacher.checkpoint=PATH (deit-train .ckpt, .pth or .safetensors) or teacher.pretrained=true."
        )
    teacher.requires_grad_(False)
    # channels_last: the faster convolution layout on GPUs and on CPUs with oneDNN; no effect on ViT teachers.
    return teacher.eval().to(memory_format=torch.channels_last)


def teacher_members(teacher: DictConfig) -> list[DictConfig]:
    """The networks of the teacher config: its members (teacher=ensemble), or the teacher itself."""
    return list(teacher.members) if teacher.members else [teacher]


def member_img_sizes(teacher: DictConfig) -> list[int | None]:
    """The resolution each teacher network sees the views at: its own img_size, else teacher.img_size (None: the
    student's)."""
    return [
        member.img_size if member.img_size is not None else teacher.img_size
        for member in teacher_members(teacher)
    ]


def check_teacher_classes(
    teacher: nn.Module,
    state: dict,
    teacher_class_names: list[str] | None,
    class_names: list[str],
    source: str,
) -> None:
    classifier_weight = next(key for key in classifier_keys(teacher) if key.endswith("weight"))
    if classifier_weight in state and state[classifier_weight].shape[0] != len(class_names):
        raise DeitTrainError(
            f"teacher checkpoint {source} has {state[classifier_weight].shape[0]} classes "
            f"({classifier_weight} {tuple(state[classifier_weight].shape)}) but the data has {len(class_names)}. "
            f"Train or fine-tune the teacher on this data (deit-train model=timm loss=ce ...)."
        )
    if teacher_class_names is not None and list(teacher_class_names) != list(class_names):
        raise DeitTrainError(
            f"teacher checkpoint {source} was trained on other classes than the data's "
            f"(teacher: {list(teacher_class_names)[:5]}..., data: {class_names[:5]}...): its predictions "
            f"would be read as the wrong labels."
        )
