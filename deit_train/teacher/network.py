"""The teacher's network, frozen: any timm classifier, with weights from a checkpoint or the timm hub, or a
transformers image classifier directory (library=transformers, teacher=hf)."""

import torch
from omegaconf import DictConfig
from torch import nn

from deit_train.data.pixels import IMAGENET_MEAN, IMAGENET_STD
from deit_train.errors import DeitTrainError
from deit_train.labels import check_same_classes
from deit_train.models.checkpoints import RunCheckpoint, classifier_keys, load_into, load_weights
from deit_train.models.hub import local_path
from deit_train.models.student import create_timm_model
from deit_train.models.transformers_format import require_transformers
from deit_train.schema import teacher_without_weights


def build_teacher_network(cfg: DictConfig, class_names: list[str], img_size: int | None = None) -> nn.Module:
    """A teacher whose classes are the data's, frozen and in eval mode, seeing img_size px views (None: a tool that
    builds it without views, at the size its weights were trained at where they say). Refuses a teacher
    without weights, and one whose class names are not the data's. `unnamed` on the network says where its weights
    came from when they name no classes (their order is then checked on the data: tasks/classify.py), else None."""
    num_classes = len(class_names)
    unnamed = None
    if cfg.library == "transformers":
        teacher = build_transformers_classifier(cfg.name, class_names)
        unnamed = None if teacher.named else f"teacher.name={cfg.name} (its id2label says LABEL_0, LABEL_1, ...)"
    elif cfg.checkpoint:
        weights = load_weights(cfg.checkpoint, "teacher.checkpoint")
        if weights.run is not None:  # a deit-train run: the task it records rebuilds its network
            teacher = trained_network(cfg, weights.run, class_names, img_size)
        else:
            teacher = create_timm_model(cfg.name, "teacher", pretrained=False, num_classes=num_classes)
            check_teacher_classes(teacher, weights.state, weights.class_names, class_names, cfg.checkpoint)
            load_into(teacher, weights.state, f"teacher.checkpoint={cfg.checkpoint}", f"teacher {cfg.name}")
            if weights.normalization is not None:  # a timm export (deit-export's): what it was trained on
                mean, std = weights.normalization
                teacher.pretrained_cfg = {**(teacher.pretrained_cfg or {}), "mean": mean, "std": std}
            if weights.class_names is None:
                unnamed = f"teacher.checkpoint={cfg.checkpoint} (weights without class names)"
    elif cfg.pretrained:
        teacher = create_timm_model(cfg.name, "teacher", pretrained=True)
        if teacher.num_classes != num_classes:
            raise DeitTrainError(
                f"the pretrained teacher {cfg.name} predicts {teacher.num_classes} classes but the data has "
                f"{num_classes}. Fine-tune a teacher on this data first "
                f"(deit-train model=timm model.name={cfg.name} model.pretrained=true loss=ce) and pass "
                f"teacher.checkpoint=<its checkpoints/best.ckpt>."
            )
        unnamed = f"the pretrained {cfg.name} (timm hub weights)"
    else:
        raise teacher_without_weights(cfg.name)  # schema.check_teacher refuses it before a run starts
    teacher.requires_grad_(False)
    teacher.unnamed = unnamed
    # channels_last: the faster convolution layout on GPUs and on CPUs with oneDNN; no effect on ViT teachers.
    return teacher.eval().to(memory_format=torch.channels_last)


def trained_network(cfg: DictConfig, run: RunCheckpoint, class_names: list[str], img_size: int | None) -> nn.Module:
    """The network a deit-train run trained, rebuilt by the task its checkpoint records (tasks/task.py: a classify
    run's student, its two heads averaged; a task=mim run, without classifier heads, is refused naming the
    fine-tuning). A teacher.name of another architecture is refused naming both (a tag such as resnet50.a1_in1k names
    weights, not another network: models/architecture.py), and so are views of another size where the network fixes
    its input size (a ViT's patch grid; a convnet takes any)."""
    from pathlib import Path

    from deit_train.models.architecture import same_architecture
    from deit_train.tasks.task import task_of

    model = run.model_config()
    recorded = f"teacher.checkpoint={cfg.checkpoint} is a deit-train run of {model.name} at {model.img_size} px"
    entry = " (a teacher.members entry: its {})"
    path = Path(cfg.checkpoint)
    network = task_of(run, path).inference_model(run, path, ema=False, classifier=True).model  # a task=mim run: no
    if not same_architecture(cfg.name, model.name):
        raise DeitTrainError(
            f"{recorded}, not teacher.name={cfg.name}: set teacher.name={model.name}{entry.format('name')}"
        )
    patches = getattr(network, "patch_embed", None)
    fixed = patches is not None and getattr(patches, "strict_img_size", False)
    if fixed and img_size not in (None, model.img_size):
        raise DeitTrainError(
            f"{recorded}, but would see {img_size} px views: set teacher.img_size={model.img_size}"
            f"{entry.format('img_size')}"
        )
    check_teacher_classes(network, run.part("student."), run.class_names, class_names, cfg.checkpoint)
    # It learned on the views deit-train feeds every network (ImageNet's mean/std: data/pixels.py), whatever its timm
    # architecture's own pretrained normalisation (vit_tiny_patch16_224's 0.5/0.5), which TeacherNetwork would apply.
    network.pretrained_cfg = {
        **(getattr(network, "pretrained_cfg", None) or {}),
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    }
    return network


