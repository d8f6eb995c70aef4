"""The shape of the run config: every group's keys, types, defaults and meaning, written once.

`TrainConfig` is the schema of conf/train.yaml (registered in Hydra's ConfigStore as `train_schema`); the yaml files
of each group keep only the values that differ from these defaults. Hydra refuses a value of the wrong type, or an
unknown key, while it composes. `check(cfg)` then checks ranges, choices and rules across groups before anything is
built: each problem is one DeitTrainError naming the key, the value and what is allowed.

Defaults are DeiT's (Touvron et al. 2021, Table 9, and the official main.py) unless a comment says otherwise.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from deit_train.errors import DeitTrainError


@dataclass
class ModelConfig:
    name: str = MISSING  # a timm model name; DeiT: a VisionTransformerDistilled (class + distillation heads)
    pretrained: bool = False  # timm hub weights (needs network)
    # fine-tune from: a deit-train .ckpt, a timm / official DeiT .pth, .safetensors, an export directory
    init: str | None = None
    img_size: int = 224  # the training and eval resolution
    # ViT architecture: set for DeiT models, null for other timm models (their architecture's own)
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    drop_path_rate: float | None = None  # stochastic depth; null: the architecture's default
    # parameter-name patterns (fnmatch) that train, the rest frozen; null: all. FixRes: [head.*]
    trainable: list[str] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments


@dataclass
class TeacherNetworkConfig:
    """One network of teacher=ensemble."""

    name: str = MISSING  # a timm classifier
    pretrained: bool = False
    checkpoint: str | None = None
    img_size: int | None = None  # the resolution this network sees the views at; null: teacher.img_size


@dataclass
class TeacherConfig:
    name: str | None = None  # a timm classifier; ensemble: the average of teacher.members; null: no teacher
    pretrained: bool = False
    # a deit-train .ckpt, a torch .pth/.pt (also {"model": ...}) or .safetensors
    checkpoint: str | None = None
    # teacher=ensemble: its networks, each with its own weights (and its own normalisation, from timm)
    members: list[TeacherNetworkConfig] = field(default_factory=list)
    img_size: int | None = None  # the resolution the teacher sees the views at; null: the student's
    cache: str | None = None  # DIR: the teacher's outputs on the training views, stored once and read after
    cache_topk: int | None = None  # soft: null keeps full logits up to 100 classes, else the top 10; 0: full


@dataclass
class LossConfig:
    distillation_type: str = "none"  # none (loss=ce) | hard | soft
    alpha: float = 0.5  # weight of the distillation term
    tau: float = 1.0  # soft distillation temperature
    kl_reduction: str = "batchmean"  # batchmean | deit_official (the official code's sum / (batch x classes))
    label_loss: str = "ce"  # ce | bce (DeiT III: binary cross-entropy per class, loss=bce)
    # bce: targets binarised as y > threshold (DeiT III: 0.0, every class in the mixed image); null: soft targets
    bce_target_threshold: float | None = 0.0


@dataclass
class DataConfig:
    """Every dataset's keys; those another dataset does not use stay null."""

    name: str = MISSING  # demo | imagefolder | cifar10 | cifar100
    root: str | None = None  # imagefolder: root/train/<class>/*, root/val/<class>/*; cifar: download folder
    batch_size: int = 1024  # global, over all devices and accumulated micro-batches
    num_workers: int = 8  # data-loader processes per device
    pin_memory: bool = True
    skip_corrupt: bool = False  # true: replace a corrupt image by the next one, with a counted warning
    download: bool = False  # cifar: fetch with torchvision (needs network)
    # demo: the generated dataset, written once under cache_dir
    cache_dir: str | None = None
    image_size: int | None = None  # stored resolution
    train_per_class: int | None = None
    val_per_class: int | None = None
    seed: int | None = None


