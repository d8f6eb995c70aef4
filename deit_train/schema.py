"""The shape of the run config: every group's keys, types, defaults, allowed values and meaning, written once.

`TrainConfig` is the schema of conf/train.yaml (registered in Hydra's ConfigStore as `train_schema`); the yaml files
of each group keep only the values that differ from these defaults. Hydra refuses a value of the wrong type, or an
unknown key, while it composes. A field's allowed values stand beside it (`checked(default, rule)`); `check(cfg)`
applies them and the rules across groups before anything is built, each problem one DeitTrainError naming the key,
the value and what is allowed. A task adds its own rules (tasks/); the objects built from a checked config trust it.

Defaults are DeiT's (Touvron et al. 2021, Table 9, and the official main.py) unless a comment says otherwise.
"""

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from deit_train.errors import DeitTrainError


@dataclass(frozen=True)
class Range:
    """Allowed values of a number: [low, high], an open bound excluded, None for no bound; `allowed` says it in
    words for the error message."""

    low: float
    high: float | None
    allowed: str
    low_open: bool = False
    high_open: bool = False
    integer: bool = False  # a count: 2.5 epochs is refused

    def admits(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return False  # inf and nan are never a setting
        if self.integer and not isinstance(value, int):
            return False
        above_low = value > self.low if self.low_open else value >= self.low
        below_high = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above_low and below_high


@dataclass(frozen=True)
class OneOf:
    choices: tuple[str, ...]

    def __init__(self, *choices: str) -> None:
        object.__setattr__(self, "choices", choices)

    @property
    def allowed(self) -> str:
        return "one of " + ", ".join(self.choices)

    def admits(self, value: Any) -> bool:
        return str(value) in self.choices


@dataclass(frozen=True)
class AutoOr:
    """`auto` (the program decides, and logs what) or a value `rule` admits."""

    rule: Range

    @property
    def allowed(self) -> str:
        return f"auto, or {self.rule.allowed}"

    def admits(self, value: Any) -> bool:
        return value == "auto" or self.rule.admits(value)


def checked(default: Any, rule: Range | OneOf | AutoOr) -> Any:
    """A field whose value `check` holds to `rule` (None is always allowed where the type is optional)."""
    return field(default=default, metadata={"rule": rule})


# Reused rules
PROBABILITY = Range(0.0, 1.0, "a probability in [0, 1]")
LEARNING_RATE = Range(0.0, None, "a learning rate >= 0")
IMAGE_SIZE = Range(1, None, "an image size >= 1")


@dataclass
class ModelConfig:
    name: str = MISSING  # a timm model name; DeiT: a VisionTransformerDistilled (class + distillation heads)
    pretrained: bool = False  # timm hub weights (needs network)
    # fine-tune from: a deit-train .ckpt, a timm / official DeiT .pth, .safetensors, an export directory
    init: str | None = None
    # model.init's heads are kept where its classes are the data's (rows picked by name), else start fresh. Classes
    # that correspond under other names: {name_in_weights: name_in_data, ...}, or [[name in weights, name in data],
    # ...] for names Hydra cannot write as keys (spaces, quotes)
    init_class_map: Any = None
    # true: keep the heads of model.init weights that name no classes although, on a sample of the validation data,
    # their outputs fit another class order (labels.py); false starts them fresh
    init_unchecked_order: bool = False
    img_size: int = checked(224, IMAGE_SIZE)  # the training and eval resolution
    # ViT architecture: set for DeiT models, null for other timm models (their architecture's own)
    patch_size: int | None = checked(None, Range(1, None, "a patch size >= 1"))
    embed_dim: int | None = checked(None, Range(1, None, "a width >= 1"))
    depth: int | None = checked(None, Range(1, None, "a number of blocks >= 1"))
    num_heads: int | None = checked(None, Range(1, None, "a number of heads >= 1"))
    # stochastic depth; null: the architecture's default
    drop_path_rate: float | None = checked(None, Range(0.0, 1.0, "a rate in [0, 1)", high_open=True))
    # parameter-name patterns (fnmatch) that train, the rest frozen; null: all. FixRes: [head.*]
    trainable: list[str] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments


# ViT architecture fields a DeiT model config may override (model.depth=4 makes a CPU-sized student).
VIT_ARCHITECTURE_FIELDS = ("patch_size", "embed_dim", "depth", "num_heads")
TEACHER_IMAGE_SIZE = Range(1, None, "an image size >= 1, or null (the student's)")
# timm: name is a timm model; transformers: name is a directory AutoModelForImageClassification loads (teacher=hf)
TEACHER_LIBRARY = OneOf("timm", "transformers")


@dataclass
class TeacherNetworkConfig:
    """One network of teacher=ensemble."""

    name: str = MISSING  # a timm classifier, or a transformers classifier's directory (library=transformers)
    library: str = checked("timm", TEACHER_LIBRARY)
    pretrained: bool = False
    checkpoint: str | None = None
    # the resolution this network sees the views at; null: teacher.img_size (a transformers network: else its
    # image processor's)
    img_size: int | None = checked(None, TEACHER_IMAGE_SIZE)


@dataclass
class TeacherConfig:
    # a timm classifier; a transformers classifier's directory (library=transformers, teacher=hf); ensemble: the
    # average of teacher.members; null: no teacher
    name: str | None = None
    library: str = checked("timm", TEACHER_LIBRARY)
    pretrained: bool = False
    # a deit-train .ckpt, a torch .pth/.pt (also {"model": ...}) or .safetensors
    checkpoint: str | None = None
    # teacher=ensemble: its networks, each with its own weights (and its own normalisation, from timm)
    members: list[TeacherNetworkConfig] = field(default_factory=list)
    img_size: int | None = checked(None, TEACHER_IMAGE_SIZE)  # the resolution the teacher sees; null: the student's
    cache: str | None = None  # DIR: the teacher's outputs on the training views, stored once and read after
    # true: train with a teacher (or member) whose weights name no classes although, on a sample of the validation
    # data, its outputs fit another class order (labels.py); false refuses it
    unchecked_order: bool = False
    # true: with loss=ce, load the teacher only to report val/teacher_acc1 and val/agreement (a teacher the loss
    # does not use is refused otherwise: it trained without distillation, with a warning)
    keep_for_metrics: bool = False
    # soft: null keeps full logits up to 100 classes, else the top 10; 0: full
    cache_topk: int | None = checked(None, Range(0, None, "a number of classes >= 0 (0: full logits)"))


@dataclass
class LossConfig:
    distillation_type: str = checked("none", OneOf("none", "hard", "soft"))  # none: loss=ce
    alpha: float = checked(0.5, Range(0.0, 1.0, "a weight in [0, 1]"))  # weight of the distillation term
    tau: float = checked(1.0, Range(0.0, None, "a temperature > 0", low_open=True))  # soft distillation
    # batchmean, or deit_official: the official code's sum / (batch x classes)
    kl_reduction: str = checked("batchmean", OneOf("batchmean", "deit_official"))
    # ce, or bce: DeiT III's binary cross-entropy per class (loss=bce)
    label_loss: str = checked("ce", OneOf("ce", "bce"))
    # bce: targets binarised as y > threshold (DeiT III: 0.0, every class in the mixed image); null: soft targets
    bce_target_threshold: float | None = checked(
        0.0, Range(0.0, 1.0, "a threshold in [0, 1), or null (soft targets)", high_open=True)
    )
    # Feature distillation (losses.py, FeatureLoss): + feature_weight x d(P(F_s), F_t) on top of the loss; 0: off,
    # the run is today's. Needs a teacher (loss=ce included). Paper values: docs/recipes.md
    feature_weight: float = checked(0.0, Range(0.0, None, "a weight >= 0 (0: no feature term)"))
    # pre_logits: the pooled pre-logits, mean squared error (timm's FeatureDistillationTask); tokens: the student's
    # patch tokens at feature_block against the teacher's tokens or spatial map (ViTKD's mimicking)
    feature_target: str = checked("pre_logits", OneOf("pre_logits", "tokens"))
    # tokens: the student's block, as timm's forward_intermediates counts (ViTKD mimics the shallow blocks 0 and 1)
    feature_block: int = 1
    # tokens: the teacher's forward_intermediates index: a ViT's block, a convnet's stage as its feature_info lists
    # them (RegNetY: 0 stem, 1-4 stages; 3 is stride 16, DeiT's patch grid); null: feature_block
    feature_teacher_layer: int | None = None
    # teacher=ensemble: the member whose features are matched, by name or index; null: the first
    feature_member: str | None = None


@dataclass
class AugmentConfig:
    # random_resized | simple_random (DeiT III's SRC) | center (no augmentation)
    crop: str = checked("random_resized", OneOf("random_resized", "simple_random", "center"))
    train_interpolation: str = checked("bicubic", OneOf("bilinear", "bicubic", "random"))
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # RandAugment; '3a': DeiT III's 3-Augment
    # unused by timm while RandAugment is on, as in the official code
    color_jitter: float | None = checked(0.3, Range(0.0, None, "a strength >= 0"))
    reprob: float = checked(0.25, PROBABILITY)  # random erasing probability
    mixup: float = checked(0.8, Range(0.0, None, "an alpha >= 0 (0: off)"))  # Mixup alpha
    cutmix: float = checked(1.0, Range(0.0, None, "an alpha >= 0 (0: off)"))  # CutMix alpha
    mixup_prob: float = checked(1.0, PROBABILITY)
    mixup_switch_prob: float = checked(0.5, PROBABILITY)
    smoothing: float = checked(0.1, Range(0.0, 1.0, "a label smoothing in [0, 1)", high_open=True))
    # repeated augmentation: each image this many times per epoch (1: off)
    repeated_aug: int = checked(3, Range(1, None, "a count >= 1 (1: off)"))
    # ... with a single process too, where the copies share a batch and a Mixup partner. Off: as the official code,
    # which repeats only when distributed; measured on the demo data in docs/recipes.md
    repeated_aug_single_process: bool = False
    # eval: resize to img_size / 0.875 (bicubic), center crop img_size
    eval_crop_pct: float = checked(0.875, Range(0.1, 1.0, "a crop fraction in [0.1, 1]"))


@dataclass
class OptimConfig:
    name: str = "adamw"  # a timm optimizer name (adamw; sgd = SGD with Nesterov, momentum = without; lamb, ...)
    lr: float = checked(5.0e-4, LEARNING_RATE)  # for a global batch of lr_batch_ref: lr x batch / lr_batch_ref
    lr_batch_ref: int | None = checked(512, Range(1, None, "a batch size >= 1, or null"))  # null: lr as given
    weight_decay: float = checked(0.05, Range(0.0, None, "a weight decay >= 0"))  # none on norms, biases, tokens
    # a timm schedule, stepped per optimizer step
    schedule: str = checked("cosine", OneOf("cosine", "tanh", "step", "multistep", "poly", "wsd", "rsqrt", "constant"))
    warmup_epochs: int = checked(5, Range(0, None, "a number of epochs >= 0"))
    warmup_lr: float = checked(1.0e-6, LEARNING_RATE)
    min_lr: float = checked(1.0e-5, LEARNING_RATE)
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm optimizer arguments (betas, eps, ...)


@dataclass
class EMAConfig:
    # e.g. 0.99996 (official --model-ema-decay): an EMA of the student, val_ema/*
    decay: float | None = checked(None, Range(0.0, 1.0, "a decay in [0, 1), or null (no EMA)", high_open=True))


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # where the images come from: conf/data/*.yaml names a data source (data/sources/), whose own fields it carries
    data: Any = MISSING
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # what the run trains: conf/task/*.yaml names a Task (tasks/), whose own fields and rules it carries
    task: Any = MISSING
    ema: EMAConfig = field(default_factory=EMAConfig)
    # Lightning's Trainer, loggers and callbacks take any of their own arguments (TRAINER_RULES below)
    trainer: Any = MISSING
    logger: Any = field(default_factory=dict)
    callbacks: Any = field(default_factory=dict)
    paths: Any = MISSING
    debug: Any = None
    seed: int = checked(0, Range(0, 2**32 - 1, "a seed in [0, 2**32 - 1]"))
    required: list[str] = field(default_factory=list)  # keys a preset cannot run without, e.g. [model.init]
    resume: bool = False  # true: continue this run directory from checkpoints/last.ckpt
    ckpt_path: str | None = None  # or resume from this checkpoint
    compile: bool = False  # torch.compile the student's feature extractor


ConfigStore.instance().store(name="train_schema", node=TrainConfig)

# The trainer group is Lightning's Trainer, whose arguments are Lightning's to type; these are the ones whose values
# the rest of the config depends on.
TRAINER_RULES = {
    "max_epochs": Range(1, None, "a whole number of epochs >= 1", integer=True),
    "devices": Range(-1, None, "a number of devices >= 1 (-1: all), or auto", integer=True),
    "num_nodes": Range(1, None, "a number of nodes >= 1", integer=True),
    "accumulate_grad_batches": Range(1, None, "a number of micro-batches >= 1", integer=True),
    "log_every_n_steps": Range(1, None, "a number of steps >= 1", integer=True),
    "check_val_every_n_epoch": Range(1, None, "a number of epochs >= 1, at most trainer.max_epochs", integer=True),
    "limit_train_batches": Range(
        0, None, "a number of batches >= 1 or a fraction of the epoch in (0, 1]", low_open=True
    ),
    "gradient_clip_val": Range(0.0, None, "a norm > 0, or null", low_open=True),
    # Not 16-true: fp16 weights and AdamW state, whose updates underflow; every run diverged at its first step.
    "precision": OneOf("auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true"),
}

# Lightning's Trainer under the names it is imported by (conf/trainer/ writes the first)
LIGHTNING_TRAINER = ("lightning.pytorch.Trainer", "lightning.Trainer", "lightning.pytorch.trainer.trainer.Trainer")
HYDRA_KEYS = ("_target_", "_recursive_", "_convert_", "_partial_", "_args_")  # instantiate's, not the class's


def lightning_trainer_arguments() -> list[str] | None:
    """The arguments of the installed Lightning's Trainer, read from its source in milliseconds: importing it takes
    seconds, and a misspelt +trainer.KEY would be refused only then. None where the source is not laid out as
    Lightning 2 keeps it: the Trainer itself refuses the key when it is built."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("lightning")
    source = Path(spec.origin).parent / "pytorch" / "trainer" / "trainer.py" if spec and spec.origin else None
    if source is None or not source.is_file():
        return None
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name == "Trainer":
            for method in node.body:
                if isinstance(method, ast.FunctionDef) and method.name == "__init__" and method.args.kwarg is None:
                    return [arg.arg for arg in [*method.args.args[1:], *method.args.kwonlyargs]]
    return None


def check_trainer_keys(trainer: DictConfig) -> None:
    """Every trainer.KEY is an argument of Lightning's Trainer (conf/trainer/ holds some; `+trainer.KEY` adds any)."""
    names = lightning_trainer_arguments() if trainer.get("_target_") in LIGHTNING_TRAINER else None
    for key in trainer if names else ():
        if key not in names and key not in HYDRA_KEYS:
            close = difflib.get_close_matches(str(key), names, n=1)
            meant = f" (did you mean trainer.{close[0]}?)" if close else ""
            raise DeitTrainError(
                f"trainer.{key} is not an argument of Lightning's Trainer{meant}: its arguments are listed at "
                "https://lightning.ai/docs/pytorch/stable/common/trainer.html#trainer-flags"
            )


NULLABLE_TRAINER_KEYS = ("gradient_clip_val", "check_val_every_n_epoch", "limit_train_batches")  # Lightning's default


def store_schema(group: str, name: str, cls: type) -> None:
    """conf/<group>/<name>.yaml's schema, `<name>_schema` in Hydra's ConfigStore: the fields of the dataclass `cls`
    (a task, a data source), typed, and its `_target_`, so that the yaml names what runs and Hydra refuses keys the
    class does not take."""
    import sys
    from typing import get_type_hints

    target = f"{cls.__module__}.{cls.__qualname__}"
    hints = get_type_hints(cls)  # the types, where a module's annotations are strings (from __future__ import ...)
    fields = [("_target_", str, field(default=target))]
    fields += [(f.name, hints[f.name], field(default=f.default, metadata=f.metadata)) for f in dataclasses.fields(cls)]
    schema = dataclasses.make_dataclass(f"{cls.__name__}Config", fields)
    schema.__module__ = cls.__module__  # importable by name: configs are pickled (ddp_spawn, sweeps)
    setattr(sys.modules[cls.__module__], schema.__name__, schema)
    ConfigStore.instance().store(group=group, name=f"{name}_schema", node=schema)


def refuse(key: str, value: Any, allowed: str) -> DeitTrainError:
    return DeitTrainError(f"{key}={value}: expected {allowed}")


def check_value(key: str, value: Any, rule: Range | OneOf | AutoOr) -> None:
    if value is not None and not rule.admits(value):
        raise refuse(key, value, rule.allowed)


def check_fields(node: DictConfig, schema: type, prefix: str) -> None:
    """Each field's rule (`checked`), through nested dataclasses and lists of them."""
    for spec in dataclasses.fields(schema):
        key, value = f"{prefix}.{spec.name}" if prefix else spec.name, node.get(spec.name)
        if "rule" in spec.metadata:
            check_value(key, value, spec.metadata["rule"])
        elif isinstance(value, DictConfig) and dataclasses.is_dataclass(spec.type):
            check_fields(value, spec.type, key)
        elif OmegaConf.is_list(value) and dataclasses.is_dataclass(item := next(iter(get_args(spec.type)), None)):
            for i, element in enumerate(value):  # teacher.members
                check_fields(element, item, f"{key}.{i}")


def takes(full_key: str, names: list[str]) -> str:
    """What a node takes, for a key it does not have: its keys, and the one `full_key` resembles."""
    parent, _, key = full_key.rpartition(".")
    close = difflib.get_close_matches(key, names, n=1)
    meant = f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else ""
    return f"{parent or 'the config'} takes: {', '.join(names)}{meant}"


def check_known_keys(node: DictConfig, prefix: str = "", schema: type | None = None) -> None:
    """Every key of a typed node is one of its fields: `+key=value` adds any key Hydra is given, and a misspelt one
    (+modle.name, +model.dept) would otherwise be carried along unread while the run trains without it. The root
    is TrainConfig (Hydra's composed root is untyped)."""
    schema = schema or OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        names = [f.name for f in dataclasses.fields(schema) if not f.name.startswith("_")]
        for key in node:
            if key not in names and key not in HYDRA_KEYS:
                raise DeitTrainError(f"{prefix}{key} is not a key of the config: {takes(f'{prefix}{key}', names)}")
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            check_known_keys(child, f"{prefix}{key}.")
        elif OmegaConf.is_list(child) and not child._is_none():  # teacher.members: a list of typed nodes
            for index, item in enumerate(child):
                if isinstance(item, DictConfig):
                    check_known_keys(item, f"{prefix}{key}.{index}.")


def check_instantiated_groups(cfg: DictConfig) -> None:
    """logger and callbacks hold one node per object to build (its `_target_`), or null to drop one: anything else
    (+logger.foo=1) is refused here, not met as an unexpected error where Lightning's objects are built."""
    for group in ("logger", "callbacks"):
        for key in cfg[group] or {}:
            node = cfg[group]._get_node(key)
            if not (node._is_none() or (isinstance(node, DictConfig) and "_target_" in node)):
                raise DeitTrainError(
                    f"{group}.{key}={node._value()}: expected a {group} node with _target_ (the class to build), or "
                    f"null to drop one; {group} holds: {', '.join(str(k) for k in cfg[group])}"
                )


def check(cfg: DictConfig) -> None:
    """Unset values, each field's rule and the rules across fields of a composed config; the first problem as one
    DeitTrainError. The task's own rules follow (Task.check)."""
    check_known_keys(cfg, schema=TrainConfig)
    check_trainer_keys(cfg.trainer)
    check_instantiated_groups(cfg)
    # Values left unset: ??? in a config group, or listed under `required` by a preset (model.init).
    missing = sorted(OmegaConf.missing_keys(cfg) | {k for k in cfg.required if OmegaConf.select(cfg, k) is None})
    if missing:
        raise DeitTrainError(
            f"the config needs {', '.join(f'{key}=...' for key in missing)}: add it to the command line"
        )
    check_fields(cfg, TrainConfig, "")
    for key, rule in TRAINER_RULES.items():
        value = OmegaConf.select(cfg.trainer, key)
        if value is None and key in cfg.trainer and key not in NULLABLE_TRAINER_KEYS:
            raise refuse(f"trainer.{key}", "null", rule.allowed)
        if key == "devices" and (value == "auto" or OmegaConf.is_list(value)):
            continue
        check_value(f"trainer.{key}", value, rule)
        if key == "devices" and value == 0:  # the range's one hole: -1 means all
            raise refuse("trainer.devices", value, rule.allowed)
    every = cfg.trainer.get("check_val_every_n_epoch")
    if isinstance(every, int) and every > cfg.trainer.max_epochs:  # no validation: no metrics, no best.ckpt
        raise refuse("trainer.check_val_every_n_epoch", every, f"at most trainer.max_epochs={cfg.trainer.max_epochs}")
    check_center_crop(cfg.augment)
    scale = list(cfg.augment.scale)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise refuse("augment.scale", scale, "[low, high] with 0 < low <= high <= 1")
    if cfg.model.patch_size and cfg.model.img_size % cfg.model.patch_size:
        raise refuse("model.img_size", cfg.model.img_size, f"a multiple of model.patch_size={cfg.model.patch_size}")
    kwargs_size = cfg.model.kwargs.get("img_size")
    if kwargs_size is not None and kwargs_size != cfg.model.img_size:  # a timm ViT built at one size, fed another
        raise refuse(
            "model.kwargs.img_size",
            kwargs_size,
            f"model.img_size={cfg.model.img_size}, the size the data is cut to (or set model.img_size={kwargs_size})",
        )
    if cfg.model.embed_dim and cfg.model.num_heads and cfg.model.embed_dim % cfg.model.num_heads:
        raise refuse("model.num_heads", cfg.model.num_heads, f"a divisor of model.embed_dim={cfg.model.embed_dim}")
    if cfg.model.init:
        check_weights_path("model.init", cfg.model.init)
    check_teacher(cfg)
    if cfg.loss.label_loss == "bce" and cfg.loss.bce_target_threshold is not None and cfg.augment.smoothing > 0:
        # Smoothing puts smoothing / classes on every class: above the threshold every target becomes 1, below it
        # the binarised targets are those without smoothing. Wrong or a no-op, never what was asked for.
        raise refuse(
            "augment.smoothing",
            cfg.augment.smoothing,
            "0.0 with loss.label_loss=bce, which binarises "
            "its targets (DeiT III); or loss.bce_target_threshold=null for smoothed soft targets",
        )
    devices = devices_per_node(cfg.trainer)
    if devices is not None:  # devices=auto / -1: the trainer counts them, and the data module checks then
        check_batch(
            cfg.data.batch_size,
            devices * cfg.trainer.num_nodes,
            cfg.trainer.accumulate_grad_batches,
            mixes=cfg.augment.mixup > 0 or cfg.augment.cutmix > 0,
        )


def check_center_crop(augment: DictConfig) -> None:
    """augment.crop=center trains on the eval transform (data/transforms.py): a policy, colour jitter or random
    erasing asked beside it would be silently dropped."""
    dropped = [
        f"augment.{key}={augment[key]}"
        for key in ("auto_augment", "color_jitter", "reprob")
        if augment[key] not in (None, 0, 0.0, "")
    ]
    if augment.crop == "center" and dropped:
        raise DeitTrainError(
            f"augment.crop=center trains on the eval transform (resize, centre crop), which would drop "
            f"{', '.join(dropped)}: set them to null/0 (as augment=none does), or choose augment.crop=random_resized "
            f"or simple_random"
        )


def check_teacher(cfg: DictConfig) -> None:
    teacher = cfg.teacher
    members = len(teacher.members)
    if teacher.name == "ensemble" and members < 2:
        raise refuse(
            "teacher.members",
            f"{members} network(s)",
            "two or more networks for teacher=ensemble, "
            "e.g. teacher.members='[{name:resnet50,checkpoint:A},{name:regnety_160,checkpoint:B}]'",
        )
    if members and teacher.name != "ensemble":
        raise refuse("teacher.name", teacher.name, "ensemble when teacher.members is set (teacher=ensemble)")
    if teacher.library == "transformers" and teacher.name is None:
        raise refuse("teacher.name", None, "a transformers image classifier's directory with teacher=hf")
    networks = [(f"teacher.members.{i}", m) for i, m in enumerate(teacher.members)] or [("teacher", teacher)]
    for key, network in networks:
        if network.library == "timm" and network.name is not None and not network.checkpoint and not network.pretrained:
            raise teacher_without_weights(network.name)
        if network.library == "transformers" and network.checkpoint:
            raise refuse(
                f"{key}.checkpoint",
                network.checkpoint,
                f"null with {key}.library=transformers: the weights are in the directory {key}.name names",
            )
        if network.checkpoint:
            check_weights_path(f"{key}.checkpoint", network.checkpoint)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # OWNER/NAME: one slash, no ./, ~ or / (models/hub.py)


def check_weights_path(key: str, value: str) -> None:
    """A key naming weights (model.init, teacher.checkpoint) takes a local file or folder, or a Hub id, which is
    fetched when the run builds (models/hub.py): a local path that is not there is refused here, before anything is
    imported or written."""
    if not Path(value).expanduser().exists() and not HUB_ID.fullmatch(str(value)):
        raise DeitTrainError(
            f"{key}={value} does not exist (and is not a Hub id, OWNER/NAME): pass the file or folder of the weights"
        )


def teacher_without_weights(name: str) -> DeitTrainError:
    return DeitTrainError(
        f"the teacher {name} has no weights: a random teacher would teach noise. Pass "
        f"teacher.checkpoint=PATH (deit-train .ckpt, .pth or .safetensors) or teacher.pretrained=true."
    )


def check_optimizer(optim: DictConfig) -> None:
    """optim.name is a timm optimizer that takes optim.kwargs: built once on a stand-in parameter, as timm parses
    them only where it builds the optimizer (after the run has started)."""
    import torch
    from timm.optim import create_optimizer_v2, list_optimizers

    if str(optim.name).lower() not in list_optimizers():
        raise refuse("optim.name", optim.name, "a timm optimizer, e.g. adamw, sgd, momentum, lamb, lion")
    try:
        create_optimizer_v2(
            torch.nn.Linear(1, 1), opt=optim.name, lr=optim.lr, weight_decay=optim.weight_decay, **optim.kwargs
        )
    except (TypeError, ValueError, KeyError) as error:
        raise DeitTrainError(
            f"optim.name={optim.name} refused its settings: {error} (optim.kwargs: "
            f"{OmegaConf.to_container(optim.kwargs)})"
        ) from error


def devices_per_node(trainer: DictConfig) -> int | None:
    devices = trainer.devices
    if isinstance(devices, int) and devices > 0:
        return devices
    if OmegaConf.is_list(devices):  # device indices, e.g. [0, 1]
        return len(devices)
    return None  # auto / -1: known once the trainer has looked


def check_augment_policy(augment: DictConfig) -> None:
    """augment.auto_augment as timm parses it, where it builds the transform: built here (timm is imported, so this
    comes after the rules that need no import)."""
    if not augment.auto_augment:
        return
    from deit_train.data.transforms import train_transform

    try:
        train_transform(augment, 32)
    except (AssertionError, ValueError, KeyError, IndexError) as error:
        raise refuse(
            "augment.auto_augment",
            augment.auto_augment,
            f"a timm policy (rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original, v0, 3a) or null; timm says: {error}",
        ) from error


def check_batch(batch: int, world_size: int, accumulate: int, mixes: bool) -> None:
    """The global batch splits evenly over devices and micro-batches; Mixup/CutMix need an even share each."""
    shares = world_size * accumulate
    if batch % shares:
        raise refuse(
            "data.batch_size",
            batch,
            f"a multiple of {shares} ({world_size} devices x {accumulate} "
            f"accumulated micro-batches): it is the global batch",
        )
    if mixes and (batch // shares) % 2:
        raise refuse(
            "data.batch_size",
            batch,
            f"an even number per device and micro-batch for Mixup/CutMix, "
            f"which pair each image with another (now {batch // shares} on each of {shares})",
        )
