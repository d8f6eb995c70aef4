"""DeiT's train and eval transforms, built by timm's transform factory."""

from omegaconf import DictConfig
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform


def eval_transform(augment: DictConfig, img_size: int):
    """The official DeiT eval transform: resize the short side to img_size / crop_pct (bicubic), center
    crop img_size, ImageNet mean/std. crop_pct is set explicitly (0.875 in DeiT; timm's model default
    is 0.9 and is not inherited)."""
    return create_transform(
        img_size,
        is_training=False,
        interpolation="bicubic",
        crop_pct=augment.eval_crop_pct,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )


def train_transform(augment: DictConfig, img_size: int):
    """RandomResizedCrop + flip + RandAugment + random erasing (DeiT Table 9); `augment=none` trains on
    the eval transform."""
    if not augment.random_resized_crop:
        return eval_transform(augment, img_size)
    return create_transform(
        img_size,
        is_training=True,
        scale=tuple(augment.scale),
        auto_augment=augment.auto_augment,
        color_jitter=augment.color_jitter,
        interpolation=augment.train_interpolation,
        re_prob=augment.reprob,
        re_mode="pixel",
        re_count=1,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )
