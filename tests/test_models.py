"""Students against timm's own forward, and the teacher's freezing, weights and class checks."""

import pickle

import pytest
import timm
import torch
from omegaconf import OmegaConf

from deit_train.errors import DeitTrainError
from deit_train.mim.model import MaskedImageModel
from deit_train.models.checkpoints import load_weights
from deit_train.models.student import build_student, compile_student, forward_heads
from deit_train.models.trained_model import load_trained_model
from deit_train.schema import ModelConfig
from deit_train.teacher import build_teacher_network

from .conftest import save_safetensors

TINY_VIT = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
NO_VIT = dict(patch_size=None, embed_dim=None, depth=None, num_heads=None)  # a convnet's model config


def tiny_student_config(**changes):
    return OmegaConf.merge(
        OmegaConf.structured(ModelConfig),
        {
            "name": "deit_tiny_distilled_patch16_224",
            "pretrained": False,
            "drop_path_rate": 0.0,
            **TINY_VIT,
            **changes,
        },
    )


def teacher_config(**changes):
    return OmegaConf.create(
        {"name": "resnet10t", "library": "timm", "pretrained": False, "checkpoint": None, **changes}
    )


def test_student_architecture_fields_reach_timm():
    student = build_student(tiny_student_config(depth=3, embed_dim=48, num_heads=3), num_classes=7)
    assert len(student.blocks) == 3
    assert student.embed_dim == 48
    assert student.head.out_features == student.head_dist.out_features == 7
    assert student.patch_embed.grid_size == (4, 4)


def test_forward_heads_equal_timm_in_train_and_eval_mode():
    student = build_student(tiny_student_config(), num_classes=5)
    images = torch.randn(3, 3, 16, 16)
    student.train()
    timm_cls, timm_dist = student(images)  # distilled training: timm returns both heads
    cls_logits, dist_logits = forward_heads(student, images)
    torch.testing.assert_close(cls_logits, timm_cls)
    torch.testing.assert_close(dist_logits, timm_dist)
    student.eval()
    cls_logits, dist_logits = forward_heads(student, images)
    torch.testing.assert_close((cls_logits + dist_logits) / 2, student(images))  # timm's averaged prediction


def test_ema_of_a_compiled_student_runs_its_own_weights():
    """compile=true with EMA: ModelEmaV3 deep-copies the compiled student; the copy's features must come from the
    copy's weights (they came from the student's: val_ema reported the student's backbone with the EMA's heads)."""
    from timm.utils import ModelEmaV3

    student = build_student(tiny_student_config(), num_classes=5).eval()
    compile_student(student, backend="eager")  # the binding is the bug, not the backend: eager keeps the test fast
    ema = ModelEmaV3(student, decay=0.5)
    with torch.no_grad():
        for parameter in ema.module.parameters():
            parameter.add_(torch.randn_like(parameter))
    reference = build_student(tiny_student_config(), num_classes=5).eval()  # uncompiled, with the EMA's weights
    reference.load_state_dict(ema.module.state_dict())
    images = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(forward_heads(ema.module, images), forward_heads(reference, images))
    original = build_student(tiny_student_config(), num_classes=5).eval()  # and the student its own
    original.load_state_dict(student.state_dict())
    torch.testing.assert_close(forward_heads(student, images), forward_heads(original, images))


def test_single_head_student_from_any_timm_name():
    config = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"name": "resnet10t", "img_size": 16})
    student = build_student(config, 4)
    logits, dist_logits = forward_heads(student.eval(), torch.randn(2, 3, 16, 16))
    assert dist_logits is None and logits.shape == (2, 4)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(DeitTrainError, match="unknown timm model 'deit_huge_distilled'"):
        build_student(tiny_student_config(name="deit_huge_distilled"), 10)


