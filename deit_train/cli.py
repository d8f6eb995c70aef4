"""The `deit-train` console script: a single run's config is composed and checked before Hydra starts, so that a bad
value ends with exit status 2 and one line naming the key, the value and what is allowed, and nothing is written:
no run directory, and nothing changed in an existing one (busy, or finished and asked to resume)."""

import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import open_dict
from omegaconf.errors import OmegaConfBaseException

from deit_train.errors import DeitTrainError, error_boundary, fail
from deit_train.run_dir import RunLock, check_writable, finished_metrics, is_launch_leader, refuse_overwrite
from deit_train.train import CONFIG_DIR, check_config, main


def refuse_bad_command_line(args: list[str]) -> None:
    """Compose a single run's config as Hydra will and check it, before Hydra creates the run directory. Sweeps
    (-m, a,b lists) and Hydra's own flags are left to Hydra; each sweep job checks its config itself."""
    if any(arg.startswith("-") for arg in args):
        return
    with error_boundary("deit-train"):
        check_command_line(args)


def check_command_line(args: list[str]) -> None:
    try:
        overrides = OverridesParser.create().parse_overrides(args)
        if any(override.is_sweep_override() for override in overrides):
            return
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("train", overrides=args, return_hydra_config=True)
        if not str(cfg.hydra.run.dir).strip() or not str(cfg.paths.cache_dir).strip():
            empty = "hydra.run.dir" if not str(cfg.hydra.run.dir).strip() else "paths.cache_dir"
            raise DeitTrainError(f"{empty} is empty: give a folder (an empty path would write into the current one)")
        run_dir = Path(cfg.hydra.run.dir)
        with open_dict(cfg):
            del cfg.hydra
            cfg.paths.output_dir = str(run_dir)
        check_config(cfg)
        if not is_launch_leader():  # a rank the trainer started: the first process checked the directory
            return
        check_writable(run_dir)
        RunLock(run_dir).check_free()
        refuse_overwrite(cfg, run_dir)
        if (finished := finished_metrics(cfg, run_dir)) is not None:
            print(f"deit-train: {run_dir} has finished its {cfg.trainer.max_epochs} epochs; resume=true leaves it "
                  f"as it is (raise trainer.max_epochs to train on). Its metrics: {json.dumps(finished)}")  # fmt: skip
            sys.exit(0)
    except (HydraException, OmegaConfBaseException) as error:
        fail("deit-train", one_line(error), 2)


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
    if cause is not error:  # Hydra's own advice, e.g. "To append to your config use +trainer.x=1"
        lines += [line.strip() for line in str(error).splitlines() if line.strip().startswith("To ")]
    return " | ".join(lines)


def cli() -> None:
    """deit-train: check the command line, then run (train.main)."""
    refuse_bad_command_line(sys.argv[1:])
    main()
