"""A deit-train run's checkpoint brings its own network (adopt.py): as model.init, the student is the run's
model; as teacher.checkpoint, the teacher is the run's network at its image size; unless the command line or a
config it chose names others, where a mismatch is refused naming both before anything is written."""

import json
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deit_train.errors import DeitTrainError
from deit_train.train import train

from .conftest import TINY, TINY_DEMO, TINY_RUN, compose_config
from .tiny import TINY_VIT_SIZES

# A run that names no model: the data and the trainer of TINY_RUN, without experiment=demo (which names deit_demo).
UNNAMED = [arg for arg in TINY_RUN if not arg.startswith(("experiment=", "model."))] + [
    "data=demo",
    *TINY_DEMO,
    "trainer=cpu",
]


@pytest.fixture(scope="module")
def convnet_run(tmp_path_factory, cache_dir) -> Path:
    """A one-epoch deit-train run of resnet10t at 24 px: its best.ckpt."""
    output = tmp_path_factory.mktemp("convnet") / "run"
    train(
        compose_config(
            [*TINY_RUN, *TINY_DEMO, "model=timm", "model.name=resnet10t", "model.img_size=24"], output, cache_dir
        )
    )
    return output / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory, cache_dir) -> tuple[Path, dict]:
    """A one-epoch deit-train run of the suite's tiny DeiT at 16 px: its best.ckpt and metrics."""
    output = tmp_path_factory.mktemp("vit") / "run"
    metrics = train(compose_config(TINY, output, cache_dir)).metrics
    return output / "checkpoints" / "best.ckpt", metrics


def recorded(checkpoint: Path) -> dict:
    """The model config the checkpoint records, read here with torch alone."""
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["hyper_parameters"]["config"]["model"]