def teacher_members(teacher: DictConfig) -> list[DictConfig]:
    """The networks of the teacher config: its members (teacher=ensemble), or the teacher itself."""
    return list(teacher.members) if teacher.members else [teacher]


def member_img_sizes(teacher: DictConfig) -> list[int | None]:
    """The resolution each teacher network sees the views at: its own img_size, else teacher.img_size (None: the
    student's)."""
    return [member.img_size if member.img_size is not None else teacher.img_size for member in teacher_members(teacher)]


def check_teacher_classes(
    teacher: nn.Module,
    state: dict,
    teacher_class_names: list[str] | None,
    class_names: list[str],
    source: str,
) -> None:
    if teacher_class_names is not None:
        check_same_classes(
            teacher_class_names,
            class_names,
            f"teacher.checkpoint={source}",
            "the teacher",
            "the data",
            "Its predictions would be read as the wrong labels: train or fine-tune the "
            "teacher on this data, in this class order",
        )
    classifier_weight = next(key for key in classifier_keys(teacher) if key.endswith("weight"))
    if classifier_weight in state and state[classifier_weight].shape[0] != len(class_names):
        raise DeitTrainError(
            f"teacher checkpoint {source} has {state[classifier_weight].shape[0]} classes "
            f"({classifier_weight} {tuple(state[classifier_weight].shape)}) but the data has {len(class_names)}. "
            f"Train or fine-tune the teacher on this data (deit-train model=timm loss=ce ...)."
        )


class TransformersClassifier(nn.Module):
    """A transformers image classifier as the teacher uses timm's: `forward(images)` returns its logits, and
    `pretrained_cfg` holds the mean/std its image processor normalises with (for images in [0, 1]), which
    TeacherNetwork re-normalises the views to; `processor_size` is the side its processor gives it."""

    def __init__(self, model: nn.Module, mean: tuple, std: tuple, processor_size: int, named: bool = True) -> None:
        super().__init__()
        self.model = model
        self.named = named  # its id2label names the classes (else transformers' LABEL_k placeholders)
        self.pretrained_cfg = {"mean": mean, "std": std}
        self.processor_size = processor_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=images).logits


def build_transformers_classifier(directory: str, class_names: list[str]) -> TransformersClassifier:
    """AutoModelForImageClassification and AutoImageProcessor from `directory` (local files only), its id2label
    checked against the data's classes by name."""
    transformers = require_transformers("teacher=hf")
    path, flag = local_path(directory, "teacher.name"), f"teacher.name={directory}"
    for needed in ("config.json", "preprocessor_config.json"):
        if not (path / needed).is_file():
            raise DeitTrainError(
                f"{flag} has no {needed}: teacher=hf takes a directory written by a transformers "
                f"image classifier's and its image processor's save_pretrained(DIR)"
            )
    try:
        model = transformers.AutoModelForImageClassification.from_pretrained(
            path, local_files_only=True, dtype=torch.float32
        )
        processor = transformers.AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise DeitTrainError(
            f"{flag}: transformers cannot load an image classifier from it: {str(error).splitlines()[0][:200]}"
        ) from error
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    placeholders = [f"LABEL_{i}" for i in range(len(labels))]  # transformers' default id2label says nothing
    named = labels != placeholders
    if named:
        check_same_classes(
            labels,
            class_names,
            flag,
            "its id2label",
            "the data",
            "Its predictions would be read as "
            "the wrong labels: fine-tune it on this data (transformers' run_image_classification.py), "
            "with label2id/id2label in this order",
        )
    if len(labels) != len(class_names):
        raise DeitTrainError(
            f"{flag} predicts {len(labels)} classes but the data has {len(class_names)}: fine-tune "
            f"it on this data first (transformers' run_image_classification.py)"
        )
    mean, std, side = processor_input(processor, flag)
    return TransformersClassifier(model, mean, std, side, named)


def processor_input(processor, flag: str) -> tuple[tuple[float, ...], tuple[float, ...], int]:
    """The mean and std an image processor's output has, as for images in [0, 1] (rescale_factor folded in), and
    the side of the square it gives the model: its crop, or its resize."""
    scale = 255 * processor.rescale_factor if getattr(processor, "do_rescale", False) else 255
    if getattr(processor, "do_normalize", False):
        mean, std = processor.image_mean, processor.image_std
    else:
        mean, std = [0.0] * 3, [1.0] * 3
    size = processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size
    read = lambda key: size.get(key) if isinstance(size, dict) else getattr(size, key, None)  # noqa: E731
    height, width = read("height"), read("width")
    if height is None:
        height = width = read("shortest_edge")  # ConvNeXt's processor: the short side, center-cropped square
    if height is None or height != width:
        raise DeitTrainError(
            f"{flag}: its image processor's size {size} is not a square, and the teacher sees "
            f"square views: save the processor with a square size or crop_size"
        )
    return tuple(m / scale for m in mean), tuple(s / scale for s in std), int(height)
