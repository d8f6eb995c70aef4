"""Optional packages (pyproject's extras): imported where a data source needs them, or one line naming the extra."""

import importlib
from types import ModuleType

from deit_train.errors import DeitTrainError


def require(module: str, extra: str, needed_by: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise DeitTrainError(f"{needed_by} needs the {module} package: pip install 'deit-train[{extra}]'") from error


def datasets_module() -> ModuleType:
    """Hugging Face `datasets` (data=hf, deit-shard from a Hub dataset)."""
    return require("datasets", "hf", "data=hf")