def save_teacher(path, num_classes, wrapper=None):
    model = timm.create_model("resnet10t", num_classes=num_classes)
    if path.suffix == ".safetensors":
        save_safetensors(model, path)
    else:
        state = model.state_dict()
        torch.save({wrapper: state} if wrapper else state, path)
    return model


@pytest.mark.parametrize(
    "filename,wrapper", [("t.pth", None), ("t.pth", "model"), ("t.pt", "state_dict"), ("t.safetensors", None)]
)
def test_teacher_loads_every_checkpoint_form_and_is_frozen(tmp_path, filename, wrapper):
    reference = save_teacher(tmp_path / filename, 3, wrapper).eval()
    teacher = build_teacher_network(teacher_config(checkpoint=str(tmp_path / filename)), ["a", "b", "c"])
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(teacher(images), reference(images))


def test_teacher_class_count_must_match_data(tmp_path):
    save_teacher(tmp_path / "t10.pth", 10)
    with pytest.raises(DeitTrainError, match=r"has 10 classes .* but the data has 100"):
        build_teacher_network(teacher_config(checkpoint=str(tmp_path / "t10.pth")), [f"c{i}" for i in range(100)])


def test_teacher_without_weights_is_refused():
    with pytest.raises(DeitTrainError, match="has no weights"):
        build_teacher_network(teacher_config(), ["a", "b"])


