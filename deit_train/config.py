"""Where the config groups are, the config of a job as Hydra's job sees it (job_config), and Hydra's and OmegaConf's
errors as one line (one_line): the command line (cli.py) and a sweep's check of its jobs (sweep_jobs.py) use them
before Hydra creates anything."""

import dataclasses
import re
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


def job_config(hydra_cfg):
    """The config the run sees (no hydra node), its output directory the run directory as Hydra will make it. A
    copy as Hydra's job makes it: each node keeps its schema's type (schema.check_known_keys reads them)."""
    import copy

    from omegaconf import open_dict, read_write

    cfg = copy.deepcopy(hydra_cfg)
    run_dir = Path(str(hydra_cfg.hydra.run.dir)).absolute()
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.output_dir = str(run_dir)
    return cfg


def one_line(error: Exception, args: list[str] | None = None) -> str:
    """Hydra's and OmegaConf's multi-line messages as one line, naming the key and the value."""
    from omegaconf.errors import OmegaConfBaseException

    cause = error.__cause__ if isinstance(error.__cause__, OmegaConfBaseException) else error
    text = str(cause).split("Config search path:")[0]
    full_key = getattr(cause, "full_key", None)
    appended = next((arg for arg in args or [] if arg.split("=", 1)[0] == f"+{full_key}"), None)
    deleted = next((arg for arg in args or [] if arg.split("=", 1)[0] == f"~{full_key}"), None)
    if deleted and "interpolation" in text:  # Hydra resolves the value it deletes, which needs the running job
        return (
            f"{deleted} cannot be applied: {full_key} is an interpolation Hydra resolves only in the running job; "
            f"set it instead ({full_key}=VALUE)"
        )
    if appended and "interpolation" in text:
        # `+key=v` on a key that holds an interpolation (trainer.default_root_dir: ${paths.output_dir}): Hydra's
        # check that the key is free resolves it, and says what failed there instead of Hydra's own advice
        return (
            f"Could not append to config. An item is already at '{full_key}'. | Either remove + prefix: "
            f"'{appended[1:]}' | Or add a second + to add or override '{full_key}': '+{appended}'"
        )
    skip = ("object_type=", "reference_type=", "Set the environment")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(skip)]
    if any(line.startswith("Available options") for line in lines):  # an unknown option of a group
        at = next(i for i, line in enumerate(lines) if line.startswith("Available options"))
        options = [option for option in lines[at + 1 :] if not option.endswith("_schema")]
        lines = [*lines[:at], f"{lines[at]} {', '.join(options)}"]
    lines = [line.replace("_schema", "") if "In 'train'" in line else line for line in lines]
    if full_key and not any(line.startswith("full_key:") for line in lines):
        lines.append(f"full_key: {full_key}")
    schema = getattr(cause, "object_type", None)
    known = dataclasses.is_dataclass(schema) and any(f.name == cause.key for f in dataclasses.fields(schema))
    if full_key and dataclasses.is_dataclass(schema) and not known:
        # A key its typed node does not have: the keys it has, not Hydra's "+key" advice, which only moves the
        # refusal to where the node is used (a data source's constructor).
        from deit_train.schema import takes

        lines.append(takes(full_key, [f.name for f in dataclasses.fields(schema) if not f.name.startswith("_")]))
    elif cause is not error:  # Hydra's own advice, e.g. "To append to your config use +trainer.x=1"
        lines += [line.strip() for line in str(error).splitlines() if line.strip().startswith("To ")]
    tilde = re.search(r"([\w.+/@-]+)=(~\S*)", text) if "LexerNoViableAltException" in text else None
    if tilde:  # data.root=~/data: the shell expands ~ only after the = of a plain name, not of a dotted key
        key, value = tilde.groups()
        lines.append(
            f"the shell left ~ unexpanded and Hydra's grammar refuses it: write {key}=$HOME{value[1:]} or an "
            f"absolute path, or quote it for Hydra: \"{key}='{value}'\""
        )
    return " | ".join(lines)
