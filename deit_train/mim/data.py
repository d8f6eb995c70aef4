"""Images without labels, for masked image modeling: a folder with train/ (and val/), any layout below them,
or one flat folder of images. Labels, where the data has them, are ignored."""

from pathlib import Path

from omegaconf import DictConfig
from torch.utils.data import Dataset

from deit_train.data import DeiTDataModule
from deit_train.data.datasets import CIFAR, given_root, imagefolder_root, open_split
from deit_train.data.images import IMAGE_EXTENSIONS, image_files, load_image
from deit_train.data.transforms import eval_transform, train_transform
from deit_train.errors import DeitTrainError
from deit_train.mim.masking import MaskedImages, MaskGenerator

HOLDOUT_EVERY = 20  # a folder without val/ keeps every 20th image (5 %) for validation


class ImageFiles(Dataset):
    def __init__(self, files: list[Path], transform, max_pixels: int | None) -> None:
        self.files = files
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        return self.transform(load_image(self.files[index], self.max_pixels))


class WithoutLabels(Dataset):
    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[index][0]


def unlabeled_root(cfg: DictConfig) -> Path:
    if cfg.name == "demo":
        return imagefolder_root(cfg)
    return given_root(cfg, "a folder of images (or with train/ and val/)")


def open_unlabeled_split(cfg: DictConfig, split: str, transform) -> Dataset:
    """The `split` ("train" or "val") images of the data, without labels."""
    if cfg.name in CIFAR:
        return WithoutLabels(open_split(cfg, split, transform))
    root = unlabeled_root(cfg)
    if (root / "train").is_dir() and (root / split).is_dir():
        files = image_files(root / split)
    else:  # no split folders: hold out every HOLDOUT_EVERY-th image, the same ones in every run
        source = root / "train" if (root / "train").is_dir() else root
        every = image_files(source)
        held_out = set(every[::HOLDOUT_EVERY])
        files = sorted(held_out) if split == "val" else [f for f in every if f not in held_out]
    if not files:
        raise DeitTrainError(
            f"no {split} images under {root} (extensions: {', '.join(IMAGE_EXTENSIONS)}); masked image modeling "
            f"needs at least {HOLDOUT_EVERY + 1} images in a flat folder, or train/ and val/ folders"
        )
    return ImageFiles(files, transform, cfg.max_image_pixels)


class MaskedImageDataModule(DeiTDataModule):
    """The data of task=mim: unlabeled images, each with a SimMIM mask (training masks from the view's seed,
    validation masks fixed per image)."""

    def __init__(self, data: DictConfig, augment: DictConfig, img_size: int, seed: int, masks: MaskGenerator):
        super().__init__(data, augment, img_size, seed)
        self.masks = masks

    def open_datasets(self) -> tuple[Dataset, Dataset]:
        train = open_unlabeled_split(self.data, "train", train_transform(self.augment, self.img_size))
        val = open_unlabeled_split(self.data, "val", eval_transform(self.augment, self.img_size))
        return MaskedImages(train, self.masks), MaskedImages(val, self.masks, fixed=True)