@dataclass
class AugmentConfig:
    crop: str = "random_resized"  # random_resized | simple_random (DeiT III's SRC) | center (no augmentation)
    train_interpolation: str = "bicubic"
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # RandAugment; '3a': DeiT III's 3-Augment
    color_jitter: float | None = 0.3  # unused by timm while RandAugment is on, as in the official code
    reprob: float = 0.25  # random erasing probability
    mixup: float = 0.8  # Mixup alpha; 0: off
    cutmix: float = 1.0  # CutMix alpha; 0: off
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1  # label smoothing
    repeated_aug: int = 3  # repeated augmentation: each image this many times per epoch (1: off)
    # ... with a single process too, where the copies share a batch and a Mixup partner. Off: as the official code,
    # which repeats only when distributed; measured on the demo data in the README (Repeated augmentation)
    repeated_aug_single_process: bool = False
    eval_crop_pct: float = 0.875  # eval: resize to img_size / 0.875 (bicubic), center crop img_size


@dataclass
class OptimConfig:
    name: str = (
        "adamw"  # a timm optimizer name (adamw; sgd = SGD with Nesterov, momentum = without; lamb, ...)
    )
    lr: float = 5.0e-4  # for a global batch of lr_batch_ref: the run uses lr x batch / lr_batch_ref
    lr_batch_ref: int | None = 512  # null: lr as given
    weight_decay: float = 0.05  # none on norms, biases, tokens and position embeddings
    schedule: str = "cosine"  # a timm scheduler name
    warmup_epochs: int = 5
    warmup_lr: float = 1.0e-6
    min_lr: float = 1.0e-5
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm optimizer arguments (betas, eps, ...)


@dataclass
class TaskConfig:
    name: str = "classify"  # classify | mim (masked image modeling) | teacher_cache (fill teacher.cache only)
    optimized_metric: str = "val/acc1"  # what the app returns to sweeps, and what best.ckpt and Optuna follow
    optimized_mode: str = "max"  # max | min (mim: val/loss, min)
    mask_patch_size: int = 32  # mim: SimMIM's 32 px blocks (a multiple of the patch size, dividing the image)
    mask_ratio: float = 0.6  # mim: share of the blocks masked
    pictures: int = 8  # mim: validation reconstructions drawn after every validation


@dataclass
class EMAConfig:
    decay: float | None = None  # e.g. 0.99996 (official --model-ema-decay): an EMA of the student, val_ema/*


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    # Lightning's Trainer, loggers and callbacks take any of their own arguments: checked in check() where it matters
    trainer: Any = MISSING
    logger: Any = field(default_factory=dict)
    callbacks: Any = field(default_factory=dict)
    paths: Any = MISSING
    debug: Any = None
    seed: int = 0
    required: list[str] = field(default_factory=list)  # keys a preset cannot run without, e.g. [model.init]
    resume: bool = False  # true: continue this run directory from checkpoints/last.ckpt
    ckpt_path: str | None = None  # or resume from this checkpoint
    compile: bool = False  # torch.compile the student's feature extractor


ConfigStore.instance().store(name="train_schema", node=TrainConfig)

CHOICES = {
    "loss.distillation_type": ("none", "hard", "soft"),
    "loss.kl_reduction": ("batchmean", "deit_official"),
    "loss.label_loss": ("ce", "bce"),
    "augment.crop": ("random_resized", "simple_random", "center"),
    "augment.train_interpolation": ("bilinear", "bicubic", "random"),
    "data.name": ("demo", "imagefolder", "cifar10", "cifar100"),
    "task.name": ("classify", "mim", "teacher_cache"),
    "task.optimized_metric": ("val/acc1", "val/loss", "val/acc5", "val_ema/acc1"),
    "task.optimized_mode": ("max", "min"),
    "trainer.precision": ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true"),
}


@dataclass(frozen=True)
class Range:
    """Allowed values of a number: [low, high], an open bound excluded, None for no bound; `allowed` says it in
    words for the error message."""

    low: float
    high: float | None
    allowed: str
    low_open: bool = False
    high_open: bool = False

    def admits(self, value: float) -> bool:
        above_low = value > self.low if self.low_open else value >= self.low
        below_high = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above_low and below_high


