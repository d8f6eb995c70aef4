"""Where the config groups are, and the config of a single run composed as Hydra composes it for its job, without
Lightning: the command line checks it before Hydra creates anything (cli.py)."""

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
