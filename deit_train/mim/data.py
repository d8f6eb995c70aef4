"""The data of task=mim: the source's images without labels (data/sources/: any folder of images for data=imagefolder,
train/ and val/ or a held-out 5 %), each with a SimMIM mask."""

from omegaconf import DictConfig
from torch.utils.data import Dataset

from deit_train.data import DeiTDataModule
from deit_train.data.datamodule import DECODES, EVAL_DECODE
from deit_train.data.sources import DataSource
from deit_train.data.transforms import eval_transform, train_transform
from deit_train.mim.masking import MaskedImages, MaskGenerator


class MaskedImageDataModule(DeiTDataModule):
    """Unlabeled images, each with a SimMIM mask (training masks from the view's seed, validation masks fixed per
    image)."""

    def __init__(
        self, source: DataSource | DictConfig, augment: DictConfig, img_size: int, seed: int, masks: MaskGenerator
    ) -> None:
        super().__init__(source, augment, img_size, seed)
        self.masks = masks

    def open_splits(self) -> tuple[Dataset, Dataset]:
        train = self.source.images_only("train", train_transform(self.augment, self.img_size, DECODES))
        val = self.source.images_only("val", eval_transform(self.augment, self.img_size, EVAL_DECODE))
        return train, val

    def open_datasets(self) -> tuple[Dataset, Dataset]:
        train, val = super().open_datasets()
        return MaskedImages(train, self.masks), MaskedImages(val, self.masks, fixed=True)