RANGES = {
    "loss.alpha": Range(0.0, 1.0, "a weight in [0, 1]"),
    "loss.tau": Range(0.0, None, "a temperature > 0", low_open=True),
    "loss.bce_target_threshold": Range(
        0.0, 1.0, "a threshold in [0, 1), or null (soft targets)", high_open=True
    ),
    "augment.reprob": Range(0.0, 1.0, "a probability in [0, 1]"),
    "augment.mixup_prob": Range(0.0, 1.0, "a probability in [0, 1]"),
    "augment.mixup_switch_prob": Range(0.0, 1.0, "a probability in [0, 1]"),
    "augment.smoothing": Range(0.0, 1.0, "a label smoothing in [0, 1)", high_open=True),
    "augment.mixup": Range(0.0, None, "an alpha >= 0 (0: off)"),
    "augment.cutmix": Range(0.0, None, "an alpha >= 0 (0: off)"),
    "augment.color_jitter": Range(0.0, None, "a strength >= 0"),
    "augment.repeated_aug": Range(1, None, "a count >= 1 (1: off)"),
    "augment.eval_crop_pct": Range(0.0, 1.0, "a crop fraction in (0, 1]", low_open=True),
    "optim.lr": Range(0.0, None, "a learning rate >= 0"),
    "optim.lr_batch_ref": Range(1, None, "a batch size >= 1, or null"),
    "optim.weight_decay": Range(0.0, None, "a weight decay >= 0"),
    "optim.warmup_epochs": Range(0, None, "a number of epochs >= 0"),
    "optim.warmup_lr": Range(0.0, None, "a learning rate >= 0"),
    "optim.min_lr": Range(0.0, None, "a learning rate >= 0"),
    "data.batch_size": Range(1, None, "a batch size >= 1"),
    "data.num_workers": Range(0, None, "a number of processes >= 0"),
    "model.img_size": Range(1, None, "an image size >= 1"),
    "model.patch_size": Range(1, None, "a patch size >= 1"),
    "model.embed_dim": Range(1, None, "a width >= 1"),
    "model.depth": Range(1, None, "a number of blocks >= 1"),
    "model.num_heads": Range(1, None, "a number of heads >= 1"),
    "model.drop_path_rate": Range(0.0, 1.0, "a rate in [0, 1)", high_open=True),
    "teacher.cache_topk": Range(0, None, "a number of classes >= 0 (0: full logits)"),
    "teacher.img_size": Range(1, None, "an image size >= 1, or null (the student's)"),
    "task.mask_ratio": Range(0.0, 1.0, "a share in (0, 1)", low_open=True, high_open=True),
    "task.mask_patch_size": Range(1, None, "a block size >= 1"),
    "task.pictures": Range(0, None, "a number of pictures >= 0"),
    "ema.decay": Range(0.0, 1.0, "a decay in [0, 1), or null (no EMA)", high_open=True),
    "trainer.max_epochs": Range(1, None, "a number of epochs >= 1"),
    "trainer.devices": Range(-1, None, "a number of devices (-1: all), or auto"),
    "trainer.num_nodes": Range(1, None, "a number of nodes >= 1"),
    "trainer.accumulate_grad_batches": Range(1, None, "a number of micro-batches >= 1"),
    "trainer.log_every_n_steps": Range(1, None, "a number of steps >= 1"),
    "trainer.gradient_clip_val": Range(0.0, None, "a norm > 0, or null", low_open=True),
}


def refuse(key: str, value: Any, allowed: str) -> DeitTrainError:
    return DeitTrainError(f"{key}={value}: expected {allowed}")


def check_range(key: str, value: Any, rule: Range) -> None:
    if value is None or (key == "trainer.devices" and value == "auto"):
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not rule.admits(value):
        raise refuse(key, value, rule.allowed)


