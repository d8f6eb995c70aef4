"""A deit-train run's checkpoint brings its own network: `model.init=<run>.ckpt` starts the student as the run's model
(its model.* as the run recorded them: architecture, sizes, image size, drop path), and `teacher.checkpoint=<run>.ckpt`
teaches as the run's network at the run's image size, unless the user names others.

Named is what the command line typed (`model.img_size=384`, `teacher.name=resnet50`), and what a config it chose
sets: an option that names a network (`model=deit_small`, `teacher=regnety_160`, an experiment's model) names every
key of its group; a value set by another layer (an experiment's `teacher.name: regnety_160`) names that key. The
generic `timm` options name no network (their `name: resnet50` is a placeholder), and neither does the run's default
student. A named network other than the run's is refused naming both, before anything is written; a named image
size is kept (model.init resamples the position embeddings).

Which keys are named is Hydra's to say (its defaults list records who chose each group): the overrides are the job's
(hydra.overrides.task). Without them (a config composed by a test or a tool) everything counts as named: nothing is
adopted, and the checks at build time (models/init.py, teacher/network.py) still refuse a mismatch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from deit_train.errors import DeitTrainError

log = logging.getLogger("deit_train")

# model.* keys that say where the student's weights come from, not what network it is: the user's own
MODEL_INIT_KEYS = ("init", "init_class_map", "init_unchecked_order", "pretrained")
GENERIC_OPTIONS = ("timm",)  # model=timm, teacher=timm: any timm network, named by its .name


@dataclass
class Named:
    """The keys of a config group the user named: all of them (an option that names a network), or these."""

    everything: bool = False
    keys: set[str] = field(default_factory=set)

    def __contains__(self, key: str) -> bool:
        return self.everything or key in self.keys


def adopt_run_networks(cfg: DictConfig, overrides: list[str] | None) -> None:
    """cfg's model and teacher as the deit-train runs of model.init and teacher.checkpoint recorded them, where the
    user named none (module docstring); a named network other than the run's is refused naming both."""
    model_run = recorded_model(cfg.model.init)
    teacher_run = recorded_model(cfg.teacher.checkpoint) if cfg.teacher.library == "timm" else None
    if (model_run is None and teacher_run is None) or overrides is None:
        return
    named = named_keys(cfg, overrides, ("model", "teacher"))
    if model_run is not None:
        adopt_student(cfg, model_run, named["model"])
    if teacher_run is not None and not cfg.teacher.members:
        adopt_teacher(cfg, teacher_run, named["teacher"])


def recorded_model(path: str | None) -> DictConfig | None:
    """The model config a deit-train run checkpoint at `path` records, read without loading its tensors; None for
    anything else (a state dict, a folder, a Hub id, a file that cannot be read: its loader says what it is)."""
    if not path or not Path(path).expanduser().is_file():
        return None
    from deit_train.models.checkpoints import RunCheckpoint, read_torch_file

    try:
        run = RunCheckpoint.of(read_torch_file(Path(path).expanduser(), "model.init", mmap=True))
    except DeitTrainError:
        return None
    return None if run is None else run.model_config()


def another_network(name: str, recorded: str) -> bool:
    """Whether timm name `name` builds another network than `recorded` (timm is imported only where they differ)."""
    if name == recorded:
        return False
    from deit_train.models.architecture import same_architecture

    return not same_architecture(name, recorded)


def adopt_student(cfg: DictConfig, recorded: DictConfig, named: Named) -> None:
    run = f"model.init={cfg.model.init} is a deit-train run of {recorded.name} at {recorded.img_size} px"
    if "name" in named and another_network(str(cfg.model.name), str(recorded.name)):
        from deit_train.models.architecture import overrides_for

        raise DeitTrainError(
            f"{run}, not model.name={cfg.model.name}: name no model to start that network (model.init brings its "
            f"own), or start from it with {overrides_for(recorded)}"
        )
    adopted = {
        key: recorded[key]
        for key in recorded
        if key not in MODEL_INIT_KEYS and key not in named and key in cfg.model and cfg.model[key] != recorded[key]
    }
    if not adopted:
        return
    for key, value in adopted.items():
        cfg.model[key] = value
    shown = " ".join(f"model.{key}={value}" for key, value in adopted.items() if key in ("name", "img_size"))
    log.warning("deit-train: %s: the student is that model (%s); model=... names another", run, shown or "its sizes")


def adopt_teacher(cfg: DictConfig, recorded: DictConfig, named: Named) -> None:
    teacher = cfg.teacher
    run = f"teacher.checkpoint={teacher.checkpoint} is a deit-train run of {recorded.name} at {recorded.img_size} px"
    if "name" in named and teacher.name is not None and another_network(str(teacher.name), str(recorded.name)):
        raise DeitTrainError(
            f"{run}, not teacher.name={teacher.name}: set teacher.name={recorded.name}, or teacher=timm without a "
            f"name (the run's checkpoint brings its own network)"
        )
    adopted = []
    if "name" not in named and teacher.name != recorded.name:
        teacher.name = recorded.name
        adopted.append(f"teacher.name={recorded.name}")
    size = teacher.img_size if teacher.img_size is not None else cfg.model.img_size
    if "img_size" not in named and size != recorded.img_size:
        teacher.img_size = recorded.img_size
        adopted.append(f"teacher.img_size={recorded.img_size}")
    if adopted:
        log.warning("deit-train: %s: it teaches as that network (%s)", run, " ".join(adopted))


def named_keys(cfg: DictConfig, overrides: list[str], groups: tuple[str, ...]) -> dict[str, Named]:
    """For each group, the keys the overrides and the configs they chose name (module docstring): Hydra's defaults
    list says who chose each group's option; the option's own values, composed alone, say which keys another layer
    (an experiment) changed."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    from deit_train.config import CONFIG_DIR

    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(CONFIG_DIR))
    defaults = loader.compute_defaults_list("train", overrides, RunMode.RUN).overrides
    choices = {group: defaults.known_choices.get(group) for group in groups}
    alone = loader.load_configuration(
        "train", [f"{group}={choice}" for group, choice in choices.items() if choice], RunMode.RUN
    )
    typed = [override.key_or_group for override in OverridesParser.create().parse_overrides(overrides)]
    named = {}
    for group in groups:
        own = alone[group]
        keys = {key.split(".")[1] for key in typed if key.startswith(f"{group}.")}
        keys |= {key for key in cfg[group] if key not in own or cfg[group][key] != own[key]}
        chose = group in defaults.override_metadata and choices[group] not in GENERIC_OPTIONS
        named[group] = Named(everything=chose, keys=keys)
    return named