def checked(*args: str, tmp_path, cache_dir):
    """The run's config as `deit-train ARGS` checks it (cli.compose, then Run.check_config with the typed
    overrides), or the DeitTrainError it is refused with."""
    from deit_train.cli import compose
    from deit_train.config import job_config
    from deit_train.run import Run

    _, hydra_cfg = compose([*args, f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={cache_dir}"])
    run = Run(job_config(hydra_cfg), job=hydra_cfg.hydra)
    run.check_config()
    return run.cfg


OWN = ("init", "init_class_map", "init_unchecked_order", "pretrained")


def test_model_init_from_a_run_brings_its_model_unless_one_is_named(convnet_run, vit_run, tmp_path, cache_dir):
    run_model = recorded(convnet_run)
    cfg = checked(*UNNAMED, f"model.init={convnet_run}", tmp_path=tmp_path, cache_dir=cache_dir)
    assert {k: v for k, v in cfg.model.items() if k not in OWN} == {k: v for k, v in run_model.items() if k not in OWN}
    assert cfg.model.name == "resnet10t" and cfg.model.img_size == 24
    assert cfg.model.init == str(convnet_run)

    # a typed image size is kept (its position embeddings are resampled); model=timm names no network
    cfg = checked(
        *UNNAMED, "model=timm", f"model.init={convnet_run}", "model.img_size=32", tmp_path=tmp_path, cache_dir=cache_dir
    )
    assert (cfg.model.name, cfg.model.img_size) == ("resnet10t", 32)

    # a ViT's sizes come with it; a typed size other than the run's is refused naming both
    vit = recorded(vit_run[0])
    cfg = checked(*UNNAMED, f"model.init={vit_run[0]}", tmp_path=tmp_path, cache_dir=cache_dir)
    assert [cfg.model[k] for k in ("name", "img_size", "patch_size", "embed_dim", "depth", "num_heads")] == [
        vit[k] for k in ("name", "img_size", "patch_size", "embed_dim", "depth", "num_heads")
    ]
    with pytest.raises(DeitTrainError) as refused:
        checked(*UNNAMED, f"model.init={vit_run[0]}", "model.depth=3", tmp_path=tmp_path, cache_dir=cache_dir)
    assert (
        f"run of {vit['name']} at 16 px with patch_size=4 embed_dim=32 depth=2 num_heads=2, not model.name="
        f"{vit['name']} model.depth=3: " in str(refused.value)
    )

    # an experiment that chooses no model (the recipe; the size presets choose it) leaves it to the run
    cfg = checked(
        *UNNAMED,
        "experiment=deit_distilled",
        "trainer=cpu",
        "teacher=none",
        "loss=ce",
        f"model.init={convnet_run}",
        tmp_path=tmp_path,
        cache_dir=cache_dir,
    )
    assert cfg.model.name == "resnet10t"


@pytest.mark.parametrize(
    ("naming", "named"),
    [
        (["model=deit_small"], "deit_small_distilled_patch16_224"),  # typed
        (["model.name=resnet18"], "resnet18"),
        (["experiment=demo"], "deit_tiny_distilled_patch16_224"),  # the experiment chooses model=deit_demo
        (["experiment=deit_tiny_distilled", "trainer=cpu", "teacher=none", "loss=ce"], "deit_tiny_distilled"),
    ],
)
def test_a_named_model_other_than_the_runs_is_refused_naming_both(convnet_run, naming, named, tmp_path, cache_dir):
    with pytest.raises(DeitTrainError) as refused:
        checked(*UNNAMED, *naming, f"model.init={convnet_run}", tmp_path=tmp_path, cache_dir=cache_dir)
    assert f"model.init={convnet_run} is a deit-train run of resnet10t at 24 px, not model.name={named}" in str(
        refused.value
    )
    assert str(refused.value).endswith("start from it with model=timm model.name=resnet10t")
    assert not (tmp_path / "run").exists()


def test_teacher_checkpoint_from_a_run_teaches_as_its_network(convnet_run, tmp_path, cache_dir):
    distil = [
        *UNNAMED,
        *[f"model.{k}={v}" for k, v in (("patch_size", 4), ("depth", 2), ("embed_dim", 32))],
        "model.num_heads=2",
        "model.img_size=16",
        "loss=hard_distill",
    ]
    for teacher in (["teacher=timm"], []):  # teacher=timm names no network; nor does the default (none)
        cfg = checked(*distil, *teacher, f"teacher.checkpoint={convnet_run}", tmp_path=tmp_path, cache_dir=cache_dir)
        assert (cfg.teacher.name, cfg.teacher.img_size) == ("resnet10t", 24)

    # teacher=none typed chooses no network for the weights: said so, naming both ways on
    with pytest.raises(DeitTrainError, match=r"but no teacher network \(teacher=none\): drop teacher=none"):
        checked(*distil, "teacher=none", f"teacher.checkpoint={convnet_run}", tmp_path=tmp_path, cache_dir=cache_dir)

    cfg = checked(
        *distil,
        "teacher=timm",
        f"teacher.checkpoint={convnet_run}",
        "teacher.img_size=16",
        tmp_path=tmp_path,
        cache_dir=cache_dir,
    )
    assert (cfg.teacher.name, cfg.teacher.img_size) == ("resnet10t", 16)

    for naming, named in (
        (["teacher=timm", "teacher.name=resnet18"], "resnet18"),
        (["teacher=resnet50"], "resnet50 (teacher=resnet50)"),
        (["teacher=regnety_160"], "regnety_160.deit_in1k (teacher=regnety_160)"),
    ):
        with pytest.raises(DeitTrainError) as refused:
            checked(*distil, *naming, f"teacher.checkpoint={convnet_run}", tmp_path=tmp_path, cache_dir=cache_dir)
        assert str(refused.value).startswith(
            f"teacher.checkpoint={convnet_run} is a deit-train run of resnet10t at 24 px, not teacher.name={named}: "
            "set teacher.name=resnet10t"
        )


def test_an_experiments_teacher_name_is_named(convnet_run, vit_run, tmp_path, cache_dir):
    """experiment=deit_transfer sets teacher.name: regnety_160 in its body (teacher=timm): named, so refused."""
    with pytest.raises(
        DeitTrainError, match=r"24 px, not teacher.name=regnety_160 \(set by experiment=deit_transfer\): "
    ):
        checked(
            "experiment=deit_transfer",
            "trainer=cpu",
            f"model.init={vit_run[0]}",
            "model=deit_demo",
            *[f"model.{k}={v}" for k, v in TINY_VIT_SIZES.items()],
            "model.img_size=16",
            f"teacher.checkpoint={convnet_run}",
            tmp_path=tmp_path,
            cache_dir=cache_dir,
        )


def test_without_the_typed_overrides_nothing_is_adopted(convnet_run, tmp_path, cache_dir):
    """A config composed outside a Hydra job (a test's, a tool's) says nothing of what was typed: the run is as
    composed, and the build's own check refuses the mismatch (models/init.py)."""
    from deit_train.run import Run

    cfg = compose_config([*UNNAMED, f"model.init={convnet_run}"], tmp_path / "run", cache_dir)
    Run(cfg).check_config()
    assert cfg.model.name == "deit_tiny_distilled_patch16_224"


@pytest.mark.slow  # two runs through the command line
def test_a_run_from_the_command_line_adopts_its_checkpoints_networks(vit_run, tmp_path, cache_dir, monkeypatch):
    """deit-train with model.init=<a run> and no model: at lr 0 the student is the run's network, so it scores what
    the run scored; with teacher.checkpoint=<the run> and no teacher name, the teacher scores it too."""
    from deit_train.cli import cli

    checkpoint, first = vit_run
    monkeypatch.chdir(tmp_path)
    base = [*UNNAMED, f"paths.cache_dir={cache_dir}", "optim.lr=0", "optim.min_lr=0", "optim.warmup_lr=0"]
    monkeypatch.setattr(
        sys, "argv", ["deit-train", *base, f"model.init={checkpoint}", f"hydra.run.dir={tmp_path / 's'}"]
    )
    cli()
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    log = (tmp_path / "s" / "train.log").read_text()  # beside the config line, whose model=deit_tiny it replaced
    assert "the student is that model (model.img_size=16 model.patch_size=4 model.embed_dim=32 model.depth=2" in log
    assert metrics["last_epoch"]["val/acc1_percent"] == pytest.approx(100 * first["val/acc1"], abs=1e-4)

    teacher = ["loss=hard_distill", "teacher=timm", f"teacher.checkpoint={checkpoint}"]
    monkeypatch.setattr(
        sys, "argv", ["deit-train", *base, f"model.init={checkpoint}", *teacher, f"hydra.run.dir={tmp_path / 't'}"]
    )
    cli()
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert metrics["last_epoch"]["val/teacher_acc1_percent"] == pytest.approx(100 * first["val/acc1"], abs=1e-4)


def experiment_model(experiment: str) -> tuple[bool, dict]:
    """Whether an experiment's defaults (its parents' included) choose the model group, and the model keys their
    bodies set: read from the yaml files."""
    import yaml

    from deit_train.config import CONFIG_DIR

    text = yaml.safe_load((Path(CONFIG_DIR) / "experiment" / f"{experiment}.yaml").read_text())
    chooses, keys = False, {}
    for entry in text.get("defaults", []):
        if isinstance(entry, dict) and "override /model" in entry:
            chooses = True
        elif isinstance(entry, str) and entry != "_self_":
            parent_chooses, parent_keys = experiment_model(entry)
            chooses, keys = chooses or parent_chooses, {**keys, **parent_keys}
    return chooses, {**keys, **(text.get("model") or {})}


MODEL_OPTIONS = ["deit_small", "timm", "deit_demo"]
EXPERIMENTS = ["deit_distilled", "deit_tiny_distilled", "demo", "deit_feature_distilled"]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    option=st.sampled_from([None, *MODEL_OPTIONS]),
    experiment=st.sampled_from([None, *EXPERIMENTS]),
    img_size=st.sampled_from([None, 32, 48]),
    drop_path=st.sampled_from([None, 0.2]),
)
def test_each_model_key_is_the_typed_the_chosen_or_the_runs(
    convnet_run, tmp_path, cache_dir, option, experiment, img_size, drop_path
):
    """Drawn command lines with model.init=<a resnet10t run at 24 px>: each model key is what was typed, else what
    the experiment's body sets, else the run's; a model option chosen (on the command line or by the experiment's
    defaults) other than the generic timm names the network, and one other than the run's is refused naming both."""
    typed = {"img_size": img_size, "drop_path_rate": drop_path}
    args = [*UNNAMED, "teacher=none", "loss=ce", "loss.feature_weight=0", f"model.init={convnet_run}"]
    args += [f"experiment={experiment}"] * bool(experiment) + [f"model={option}"] * bool(option)
    args += [f"model.{key}={value}" for key, value in typed.items() if value is not None]
    chooses, body = experiment_model(experiment) if experiment else (False, {})
    chosen = (option not in (None, "timm")) or (option is None and chooses)
    if chosen:
        with pytest.raises(DeitTrainError, match=r"is a deit-train run of resnet10t at 24 px, not model.name="):
            checked(*args, tmp_path=tmp_path, cache_dir=cache_dir)
        return
    cfg = checked(*args, tmp_path=tmp_path, cache_dir=cache_dir)
    run_model = recorded(convnet_run)
    for key, value in run_model.items():
        if key in OWN:
            continue
        expected = typed[key] if typed.get(key) is not None else body.get(key, value)
        assert cfg.model[key] == expected, (key, args)


def test_what_a_run_brings_is_its_network_not_its_training_choices(tmp_path, cache_dir):
    """A run that trained its head only (model.trainable=[head.*]) does not freeze the next run's backbone; a timm ViT
    built with model.kwargs keeps the run's kwargs, with one typed kwarg on top and a typed image size followed by
    kwargs.img_size; a legacy (not zip) checkpoint file is read too."""
    import timm

    from .test_models import save_run_checkpoint

    sizes = {"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2}
    network = timm.create_model("vit_tiny_patch16_224", num_classes=10, **sizes)
    model = {"name": "vit_tiny_patch16_224", "img_size": 16, "kwargs": sizes, "trainable": ["head.*"]}
    save_run_checkpoint(tmp_path / "probe.ckpt", network, model, [f"c{i}" for i in range(10)])
    init = f"model.init={tmp_path / 'probe.ckpt'}"

    cfg = checked(*UNNAMED, init, tmp_path=tmp_path, cache_dir=cache_dir)
    assert (cfg.model.name, cfg.model.trainable, dict(cfg.model.kwargs)) == ("vit_tiny_patch16_224", None, sizes)
    cfg = checked(
        *UNNAMED, init, "+model.kwargs.drop_rate=0.1", "model.img_size=32", tmp_path=tmp_path, cache_dir=cache_dir
    )
    assert dict(cfg.model.kwargs) == {**sizes, "drop_rate": 0.1, "img_size": 32} and cfg.model.img_size == 32

    cfg = checked(*UNNAMED, init, "+model.kwargs.img_size=32", tmp_path=tmp_path, cache_dir=cache_dir)
    assert cfg.model.img_size == cfg.model.kwargs.img_size == 32  # the size the network is built at, named
    with pytest.raises(DeitTrainError) as refused:  # a named size the run does not have: its kwargs named to fix it
        checked(
            *UNNAMED, init, "model=timm", "model.name=vit_small_patch16_224", tmp_path=tmp_path, cache_dir=cache_dir
        )
    assert str(refused.value).endswith(
        "start from it with model=timm model.name=vit_tiny_patch16_224 +model.kwargs.img_size=16 "
        "+model.kwargs.patch_size=4 +model.kwargs.depth=1 +model.kwargs.embed_dim=32 +model.kwargs.num_heads=2"
    )

    stored = torch.load(tmp_path / "probe.ckpt", weights_only=True)
    torch.save(stored, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    cfg = checked(*UNNAMED, f"model.init={tmp_path / 'legacy.ckpt'}", tmp_path=tmp_path, cache_dir=cache_dir)
    assert cfg.model.name == "vit_tiny_patch16_224"


def test_configs_the_user_adds_are_read_and_who_chose_a_network_is_named(convnet_run, tmp_path, cache_dir):
    """An experiment of the user's own (hydra.searchpath) composes as the job's: before, the defaults were read from
    deit-train's conf/ alone and the run ended as 'a bug'. A refusal names the option and the experiment that chose
    the network."""
    mine = tmp_path / "myconf" / "experiment"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text("# @package _global_\nmodel:\n  drop_path_rate: 0.3\n")
    (mine / "mine_model.yaml").write_text("# @package _global_\ndefaults:\n  - override /model: deit_small\n")
    search = f"hydra.searchpath=[file://{tmp_path / 'myconf'}]"
    cfg = checked(
        *UNNAMED, search, "experiment=mine", f"model.init={convnet_run}", tmp_path=tmp_path, cache_dir=cache_dir
    )
    assert (cfg.model.name, cfg.model.drop_path_rate) == ("resnet10t", 0.3)
    with pytest.raises(
        DeitTrainError,
        match=r"not model.name=deit_small_distilled_patch16_224 \(model=deit_small, "
        r"chosen by experiment=mine_model\): name no model",
    ):
        checked(
            *UNNAMED,
            search,
            "experiment=mine_model",
            f"model.init={convnet_run}",
            tmp_path=tmp_path,
            cache_dir=cache_dir,
        )


def test_a_network_an_experiments_body_names_is_said_to_be_its(convnet_run, tmp_path, cache_dir):
    """experiment=teacher_fixres_384 sets model.name in its body (no model option): the refusal says who named it."""
    with pytest.raises(DeitTrainError, match=r"not model.name=regnety_160\S* \(set by experiment=teacher_fixres_384\)"):
        checked(
            *UNNAMED,
            "experiment=teacher_fixres_384",
            "trainer=cpu",
            "model.pretrained=false",
            f"model.init={convnet_run}",
            tmp_path=tmp_path,
            cache_dir=cache_dir,
        )
