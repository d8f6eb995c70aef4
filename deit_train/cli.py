"""The `deit-train` console script: a single run's config is composed and checked before Hydra starts, so that a bad
value ends with exit status 2 and one line naming the key, the value and what is allowed, and no run directory."""

import sys

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from deit_train.errors import DeitTrainError
from deit_train.train import CONFIG_DIR, check_config, main


def refuse_bad_command_line(args: list[str]) -> None:
    """Compose a single run's config as Hydra will and check it, before Hydra creates the run directory: a bad
    value ends here with exit status 2 and one line naming the key, the value and what is allowed. Sweeps (-m,
    a,b lists) and Hydra's own flags are left to Hydra; each sweep job checks its config itself (check_config)."""
    if any(arg.startswith("-") for arg in args):
        return
    try:
        overrides = OverridesParser.create().parse_overrides(args)
        if any(override.is_sweep_override() for override in overrides):
            return
        own = [
            arg
            for arg, override in zip(args, overrides, strict=True)
            if not override.key_or_group.startswith("hydra")
        ]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            # the run directory is Hydra's to choose: a stand-in here, where nothing is written
            cfg = compose("train", overrides=["paths.output_dir=.", *own])
        check_config(cfg)
    except DeitTrainError as error:
        refuse_and_exit(str(error))
    except (HydraException, OmegaConfBaseException) as error:
        refuse_and_exit(one_line(error))


def one_line(error: Exception) -> str:
    """Hydra's and OmegaConf's multi-line messages as one line, naming the key and the value."""
    cause = error.__cause__ if isinstance(error.__cause__, OmegaConfBaseException) else error
    text = str(cause).split("Config search path:")[0]
    skip = ("object_type=", "reference_type=", "Set the environment")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(skip)]
    if any(line.startswith("Available options") for line in lines):  # an unknown option of a group
        at = next(i for i, line in enumerate(lines) if line.startswith("Available options"))
        lines = [*lines[:at], f"{lines[at]} {', '.join(lines[at + 1 :])}"]
    full_key = getattr(cause, "full_key", None)
    if full_key and not any(line.startswith("full_key:") for line in lines):
        lines.append(f"full_key: {full_key}")
    return " | ".join(lines)


def refuse_and_exit(message: str) -> None:
    print(f"deit-train: error: {message}", file=sys.stderr)
    sys.exit(2)


def cli() -> None:
    """deit-train: check the command line, then run (train.main)."""
    refuse_bad_command_line(sys.argv[1:])
    main()