def test_teacher_of_another_architecture_names_the_mismatch(tmp_path):
    torch.save(timm.create_model("resnet18", num_classes=2).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(DeitTrainError, match="does not match the teacher resnet10t architecture"):
        build_teacher_network(teacher_config(checkpoint=str(tmp_path / "r18.pth")), ["a", "b"])


CLASSIFY, MIM = "deit_train.tasks.classify.Classify", "deit_train.mim.task.MaskedImageModeling"


def save_run_checkpoint(path, network, model: dict, class_names, config=None, prefix="student.", task=CLASSIFY):
    """A deit-train run checkpoint as Lightning writes it: the network's weights under `prefix` (where its module
    keeps them), the run's config (a composed one, else its model, loss and task), the classes (none: a task=mim
    run)."""
    config = config or {"model": model, "loss": {"distillation_type": "none"}, "task": {"_target_": task}}
    torch.save(
        {
            "state_dict": {f"{prefix}{k}": v for k, v in network.state_dict().items()},
            "class_names": class_names,
            "pytorch-lightning_version": "2.6",
            "hyper_parameters": {"config": config},
            "deit_train": {"format": 1, "student": "model.encoder." if prefix == "model." else "student."},
        },
        path,
    )


def test_a_checkpoint_is_rebuilt_for_inference_by_the_task_it_records(tiny_config, tmp_path):
    """Classify rebuilds the student (both heads averaged), task=mim its masked image model; a classify run whose
    class names were lost is refused as a classifier, never taken for a task=mim run, and a checkpoint whose task
    is not recorded, or not a task, is refused in one line."""
    images = torch.randn(2, 3, 16, 16)
    cfg = tiny_config()
    config = OmegaConf.to_container(cfg, resolve=True)
    student = build_student(cfg.model, num_classes=2)
    save_run_checkpoint(tmp_path / "classify.ckpt", student, None, ["a", "b"], config)
    trained = load_trained_model(tmp_path / "classify.ckpt")
    student.eval().set_distilled_training(False)
    torch.testing.assert_close(trained.model(images), student(images), rtol=0, atol=0)
    assert (trained.class_names, trained.img_size) == (["a", "b"], 16)

    save_run_checkpoint(tmp_path / "stripped.ckpt", student, None, None, config)
    for classifier in (True, False):
        with pytest.raises(DeitTrainError, match=r"stripped.ckpt: its class names are not a list of strings \(None\)"):
            load_trained_model(tmp_path / "stripped.ckpt", classifier=classifier)

    mim_cfg = tiny_config("task=mim", "task.mask_patch_size=8")
    model = MaskedImageModel(build_student(mim_cfg.model, num_classes=0)).eval()
    mim_config = OmegaConf.to_container(mim_cfg, resolve=True)
    save_run_checkpoint(tmp_path / "mim.ckpt", model, None, None, mim_config, prefix="model.")
    trained = load_trained_model(tmp_path / "mim.ckpt", classifier=False)
    masks = torch.rand(2, 16) < 0.5  # one per 4 px patch of a 16 px image
    assert isinstance(trained.model, MaskedImageModel) and trained.class_names == []
    torch.testing.assert_close(trained.model(images, masks), model(images, masks), rtol=0, atol=0)
    with pytest.raises(DeitTrainError, match=r"task=mim run: an encoder without classifier heads. Fine-tune it"):
        load_trained_model(tmp_path / "mim.ckpt")

    for task, refusal in [
        (None, r"records no task \(its run config has no task._target_\)"),
        ("deit_train.tasks.nothing.Nothing", r"by task deit_train.tasks.nothing.Nothing, which is not a deit-train"),
        ("collections.OrderedDict", r"by task collections.OrderedDict, which is not a deit-train task here"),
    ]:
        config["task"] = {"_target_": task} if task else None
        save_run_checkpoint(tmp_path / "other.ckpt", student, None, ["a", "b"], config)
        with pytest.raises(DeitTrainError, match=refusal):
            load_trained_model(tmp_path / "other.ckpt")


def test_a_run_checkpoint_teaches_as_the_network_it_records_at_sizes_it_can_see(tmp_path):
    """A convnet run's checkpoint teaches at any image size and under a name with a weights tag (resnet10t.a1_in1k
    is resnet10t); a ViT run's fixes its patch grid, so other views are refused naming both; another architecture
    is refused naming the recorded one; a task=mim run's encoder (no classes, no heads) names the fine-tuning, as its
    recorded task decides."""
    convnet = timm.create_model("resnet10t", num_classes=2).eval()
    save_run_checkpoint(tmp_path / "cnn.ckpt", convnet, {"name": "resnet10t", "img_size": 16}, ["a", "b"])
    cnn = str(tmp_path / "cnn.ckpt")
    teacher = build_teacher_network(teacher_config(name="resnet10t.a1_in1k", checkpoint=cnn), ["a", "b"], 32)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(teacher(images), convnet(images))
    with pytest.raises(DeitTrainError, match=r"run of resnet10t at 16 px, not teacher.name=resnet18: set teacher"):
        build_teacher_network(teacher_config(name="resnet18", checkpoint=cnn), ["a", "b"], 16)

    vit = {"name": "deit_tiny_distilled_patch16_224", **TINY_VIT}
    student = build_student(OmegaConf.merge(OmegaConf.structured(ModelConfig), vit), num_classes=2)
    save_run_checkpoint(tmp_path / "vit.ckpt", student, vit, ["a", "b"])
    named = teacher_config(name=vit["name"], checkpoint=str(tmp_path / "vit.ckpt"))
    teacher = build_teacher_network(named, ["a", "b"], 16)
    student.eval().set_distilled_training(False)
    images = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(teacher(images), student(images))  # the average of its two heads
    with pytest.raises(DeitTrainError, match=r"would see 32 px views: set teacher.img_size=16"):
        build_teacher_network(named, ["a", "b"], 32)

    save_run_checkpoint(tmp_path / "mim.ckpt", MaskedImageModel(student), vit, None, prefix="model.", task=MIM)
    with pytest.raises(DeitTrainError, match=r"is a deit-train task=mim run: an encoder without classifier heads"):
        build_teacher_network(teacher_config(name=vit["name"], checkpoint=str(tmp_path / "mim.ckpt")), ["a", "b"])
    with pytest.raises(DeitTrainError, match=r"task=mim run"):  # under another name too: renaming would not help
        build_teacher_network(teacher_config(name="resnet18", checkpoint=str(tmp_path / "mim.ckpt")), ["a", "b"])
    # the recorded task decides, not missing class names: a classify run that lost them is no task=mim run
    save_run_checkpoint(tmp_path / "stripped.ckpt", student, vit, None)
    with pytest.raises(DeitTrainError, match=r"stripped.ckpt: its class names are not a list of strings \(None\)"):
        build_teacher_network(teacher_config(name=vit["name"], checkpoint=str(tmp_path / "stripped.ckpt")), ["a", "b"])


def test_a_run_checkpoint_teaches_with_the_normalisation_it_trained_with(tmp_path):
    """A deit-train run of a timm network whose pretrained normalisation is not ImageNet's (vit_tiny_patch16_224:
    0.5/0.5) trained on deit-train's views (ImageNet's mean/std): as a teacher it sees them as they are, and gives
    the logits the run's network gives them; before, they were re-normalised to 0.5/0.5 (another network)."""
    from deit_train.teacher.teacher import TeacherNetwork

    sizes = {"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2}
    network = timm.create_model("vit_tiny_patch16_224", num_classes=2, **sizes).eval()
    assert network.pretrained_cfg["mean"] != (0.485, 0.456, 0.406)
    model = {"name": "vit_tiny_patch16_224", "img_size": 16, "kwargs": sizes}
    save_run_checkpoint(tmp_path / "vit.ckpt", network, model, ["a", "b"])
    built = build_teacher_network(teacher_config(name=model["name"], checkpoint=str(tmp_path / "vit.ckpt")), ["a", "b"])
    teacher = TeacherNetwork(built, img_size=16)
    views = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(teacher(views), network(views))


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    save_teacher(tmp_path / "t.pth", 2)
    data = (tmp_path / "t.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(DeitTrainError, match=r"cut.pth is a truncated torch checkpoint \(cut short"):
        load_weights(tmp_path / "cut.pth")


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    with open(tmp_path / "evil.pth", "wb") as file:
        pickle.dump({"model": Payload()}, file)
    with pytest.raises(
        DeitTrainError,
        match=r"holds Python objects besides tensors \(builtins.print\), which "
        "loading would have to run as code: refused",
    ):
        load_weights(tmp_path / "evil.pth")


def receive(module) -> None:  # run in a spawned process: what a ddp_spawn rank does with the module it gets
    assert sum(p.numel() for p in module.parameters()) > 0


@pytest.mark.slow  # spawns 2 processes: the whole suite runs it, the quick loop does not
def test_the_ema_reaches_spawned_ranks():
    """trainer=ddp_spawn pickles the module to each rank through torch's shared memory; timm's ModelEmaV3 carries a
    torch.Generator that does not survive it ("unable to resize file": the run ended as a bug with any ema.decay)."""
    from deit_train.tasks.deit_module import StudentEMA

    ema = StudentEMA(build_student(tiny_student_config(), num_classes=5), decay=0.9)
    process = torch.multiprocessing.get_context("spawn").Process(target=receive, args=(ema,))
    process.start()
    process.join(timeout=120)
    assert process.exitcode == 0
    copy = pickle.loads(pickle.dumps(ema))
    assert torch.equal(copy._sr_generator.get_state(), ema._sr_generator.get_state())


def test_model_init_from_a_run_of_another_architecture_is_refused_naming_both(tmp_path):
    """model.init from a deit-train run checkpoint: another architecture (by name or by ViT sizes) is refused naming
    the recorded one, the configured one and the overrides that build the recorded one; another image size is the
    same architecture, even under the other resolution's timm name, and its position embeddings are resampled."""
    convnet = timm.create_model("resnet10t", num_classes=2)
    save_run_checkpoint(tmp_path / "cnn.ckpt", convnet, {"name": "resnet10t", "img_size": 16}, ["a", "b"])
    with pytest.raises(
        DeitTrainError,
        match=r"cnn.ckpt is a deit-train run of resnet10t, not model.name=resnet18: start from it with model=timm "
        r"model.name=resnet10t$",
    ):
        build_student(tiny_student_config(name="resnet18", init=str(tmp_path / "cnn.ckpt"), **NO_VIT), 2)

    vit = {"name": "deit_base_distilled_patch16_224", **TINY_VIT}
    recorded = build_student(OmegaConf.merge(OmegaConf.structured(ModelConfig), vit), num_classes=2)
    save_run_checkpoint(tmp_path / "vit.ckpt", recorded, vit, ["a", "b"])
    init = str(tmp_path / "vit.ckpt")
    sizes = "patch_size=4 embed_dim=32 depth=2 num_heads=2"
    with pytest.raises(DeitTrainError, match=r"of deit_base_distilled_patch16_224, not model.name=deit_base_patch16"):
        build_student(tiny_student_config(name="deit_base_patch16_224", init=init), 2)
    with pytest.raises(
        DeitTrainError,
        match=rf"run of deit_base_distilled_patch16_224 with {sizes}, not this student's patch_size=4 embed_dim=32 "
        rf"depth=3 num_heads=2: start from it with model.name=deit_base_distilled_patch16_224 model.patch_size=4",
    ):
        build_student(tiny_student_config(name=vit["name"], init=init, depth=3), 2)

    # the 384 px timm name at twice the run's size: its position embeddings resampled (timm's own function, as the
    # official fine-tuning code: bicubic, no antialiasing), every other tensor the run's
    student = build_student(tiny_student_config(name="deit_base_distilled_patch16_384", img_size=32, init=init), 2)
    from timm.layers import resample_abs_pos_embed

    expected = resample_abs_pos_embed(
        recorded.pos_embed, new_size=[8, 8], num_prefix_tokens=2, interpolation="bicubic", antialias=False
    )
    torch.testing.assert_close(student.pos_embed, expected, rtol=0, atol=0)
    for key, tensor in recorded.state_dict().items():
        if key != "pos_embed":
            torch.testing.assert_close(student.state_dict()[key], tensor, rtol=0, atol=0, msg=key)

    deit_tiny = {"name": "deit_tiny_distilled_patch16_224", "patch_size": 16, "embed_dim": 192, "depth": 12}
    network = timm.create_model(deit_tiny["name"], num_classes=2)  # conf/model/deit_tiny.yaml's network
    save_run_checkpoint(tmp_path / "ti.ckpt", network, {**deit_tiny, "num_heads": 3}, ["a", "b"])
    with pytest.raises(DeitTrainError, match=r"with model=deit_tiny \(at any model.img_size: its position"):
        build_student(tiny_student_config(init=str(tmp_path / "ti.ckpt")), 2)


def test_a_timm_export_teaches_with_the_normalisation_its_config_records(tmp_path):
    """deit-export's timm folder records the mean/std its network was trained on (ImageNet's for a deit-train run)
    in config.json's pretrained_cfg; as a teacher (the folder or its model.safetensors) it is fed those, not its
    architecture's (mobilevit_xxs: 0/1), which re-normalised the views for another network."""
    from timm.models import save_for_hf

    from deit_train.teacher.teacher import TeacherNetwork

    network = timm.create_model("mobilevit_xxs", num_classes=2).eval()
    assert tuple(network.pretrained_cfg["mean"]) != (0.485, 0.456, 0.406)
    imagenet = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    labels = {"label_names": ["a", "b"]}
    save_for_hf(network, str(tmp_path / "timm"), model_config=labels, data_config=imagenet, safe_serialization=True)
    views = torch.randn(2, 3, 32, 32)
    for checkpoint in (tmp_path / "timm", tmp_path / "timm" / "model.safetensors"):
        built = build_teacher_network(teacher_config(name="mobilevit_xxs", checkpoint=str(checkpoint)), ["a", "b"])
        teacher = TeacherNetwork(built)
        assert not teacher.renormalize
        torch.testing.assert_close(teacher(views), network(views))