def check(cfg: DictConfig) -> None:
    """Ranges, choices and cross-field rules of a composed config; the first problem as one DeitTrainError."""
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and str(value) not in choices:
            raise refuse(key, value, "one of " + ", ".join(choices))
    for key, rule in RANGES.items():
        check_range(key, OmegaConf.select(cfg, key), rule)
    scale = list(cfg.augment.scale)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise refuse("augment.scale", scale, "[low, high] with 0 < low <= high <= 1")
    if cfg.model.patch_size and cfg.model.img_size % cfg.model.patch_size:
        raise refuse("model.img_size", cfg.model.img_size,
                     f"a multiple of model.patch_size={cfg.model.patch_size}")  # fmt: skip
    if cfg.model.embed_dim and cfg.model.num_heads and cfg.model.embed_dim % cfg.model.num_heads:
        raise refuse(
            "model.num_heads", cfg.model.num_heads, f"a divisor of model.embed_dim={cfg.model.embed_dim}"
        )
    if cfg.data.name == "imagefolder" and not cfg.data.root:
        raise DeitTrainError("data=imagefolder needs data.root=PATH: a folder with train/ and val/, one sub-folder "
                             "per class (task=mim: any folder of images)")  # fmt: skip
    if cfg.task.name == "mim":
        check_mim_masks(cfg)
    check_ensemble(cfg.teacher)
    if (
        cfg.loss.label_loss == "bce"
        and cfg.loss.bce_target_threshold is not None
        and cfg.augment.smoothing > 0
    ):
        # Smoothing puts smoothing / classes on every class: above the threshold every target becomes 1, below it
        # the binarised targets are those without smoothing. Wrong or a no-op, never what was asked for.
        raise refuse("augment.smoothing", cfg.augment.smoothing, "0.0 with loss.label_loss=bce, which binarises "
                     "its targets (DeiT III); or loss.bce_target_threshold=null for smoothed soft targets")  # fmt: skip
    check_batch(cfg)


def check_ensemble(teacher: DictConfig) -> None:
    members = len(teacher.members)
    if teacher.name == "ensemble" and members < 2:
        raise refuse("teacher.members", f"{members} network(s)", "two or more networks for teacher=ensemble, "
                     "e.g. teacher.members='[{name:resnet50,checkpoint:A},{name:regnety_160,checkpoint:B}]'")  # fmt: skip
    if members and teacher.name != "ensemble":
        raise refuse("teacher.name", teacher.name, "ensemble when teacher.members is set (teacher=ensemble)")
    for i, member in enumerate(teacher.members):
        check_range(f"teacher.members.{i}.img_size", member.img_size, RANGES["teacher.img_size"])


def check_mim_masks(cfg: DictConfig) -> None:
    size, block, patch = cfg.model.img_size, cfg.task.mask_patch_size, cfg.model.patch_size or 16
    if size % block:
        raise refuse("task.mask_patch_size", block, f"a divisor of model.img_size={size}")
    if block % patch:
        raise refuse("task.mask_patch_size", block, f"a multiple of model.patch_size={patch}")


def devices_per_node(trainer: DictConfig) -> int | None:
    devices = trainer.devices
    if isinstance(devices, int) and devices > 0:
        return devices
    if OmegaConf.is_list(devices):  # device indices, e.g. [0, 1]
        return len(devices)
    return None  # auto / -1: known once the trainer has looked


def check_batch(cfg: DictConfig) -> None:
    """The global batch splits evenly over devices and micro-batches; Mixup/CutMix need an even share each."""
    devices = devices_per_node(cfg.trainer)
    if devices is None:
        return
    shares = devices * cfg.trainer.num_nodes * cfg.trainer.accumulate_grad_batches
    batch = cfg.data.batch_size
    if batch % shares:
        raise refuse("data.batch_size", batch, f"a multiple of {shares} (devices x nodes x accumulated "
                     f"micro-batches): it is the global batch")  # fmt: skip
    if (cfg.augment.mixup > 0 or cfg.augment.cutmix > 0) and (batch // shares) % 2:
        raise refuse("data.batch_size", batch, f"an even number per device and micro-batch for Mixup/CutMix, "
                     f"which pair each image with another (now {batch // shares} on each of {shares})")  # fmt: skip
