"""The `deit-train` console script.

A single run is composed as Hydra composes its job, checked (run.Run.check) and its directory checked, before
anything is written: a bad value ends with exit status 2 and one line naming the key, the value and what is allowed,
with no run directory made and nothing changed in an existing one. The checked run is then handed to Hydra's job
machinery (its run directory, train.log, the config Lightning's DDP re-launch reads) as it is. Sweeps (-m) and
Hydra's own flags go to Hydra (train.main), each job checked in its job.

`--help` is ours and imports nothing heavy; so does every refusal the schema makes (neither Lightning, timm,
transformers nor torchvision is imported before the config passed the schema).
"""

import logging
import sys
from pathlib import Path

from deit_train.config import job_config, one_line
from deit_train.errors import DeitTrainError, error_boundary, fail

log = logging.getLogger("deit_train")

HELP = """\
usage: deit-train [group=option ...] [key=value ...]      train one run
       deit-train -m [group=a,b ...] [key=x,y ...]        a sweep (Hydra multirun), one run per combination

Train data-efficient image transformers (DeiT) with knowledge distillation. Every choice is a config group; pick an
option with group=option and change any value with group.key=value.

config groups:
  experiment      the papers' presets: deit_tiny_distilled, deit_small_distilled, deit_base_distilled, deit3_*, demo
  model           the student: deit_tiny, deit_small, deit_base, deit_*_plain, deit3_*, deit_demo, timm (any timm model)
  teacher         none, regnety_160 (the paper's), resnet50, bit_r152x2, timm, hf, ensemble
  loss            ce, bce, hard_distill, soft_distill
  data            imagefolder (the default: data.root=DIR), demo (generated), hf, webdataset, cifar10, cifar100
  augment         deit, three_augment, three_augment_src, mim, none
  optim           adamw, sgd, lamb
  trainer         default, cpu, gpu, ddp (trainer.devices=N), ddp_spawn, ddp_cpu
  logger          csv, tensorboard, wandb
  callbacks       default: last and best checkpoints, LR monitor, progress bar, a metrics line per epoch
  task            classify, mim (masked image modeling), teacher_cache
  debug           fdr (one batch through everything), overfit, limit, profiler
  hparams_search  optuna
  hydra/launcher  slurm (submitit), local_parallel (joblib)

examples:
  deit-train experiment=demo                                   a small DeiT on generated data (13 minutes, 2 CPUs)
  deit-train experiment=deit_small_distilled data.root=/data/imagenet trainer=ddp trainer.devices=8
  deit-train data.root=/data/my-images model=deit_small trainer.max_epochs=30      any ImageFolder
  deit-export outputs/<run>/checkpoints/best.ckpt exported/ && deit-eval exported/transformers /data/imagenet

the other commands: deit-eval, deit-predict, deit-export, deit-report, deit-shard (each with --help)
more: the README and docs/ (configuration.md: every key and where its default comes from; troubleshooting.md)
  deit-train --cfg job [overrides]    print the composed config without running
  deit-train --hydra-help             Hydra's own flags
"""


def cli() -> None:
    """deit-train: our help, a single run checked before Hydra writes anything, or Hydra (sweeps and its flags)."""
    args = sys.argv[1:]
    if any(arg in ("-h", "--help") for arg in args):
        print(HELP, end="")
        return
    if not args:
        refuse_a_bare_command()
    with error_boundary("deit-train"):
        args = one_value_per_key(args)
        refuse_mixed_modes(args)
    sys.argv[1:] = args
    if any(arg.startswith("-") for arg in args) or is_sweep(args):
        from deit_train.train import main

        with error_boundary("deit-train"):  # what escapes Hydra: a Ctrl-C of a launcher in this process (joblib's)
            main()
        return
    run_single(args)


# Hydra's modes: one per command line (its own refusal is a ValueError, which would read as a bug of ours)
MODES = {
    "-m": "--multirun",
    "--multirun": "--multirun",
    "-c": "--cfg",
    "--cfg": "--cfg",
    "-i": "--info",
    "--info": "--info",
    "-sc": "--shell-completion",
    "--shell-completion": "--shell-completion",
}


def refuse_mixed_modes(args: list[str]) -> None:
    modes = sorted({MODES[arg] for arg in args if arg in MODES})
    if len(modes) > 1:
        raise DeitTrainError(
            f"{' and '.join(modes)} together: choose one (--cfg job shows a single run's config, without -m; each "
            f"job of a sweep writes its own to <sweep dir>/<job>/.hydra/config.yaml)"
        )


