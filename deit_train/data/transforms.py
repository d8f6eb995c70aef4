"""DeiT's train and eval transforms, built from timm's transform factory and augmentations."""

from omegaconf import DictConfig
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.auto_augment import auto_augment_transform
from timm.data.random_erasing import RandomErasing
from torchvision import transforms as T


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
    """augment.crop chooses the geometry: random_resized (DeiT Table 9; DeiT III on ImageNet-21k), simple_random
    (DeiT III's SRC) or center (no augmentation: the eval transform). Then timm's auto-augment policy
    (RandAugment for DeiT, '3a' for DeiT III's 3-Augment), colour jitter and random erasing."""
    if augment.crop == "center":
        return eval_transform(augment, img_size)
    if augment.crop == "random_resized":
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
    if augment.crop != "simple_random":
        raise ValueError(
            f"augment.crop must be random_resized, simple_random or center, got {augment.crop!r}"
        )
    # Simple random crop (DeiT III, section 3.2): resize the short side, random crop with 4 px reflect padding.
    steps = [
        T.Resize(img_size, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomCrop(img_size, padding=4, padding_mode="reflect"),
        T.RandomHorizontalFlip(),
    ]
    if augment.auto_augment:
        steps.append(auto_augment_transform(augment.auto_augment, {"translate_const": int(img_size * 0.45)}))
    if augment.color_jitter:
        steps.append(T.ColorJitter(*(3 * [augment.color_jitter])))
    steps += [T.ToTensor(), T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    if augment.reprob > 0:
        steps.append(RandomErasing(augment.reprob, mode="pixel", device="cpu"))
    return T.Compose(steps)
