"""The `deit-train` console script: a single run's config is composed and checked before Hydra starts, so that a bad
value ends with exit status 2 and one line naming the key, the value and what is allowed, and nothing is written:
no run directory, and nothing changed in an existing one (busy, or finished and asked to resume)."""

import dataclasses
import json
import re
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
    (-m, a,b lists) and Hydra's own flags are left to Hydra; each sweep job checks its config itself. A key given
    two values is refused for runs and sweeps alike."""
    with error_boundary("deit-train"):
        if is_launch_leader():  # Lightning starts the other ranks with its own hydra.run.dir=... appended
            check_repeated_keys(args)
        if any(arg.startswith("-") for arg in args):
            return
        check_command_line(args)


def override_key(arg: str) -> str | None:
    """The key (or group, with its @package) an override sets; None for a flag, a flag's value, a deletion (~key)
    or what Hydra's parser refuses (Hydra says why)."""
    if arg.startswith("-") or "=" not in arg:  # Hydra's flags and their values (-cn train, -c job)
        return None
    try:
        (override,) = OverridesParser.create().parse_overrides([arg])
    except HydraException:
        return None
    if override.is_delete():
        return None
    return override.key_or_group + (f"@{override.package}" if override.package else "")


def layered(args: list[str]) -> list[str]:
    """A command line that a program builds in layers (a base, then changes): each key's last value, in its place,
    as Hydra would apply it. For the programs that write deit-train command lines (scripts/demo.py, the tests); a
    command line as typed takes one value per key (check_repeated_keys)."""
    keys = [override_key(arg) for arg in args]
    return [arg for i, (arg, key) in enumerate(zip(args, keys, strict=True)) if key is None or key not in keys[i + 1 :]]


def check_repeated_keys(args: list[str]) -> None:
    """One value per key: Hydra applies the overrides in turn and the last silently wins, which is how a shard
    pattern typed without quotes arrives (the shell expands data.train=s-{0..3}.tar into four overrides). `~key`
    (delete) beside `+key=...` replaces a node, and a sweep's `key=a,b` is one override: both are fine."""
    given: dict[str, list[str]] = {}
    for arg in args:
        if (key := override_key(arg)) is None:
            continue
        if arg.split("=", 1)[1] not in [value.split("=", 1)[1] for value in given.get(key, [])]:
            given.setdefault(key, []).append(arg)
    for key, values in given.items():
        if len(values) > 1:
            raise DeitTrainError(
                f"{key} is given {len(values)} values on the command line ({', '.join(values)}): Hydra would keep "
                f"only the last. Give it once; a value the shell split (a shard pattern such as {{000..099}} or *, "
                f"a path with spaces) goes in quotes, Hydra's inside the shell's ('{key}=\"...\"'), and a sweep over "
                f"values is -m {key}=a,b"
            )


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
        run_dir = Path(cfg.hydra.run.dir).absolute()  # as Hydra's runtime.output_dir: the same config as main's
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
            print(
                f"deit-train: {run_dir} has finished its {cfg.trainer.max_epochs} epochs; resume=true leaves it "
                f"as it is (raise trainer.max_epochs to train on). Its metrics: {json.dumps(finished)}"
            )
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
    schema = getattr(cause, "object_type", None)
    known = dataclasses.is_dataclass(schema) and any(f.name == cause.key for f in dataclasses.fields(schema))
    if full_key and dataclasses.is_dataclass(schema) and not known:
        # A key its typed node does not have: the keys it has, not Hydra's "+key" advice, which only moves the
        # refusal to where the node is used (a data source's constructor).
        keys = ", ".join(f.name for f in dataclasses.fields(schema) if not f.name.startswith("_"))
        lines.append(f"{full_key.rsplit('.', 1)[0]} takes: {keys}")
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


def cli() -> None:
    """deit-train: check the command line, then run (train.main)."""
    refuse_bad_command_line(sys.argv[1:])
    with error_boundary("deit-train"):  # what escapes Hydra: a Ctrl-C of a launcher in this process (joblib's)
        main()
