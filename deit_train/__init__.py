"""deit-train: train data-efficient image transformers (DeiT) with knowledge distillation."""

__version__ = "0.1.0"
