"""Masked image modeling (task=mim): the task and its module (task.py), the masked image model (model.py), its masks
(masking.py), its unlabeled data (data.py) and its loss (loss.py)."""
