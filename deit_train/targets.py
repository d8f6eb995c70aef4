"""A config's `_target_` as the class it names, located without calling anything and without Hydra's log line
(hydra.utils.get_class logs an error of its own before raising): a task's, a checkpoint's recorded task."""

import importlib


def locate_class(target: object) -> type | None:
    """The class a `_target_` names (module.Class), or None where it names none: not a dotted name, a module or name
    that is not there or fails to import, not a class."""
    if not isinstance(target, str) or "." not in target:
        return None
    module, _, name = target.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except Exception:  # ImportError, AttributeError, or whatever the module raises while importing
        return None
    return found if isinstance(found, type) else None
