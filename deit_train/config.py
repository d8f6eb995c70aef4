"""Where the config groups are, and the config of a single run composed as Hydra composes it for its job, without
Lightning: the command line checks it before Hydra creates anything (cli.py)."""

import importlib
from pathlib import Path

import deit_train.conf

CONFIG_DIR = str(Path(deit_train.conf.__file__).parent)


def register_schemas() -> None:
    """The typed schemas the config groups compose on (Hydra's ConfigStore): the run's (schema.py), each data
    source's and each task's, registered by importing their modules, which import nothing heavy."""
    import deit_train.data.sources  # noqa: F401
    import deit_train.mim.task  # noqa: F401
    import deit_train.schema  # noqa: F401
    import deit_train.tasks  # noqa: F401


def locate_class(target: object) -> type | None:
    """The class a `_target_` names (module.Class), or None where it names none: not a dotted name, a module or name
    that is not there or fails to import, not a class. Quietly: Hydra's get_class logs a line of its own first."""
    if not isinstance(target, str) or "." not in target:
        return None
    module, _, name = target.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except Exception:  # ImportError, AttributeError, or whatever the module raises while importing
        return None
    return found if isinstance(found, type) else None
