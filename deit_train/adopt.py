"""A deit-train run's checkpoint brings its own network: `model.init=<run>.ckpt` starts the student as the run's model
(its model.* as the run recorded them: architecture, sizes, image size, drop path), and `teacher.checkpoint=<run>.ckpt`
teaches as the run's network at the run's image size, unless the user names others.

Named is what the command line typed (`model.img_size=384`, `teacher.name=resnet50`), and what a config it chose
sets: an option that names a network (`model=deit_small`, `teacher=regnety_160`, an experiment's model) names every
key of its group; a value set by another layer (an experiment's `teacher.name: regnety_160`) names that key. The
generic `timm` options name no network (their `name: resnet50` is a placeholder), and neither does the run's default
student. A named network other than the run's is refused naming both, before anything is written; a named image
size is kept (model.init resamples the position embeddings).

Which keys are named is Hydra's to say (its defaults list records who chose each group), from the job's hydra node:
its overrides (hydra.overrides.task) and config sources (hydra.searchpath, --config-dir). Without one (a config
composed by a test or a tool) nothing is adopted, and the checks at build time (models/init.py, teacher/network.py)
still refuse a mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from deit_train.errors import DeitTrainError
from deit_train.schema import VIT_ARCHITECTURE_FIELDS

# model.* keys that say where the student's weights come from and what of it trains, not what network it is: the
# user's own (a run that trained its head only, model.trainable=[head.*], does not freeze the next one's backbone)
MODEL_OWN_KEYS = ("init", "init_class_map", "init_unchecked_order", "pretrained", "trainable")
GENERIC_OPTIONS = ("timm",)  # model=timm, teacher=timm: any timm network, named by its .name


@dataclass
class Named:
    """The keys of a config group the user named: all of them (an option that names a network, `by` it), or these
    (`kwargs.x` for one of model.kwargs)."""

    everything: bool = False
    keys: set[str] = field(default_factory=set)
    by: str = ""

    def __contains__(self, key: str) -> bool:
        return self.everything or key in self.keys


def adopt_run_networks(cfg: DictConfig, job: DictConfig | None) -> list[str]:
    """cfg's model and teacher as the deit-train runs of model.init and teacher.checkpoint recorded them, where the
    user named none (module docstring); a named network other than the run's is refused naming both. `job`: the
    job's hydra node (what was typed, where its configs were found); None: unknown, nothing adopted. Returns a line
    for each network adopted (the run logs them beside its config line, which shows the options chosen)."""
    model_run = recorded_model(cfg.model.init)
    teacher_run = recorded_model(cfg.teacher.checkpoint) if cfg.teacher.library == "timm" else None
    if (model_run is None and teacher_run is None) or job is None:
        return []
    named = named_keys(cfg, job, ("model", "teacher"))
    said = []
    if model_run is not None:
        said += adopt_student(cfg, model_run, named["model"])
    if teacher_run is not None and not cfg.teacher.members:
        said += adopt_teacher(cfg, teacher_run, named["teacher"])
    return said


def recorded_model(path: str | None) -> DictConfig | None:
    """The model config a deit-train run checkpoint at `path` records, read without loading its tensors; None for
    anything else (a state dict, a folder, a Hub id, a file that cannot be read: its loader says what it is)."""
    if not path or not Path(path).expanduser().is_file():
        return None
    from deit_train.models.checkpoints import RunCheckpoint, read_torch_file

    path = Path(path).expanduser()
    try:
        try:
            stored = read_torch_file(path, "model.init", mmap=True)
        except DeitTrainError:  # a legacy (not zip) torch file cannot be mapped: read whole
            stored = read_torch_file(path, "model.init")
    except DeitTrainError:
        return None
    run = RunCheckpoint.of(stored)
    return None if run is None else run.model_config()


def another_network(name: str, recorded: str) -> bool:
    """Whether timm name `name` builds another network than `recorded` (timm is imported only where they differ)."""
    if name == recorded:
        return False
    from deit_train.models.architecture import same_architecture

    return not same_architecture(name, recorded)


def adopt_student(cfg: DictConfig, recorded: DictConfig, named: Named) -> list[str]:
    model = cfg.model
    run = f"model.init={model.init} is a deit-train run of {recorded.name} at {recorded.img_size} px"
    other_sizes = [
        key
        for key in VIT_ARCHITECTURE_FIELDS
        if key in named and None not in (model[key], recorded[key]) and model[key] != recorded[key]
    ]
    if ("name" in named and another_network(str(model.name), str(recorded.name))) or other_sizes:
        from deit_train.models.architecture import overrides_for, recorded_sizes

        chosen = f"model.name={model.name}" + "".join(f" model.{key}={model[key]}" for key in other_sizes)
        raise DeitTrainError(
            f"{run}{' with ' + recorded_sizes(recorded) if other_sizes else ''}, not {chosen}{named.by}: name no "
            f"model to start that network (model.init brings its own), or start from it with {overrides_for(recorded)}"
        )
    adopted = {
        key: recorded[key]
        for key in recorded
        if key not in (*MODEL_OWN_KEYS, "kwargs") and key not in named and key in model and model[key] != recorded[key]
    }
    kwargs = adopted_kwargs(model, recorded, named)
    if kwargs is not None:
        adopted["kwargs"] = kwargs
    if "kwargs.img_size" in named and "img_size" not in named:  # the size the network is built at, named
        adopted["img_size"] = model.kwargs.img_size
    for key, value in adopted.items():
        model[key] = value
    if not adopted:
        return []
    shown = " ".join(f"model.{key}={value}" for key, value in adopted.items() if key != "kwargs" and value is not None)
    return [f"{run}: the student is that model ({shown}); model=... names another"]


def adopted_kwargs(model: DictConfig, recorded: DictConfig, named: Named) -> dict | None:
    """The run's model.kwargs (timm.create_model's extra arguments) with those the user named on top, one by one; an
    img_size among them follows a named model.img_size (the position embeddings are resampled). None: unchanged."""
    if "kwargs" in named:
        return None
    kwargs = dict(recorded.get("kwargs") or {})
    kwargs.update({key: value for key, value in model.kwargs.items() if f"kwargs.{key}" in named})
    if "img_size" in kwargs and "img_size" in named:
        kwargs["img_size"] = model.img_size
    return None if kwargs == dict(model.kwargs) else kwargs


def adopt_teacher(cfg: DictConfig, recorded: DictConfig, named: Named) -> list[str]:
    teacher = cfg.teacher
    run = f"teacher.checkpoint={teacher.checkpoint} is a deit-train run of {recorded.name} at {recorded.img_size} px"
    if "name" in named and teacher.name is not None and another_network(str(teacher.name), str(recorded.name)):
        raise DeitTrainError(
            f"{run}, not teacher.name={teacher.name}{named.by}: set teacher.name={recorded.name}, or teacher=timm "
            f"without a name (the run's checkpoint brings its own network)"
        )
    adopted = []
    if "name" not in named and teacher.name != recorded.name:
        teacher.name = recorded.name
        adopted.append(f"teacher.name={recorded.name}")
    size = teacher.img_size if teacher.img_size is not None else cfg.model.img_size
    if "img_size" not in named and size != recorded.img_size:
        teacher.img_size = recorded.img_size
        adopted.append(f"teacher.img_size={recorded.img_size}")
    return [f"{run}: it teaches as that network ({' '.join(adopted)})"] if adopted else []


def named_keys(cfg: DictConfig, job: DictConfig, groups: tuple[str, ...]) -> dict[str, Named]:
    """For each group, the keys the job's overrides and the configs they chose name (module docstring): Hydra's
    defaults list, composed from the job's config sources, says who chose each group's option; the option's own
    values, composed alone, say which keys another layer (an experiment) changed."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.config_search_path_impl import ConfigSearchPathImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    search_path = ConfigSearchPathImpl()
    for source in job.runtime.config_sources:
        search_path.append(source.provider, f"{source.schema}://{source.path}")
    loader = ConfigLoaderImpl(config_search_path=search_path)
    overrides, config_name = list(job.overrides.task), job.job.config_name or "train"
    defaults = loader.compute_defaults_list(config_name, overrides, RunMode.RUN).overrides
    choices = {group: defaults.known_choices.get(group) for group in groups}
    alone = loader.load_configuration(
        config_name, [f"{group}={choice}" for group, choice in choices.items() if choice], RunMode.RUN
    )
    typed = [override.key_or_group for override in OverridesParser.create().parse_overrides(overrides)]
    named = {}
    for group in groups:
        own, composed = alone[group], cfg[group]
        keys = {key.split(".", 1)[1] for key in typed if key.startswith(f"{group}.")}
        keys |= {key.split(".")[0] for key in keys}
        layered = {key for key in composed if key not in own or composed[key] != own[key]} - keys  # by a config
        keys |= layered
        if group == "model":  # model.kwargs key by key
            mine, theirs = dict(composed.kwargs), dict(own.kwargs)
            keys |= {f"kwargs.{key}" for key in mine if key not in theirs or mine[key] != theirs[key]}
            keys.discard("kwargs")  # named as a whole only when typed so (model.kwargs={...})
            keys |= {"kwargs" for key in typed if key == f"{group}.kwargs"}
        metadata = defaults.override_metadata.get(group)
        chose = metadata is not None and choices[group] not in GENERIC_OPTIONS
        by = ""
        if chose:
            where = metadata.containing_config_path
            by = f" ({group}={choices[group]}" + (f", chosen by {where.replace('/', '=', 1)})" if where else ")")
        elif layered & {"name", *VIT_ARCHITECTURE_FIELDS} and defaults.known_choices.get("experiment"):
            by = f" (set by experiment={defaults.known_choices['experiment']})"
        named[group] = Named(everything=chose, keys=keys, by=by)
    return named
