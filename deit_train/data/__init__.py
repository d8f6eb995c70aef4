"""From disk to a batch: data sources (sources/: where the images come from, one object each), the images' reading
(images.py), DeiT's transforms (transforms.py), reproducible views (views.py), samplers and the Lightning data
module that puts them together (datamodule.py); Mixup/CutMix (mixup.py) mix a batch on the device."""

__all__ = ["DeiTDataModule"]


def __getattr__(name: str):
    # The data module (Lightning) is imported when asked for: a data source's schema, which every config composes
    # on, comes without it (the command line answers before Lightning is imported).
    if name == "DeiTDataModule":
        from deit_train.data.datamodule import DeiTDataModule

        return DeiTDataModule
    raise AttributeError(name)
