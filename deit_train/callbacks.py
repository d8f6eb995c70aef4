"""Lightning callbacks as config (conf/callbacks/: `default`, `early_stopping`; any other with
`+callbacks.NAME._target_=...`), and the few of Lightning's own that cannot work in a deit-train run, refused in one
line with what to do instead, before anything is written."""

from hydra.utils import get_class
from omegaconf import DictConfig

from deit_train.errors import DeitTrainError

# Lightning's tuners set an attribute of the module and retrain it; deit-train derives both values from its config.
REFUSED = {
    "LearningRateFinder": (
        "Lightning's learning-rate finder cannot drive deit-train's schedule (optim.lr, scaled by the global "
        "batch / optim.lr_batch_ref, warmed up and decayed per step by timm's scheduler). Search it with a short "
        "sweep instead: deit-train -m optim.lr=5e-4,1e-3,2e-3 trainer.max_epochs=5, then deit-report the sweep "
        "directory"
    ),
    "BatchSizeFinder": (
        "Lightning's batch-size finder cannot change deit-train's batch: data.batch_size is the global batch, and "
        "the learning rate scales with it (optim.lr_batch_ref). Set data.batch_size (with "
        "trainer.accumulate_grad_batches for a batch beyond memory)"
    ),
}


def check_callbacks(callbacks: DictConfig) -> None:
    """Refuse a callback deit-train cannot run (REFUSED), by its class; one whose _target_ does not import is left to
    the trainer's instantiation, which names it."""
    for name, node in callbacks.items():
        if node is None or "_target_" not in node:
            continue
        try:
            cls = get_class(node._target_)
        except (ImportError, ValueError, AttributeError):
            continue
        for refused, why in REFUSED.items():
            if any(
                base.__name__ == refused and base.__module__.startswith(("lightning", "pytorch_lightning"))
                for base in cls.__mro__
            ):
                raise DeitTrainError(f"callbacks.{name} ({refused}): {why}")
