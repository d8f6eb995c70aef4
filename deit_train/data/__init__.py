"""Datasets (demo, ImageFolder, CIFAR), DeiT transforms and the Lightning data module."""

from deit_train.data.datamodule import DeiTDataModule

__all__ = ["DeiTDataModule"]
