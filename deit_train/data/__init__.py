"""From disk to a batch: data sources (sources/: where the images come from, one object each), the images' reading
(images.py), DeiT's transforms (transforms.py), reproducible views (views.py), samplers and the Lightning data
module that puts them together (datamodule.py); Mixup/CutMix (mixup.py) mix a batch on the device."""

from deit_train.data.datamodule import DeiTDataModule

__all__ = ["DeiTDataModule"]