def refuse_a_bare_command() -> None:
    """`deit-train` alone: the default source (an ImageFolder) would refuse it for its missing data.root; a first
    command is answered with the three that start something instead."""
    fail(
        "deit-train",
        "no run given. Try `deit-train experiment=demo trainer.max_epochs=3` (a small DeiT on generated data, about "
        "2 minutes on 2 CPU cores; its 35 epochs, the README's demo run, about 13 minutes), "
        "`deit-train data.root=/path/to/images` (an ImageFolder: train/<class>/*, val/<class>/*) or "
        "`deit-train experiment=deit_small_distilled data.root=/data/imagenet trainer=ddp trainer.devices=8`; "
        "deit-train --help lists every group",
        2,
    )


# ---------------------------------------------------------------------------------------------------- the overrides
def parse(args: list[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(args)


def override_key(arg: str) -> str | None:
    """The key (or group, with its @package) an override sets; None for a flag, a flag's value, a deletion (~key)
    or what Hydra's parser refuses (Hydra says why)."""
    from hydra.errors import HydraException

    if arg.startswith("-") or "=" not in arg:  # Hydra's flags and their values (-cn train, -c job)
        return None
    try:
        (override,) = parse([arg])
    except HydraException:
        return None
    if override.is_delete():
        return None
    return override.key_or_group + (f"@{override.package}" if override.package else "")


def is_sweep(args: list[str]) -> bool:
    from hydra.errors import HydraException

    try:
        return any(override.is_sweep_override() for override in parse([a for a in args if "=" in a]))
    except HydraException:
        return False


def layered(args: list[str]) -> list[str]:
    """A command line built in layers (a base, then changes): each key's last value, in its place, as Hydra would
    apply it."""
    keys = [override_key(arg) for arg in args]
    return [arg for i, (arg, key) in enumerate(zip(args, keys, strict=True)) if key is None or key not in keys[i + 1 :]]


def one_value_per_key(args: list[str]) -> list[str]:
    """A key given twice: the last value wins, as in Hydra, with a line saying so: the common layering of a base
    command with one key changed after it (`deit-train $BASE trainer.max_epochs=1`). Refused where the values are
    what the shell made of one pattern typed without quotes (shell_expansion): a shard pattern {000..099} or a
    glob would silently train on its last file."""
    from deit_train.run_dir import is_launch_leader

    given: dict[str, list[tuple[int, str]]] = {}
    for position, arg in enumerate(args):
        if (key := override_key(arg)) is not None:
            given.setdefault(key, []).append((position, arg.split("=", 1)[1]))
    for key, values in given.items():
        distinct = list(dict.fromkeys(value for _, value in values))
        if len(distinct) < 2:
            continue
        if shell_expansion(values):
            shown = ", ".join(f"{key}={value}" for _, value in values)
            raise DeitTrainError(
                f"{key} is given {len(values)} values that the shell made of one pattern ({shown}): Hydra would "
                f"keep only the last. Put the pattern in quotes, Hydra's inside the shell's ('{key}=\"...\"'); a "
                f"sweep over values is -m {key}=a,b"
            )
        if is_launch_leader():  # Lightning re-launches the other ranks with the same command line
            log.warning("%s is given %d values: the last, %s, is used", key, len(values), values[-1][1])
            print(f"deit-train: {key} is given {len(values)} values: the last, {values[-1][1]}, is used", flush=True)
    return layered(args)


def shell_expansion(values: list[tuple[int, str]]) -> bool:
    """Whether (position, value) pairs look like one word the shell expanded: neighbours on the command line whose
    values are existing files (a glob), or share a beginning and an end around differing middles (brace expansion:
    s-{000..003}.tar, {a,b}.tar)."""
    positions = [position for position, _ in values]
    if positions != list(range(positions[0], positions[0] + len(positions))):
        return False
    texts = [value for _, value in values]
    if all(Path(text).expanduser().exists() for text in texts):
        return True
    prefix = len(_common_prefix(texts))
    suffix = len(_common_prefix([text[::-1] for text in texts]))
    middles = [text[prefix : len(text) - suffix] for text in texts]
    return prefix > 0 and (suffix > 0 or all(middle.isdigit() for middle in middles))


def _common_prefix(texts: list[str]) -> str:
    first, last = min(texts), max(texts)
    size = next((i for i, (a, b) in enumerate(zip(first, last, strict=False)) if a != b), min(len(first), len(last)))
    return first[:size]


def refuse_bad_command_line(args: list[str]) -> None:
    """What `deit-train ARGS` checks before anything is written, and nothing else: a refusal ends the process with
    exit status 2 and one line; sweeps and Hydra's flags are left to each job (the tests, the property tests)."""
    with error_boundary("deit-train"):
        args = one_value_per_key(args)
        if any(arg.startswith("-") for arg in args) or is_sweep(args):
            return
        checked_run(compose(args)[1])


# ------------------------------------------------------------------------------------------------------ a single run
def run_single(args: list[str]) -> None:
    """Compose the run's config as Hydra composes a job, check it and its directory (nothing written), then run the
    same checked Run as Hydra's job."""
    from hydra.types import RunMode

    with error_boundary("deit-train"):
        hydra_app, hydra_cfg = compose(args)
        if hydra_cfg.hydra.mode == RunMode.MULTIRUN:  # a config that is a sweep (hparams_search=optuna): Hydra's
            from deit_train.train import main

            main()
            return
        refuse_a_grid_without_a_sweep(args)
        run = checked_run(hydra_cfg)
        run.directory.make()  # here, where a path that cannot be made ends in one line, not in Hydra's job
    execute(hydra_app, hydra_cfg, run)


def refuse_a_grid_without_a_sweep(args: list[str]) -> None:
    """hydra.sweeper.params typed for a single run: Hydra would run one job and ignore the grid."""
    grid = next((arg for arg in args if arg.lstrip("+").startswith("hydra.sweeper.params.")), None)
    if grid:
        raise DeitTrainError(
            f"{grid} sets a sweep's grid, which only a sweep runs: add -m (one run takes the value as its key, "
            f"{grid.lstrip('+').removeprefix('hydra.sweeper.params.')})"
        )


def compose(args: list[str]):
    """(Hydra, the run's config with its hydra node), as `@hydra.main` composes a single run."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from hydra.types import RunMode
    from omegaconf.errors import OmegaConfBaseException

    import deit_train.cluster  # noqa: F401  (its resolvers: the run directory's name under Slurm)
    import deit_train.schema  # noqa: F401  (the typed schema every config composes on)
    from deit_train.config import CONFIG_DIR, register_schemas

    register_schemas()
    GlobalHydra.instance().clear()
    try:
        search_path = create_config_search_path(CONFIG_DIR)
        hydra_app = Hydra.create_main_hydra2(task_name="train", config_search_path=search_path)
        cfg = hydra_app.compose_config("train", overrides=args, run_mode=RunMode.RUN, with_log_configuration=True)
        if not str(cfg.hydra.run.dir).strip() or not str(cfg.paths.cache_dir).strip():
            empty = "hydra.run.dir" if not str(cfg.hydra.run.dir).strip() else "paths.cache_dir"
            raise DeitTrainError(f"{empty} is empty: give a folder (an empty path would write into the current one)")
    except (HydraException, OmegaConfBaseException) as error:
        GlobalHydra.instance().clear()
        raise DeitTrainError(one_line(error, args)) from error
    GlobalHydra.instance().clear()  # composed: a later compose in this process (a test's, a sweep's) starts anew
    return hydra_app, cfg


def checked_run(hydra_cfg):
    """The run, checked; for the run's first process its directory too. A finished run asked to resume ends here."""
    from omegaconf.errors import OmegaConfBaseException

    from deit_train.run import Run

    cfg = job_config(hydra_cfg)
    try:
        run = Run(cfg, job=hydra_cfg.hydra)
        run.check(directory=True)  # the directory by the first process only: a rank the trainer started follows it
    except OmegaConfBaseException as error:
        raise DeitTrainError(one_line(error)) from error
    if run.finished is not None:
        from deit_train.metric_units import format_metrics

        print(
            f"deit-train: {run.directory.path} has finished its {cfg.trainer.max_epochs} epochs; resume=true "
            f"leaves it as it is (raise trainer.max_epochs to train on). Its metrics: {format_metrics(run.finished)}"
        )
        sys.exit(0)
    return run


def execute(hydra_app, hydra_cfg, run) -> None:
    """Hydra's job for the checked run: the run directory, train.log and HydraConfig (which Lightning's DDP re-launch
    reads), then the run's own steps (train.run_job)."""
    from hydra._internal.callbacks import Callbacks
    from hydra.core.utils import run_job
    from hydra.types import HydraContext, RunMode
    from omegaconf import open_dict

    from deit_train.train import run_job as deit_job

    callbacks = Callbacks(hydra_cfg)
    with open_dict(hydra_cfg):
        hydra_cfg.hydra.mode = RunMode.RUN
    callbacks.on_run_start(config=hydra_cfg, config_name="train")
    result = run_job(
        hydra_context=HydraContext(config_loader=hydra_app.config_loader, callbacks=callbacks),
        task_function=lambda cfg: deit_job(cfg, run),
        config=hydra_cfg,
        job_dir_key="hydra.run.dir",
        job_subdir_key=None,
        configure_logging=True,
    )
    callbacks.on_run_end(config=hydra_cfg, config_name="train", job_return=result)
    result.return_value  # noqa: B018  (raises what the job raised)
