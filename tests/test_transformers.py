"""Every transformers DeiT and ViT class in and out of deit-export / model.init, and a transformers teacher.

Each test is an equality with transformers itself: its classes loading our exports, its pipeline, its
AutoModelForImageClassification run by hand on its image processor's output. Runs and models are tiny and random
(nothing is downloaded). The largest differences are recorded as `largest_difference` properties
(pytest --junitxml=FILE lists them).
"""

import re
import sys
from pathlib import Path

import pytest
import timm
import torch
import transformers
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file

from deit_train.data.sources import build_source
from deit_train.errors import DeitTrainError
from deit_train.mim.masking import MaskGenerator
from deit_train.models.student import build_student, forward_heads
from deit_train.models.trained_model import TrainedModel, load_trained_model
from deit_train.schema import ModelConfig
from deit_train.tools.evaluate import evaluate, open_eval_folder
from deit_train.tools.export import export, export_transformers
from deit_train.train import train

from .conftest import TINY_DEMO, TINY_RUN, TINY_VIT, compose_config

TINY_KEYS = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
HF_TINY = dict(
    image_size=16,
    patch_size=4,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    layer_norm_eps=1e-6,
)
FP32 = 1e-5  # fp32 rounding of a two-block width-32 ViT (the differences seen are 0 or ~1e-7)
RUNS = {  # the kinds of run deit-export tells apart, each one tiny epoch on the demo data
    "distilled": [],
    "plain": ["model=deit_tiny_plain"],
    "mim": ["task=mim", "task.mask_patch_size=8", "task.pictures=1"],
    "plain_mim": ["model=deit_tiny_plain", "task=mim", "task.mask_patch_size=8", "task.pictures=1"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """RUNS trained lazily: runs(kind) -> last.ckpt."""
    done = {}

    def run(kind: str) -> Path:
        if kind not in done:
            directory = tmp_path_factory.mktemp(kind) / "run"
            train(compose_config([*TINY_RUN, *TINY_DEMO, *TINY_VIT, *RUNS[kind]], directory, cache_dir))
            done[kind] = directory / "checkpoints" / "last.ckpt"
        return done[kind]

    return run


def val_files(demo_data) -> list[Path]:
    return sorted((demo_data / "val").rglob("*.png"))


def val_images(demo_data, trained) -> torch.Tensor:
    """The demo validation images through the model's eval transform."""
    transform = trained.transform()
    return torch.stack([transform(Image.open(path).convert("RGB")) for path in val_files(demo_data)])


def largest(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# run kind, --as, the transformers class it writes, what is compared
KINDS = [
    ("distilled", None, "DeiTForImageClassificationWithTeacher", "logits"),
    ("distilled", "classifier", "DeiTForImageClassification", "logits"),
    ("distilled", "backbone", "DeiTModel", "hidden states"),
    ("plain", None, "ViTForImageClassification", "logits"),
    ("plain", "backbone", "ViTModel", "hidden states"),
    ("mim", None, "DeiTForMaskedImageModeling", "reconstruction"),
    ("mim", "backbone", "DeiTModel", "hidden states"),
    ("plain_mim", None, "ViTForMaskedImageModeling", "reconstruction"),
]


@pytest.mark.parametrize(
    "run_kind,kind,architecture,compared", KINDS, ids=[f"{r}-{k or 'default'}" for r, k, *_ in KINDS]
)
def test_each_kind_exports_to_its_transformers_class_with_our_outputs(
    run_kind, kind, architecture, compared, runs, demo_data, tmp_path, record_property
):
    checkpoint = runs(run_kind)
    out = export(checkpoint, tmp_path / "out", kind=kind)
    ours = load_trained_model(checkpoint, classifier=False).model
    model_class = getattr(transformers, architecture)
    options = {"add_pooling_layer": False} if architecture.endswith("Model") else {}
    theirs = model_class.from_pretrained(out / "transformers", **options).eval()
    assert theirs.config.architectures == [architecture]
    auto = {
        "logits": transformers.AutoModelForImageClassification,
        "hidden states": transformers.AutoModel,
        "reconstruction": transformers.AutoModelForMaskedImageModeling,
    }[compared]
    assert type(auto.from_pretrained(out / "transformers")) is model_class
    trained = load_trained_model(checkpoint, classifier=False)
    images = val_images(demo_data, trained)
    with torch.no_grad():
        if compared == "reconstruction":
            masks = torch.stack([MaskGenerator(16, 8, 4, 0.6)() for _ in images])
            difference = largest(theirs(images, bool_masked_pos=masks).reconstruction, ours(images, masks))
        elif compared == "hidden states":
            encoder = getattr(ours, "encoder", ours)
            difference = largest(theirs(images).last_hidden_state, encoder.forward_features(images))
        else:
            cls_logits, dist_logits = forward_heads(ours, images)
            # WithTeacher averages its two heads; DeiTForImageClassification and ViT have the class head alone
            expected = (cls_logits + dist_logits) / 2 if architecture.endswith("WithTeacher") else cls_logits
            difference = largest(theirs(images).logits, expected)
    record_property(
        "largest_difference", f"{run_kind} --as {kind or 'default'} {architecture} {compared}: {difference:.3g}"
    )
    assert difference < FP32
    # the preprocessing: transformers' image processor (PIL backend) gives our eval transform's tensors
    processor = transformers.AutoImageProcessor.from_pretrained(out / "transformers", backend="pil")
    for path in val_files(demo_data)[:3]:
        image = Image.open(path).convert("RGB")
        pixels = processor(image, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(pixels, trained.transform()(image), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "run_kind,kind,head",
    [("distilled", None, "average"), ("distilled", "classifier", "class"), ("plain", None, "average")],
)
def test_pipeline_top1_on_the_validation_folder_equals_deit_eval(
    run_kind, kind, head, runs, demo_data, tmp_path, record_property
):
    checkpoint = runs(run_kind)
    out = export(checkpoint, tmp_path / "out", kind=kind)
    directory = str(out / "transformers")
    # The PIL backend: exactly our eval transform (the default torchvision one resizes in uint8, 2 grey levels off)
    processor = transformers.AutoImageProcessor.from_pretrained(directory, backend="pil")
    classify = transformers.pipeline("image-classification", model=directory, image_processor=processor)
    samples = [(path, path.parent.name) for path in val_files(demo_data)]
    predictions = classify([str(path) for path, _ in samples], top_k=1)
    pipeline_top1 = 100 * sum(p[0]["label"] == name for p, (_, name) in zip(predictions, samples, strict=True))
    pipeline_top1 /= len(samples)
    exported = load_trained_model(directory)
    from_export = evaluate(exported, open_eval_folder(demo_data, "val", exported), batch_size=16, num_workers=0)
    trained = load_trained_model(checkpoint)
    from_checkpoint = evaluate(trained, open_eval_folder(demo_data, "val", trained), batch_size=16, num_workers=0)
    record_property(
        "pipeline_vs_deit_eval",
        f"{run_kind} --as {kind or 'default'}: pipeline {pipeline_top1:.2f}, "
        f"deit-eval {from_export['heads']['average']['top1']:.2f} (export), "
        f"{from_checkpoint['heads'][head]['top1']:.2f} (checkpoint, {head} head)",
    )
    assert len(samples) == from_export["images"] == 40
    assert pipeline_top1 == pytest.approx(from_export["heads"]["average"]["top1"], abs=1e-4)
    assert pipeline_top1 == pytest.approx(from_checkpoint["heads"][head]["top1"], abs=1e-4)


def test_export_refuses_a_kind_the_checkpoint_is_not_before_writing(runs, tmp_path):
    with pytest.raises(DeitTrainError, match="--as with-teacher needs a distilled DeiT"):
        export(runs("plain"), tmp_path / "a", kind="with-teacher")
    with pytest.raises(DeitTrainError, match="--as mim writes a task=mim run"):
        export(runs("distilled"), tmp_path / "b", kind="mim")
    with pytest.raises(DeitTrainError, match="--as classifier: a task=mim run has no classification head"):
        export(runs("mim"), tmp_path / "c", kind="classifier")
    with pytest.raises(DeitTrainError, match="--onnx writes a classifier; a task=mim run has none"):
        export(runs("mim"), tmp_path / "d", onnx=True)
    assert not any((tmp_path / name).exists() for name in "abcd")
    backbone = export(runs("plain"), tmp_path / "e", kind="backbone") / "transformers"
    with pytest.raises(DeitTrainError, match="ViTModel without a classification head: fine-tune it first"):
        load_trained_model(backbone)


def plain_student(init, num_classes=10, distilled=False):
    name = "deit_tiny_distilled_patch16_224" if distilled else "deit_tiny_patch16_224"
    config = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"name": name, "init": str(init), **TINY_KEYS})
    return build_student(config, num_classes).eval()


V5_TO_V4 = [
    (r"^(vit\.)?layers\.", r"\1encoder.layer."),
    (
        r"\.attention\.([qkv])_proj\.",
        lambda m: ".attention.attention." + dict(q="query", k="key", v="value")[m[1]] + ".",
    ),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
]


@pytest.mark.parametrize("names", ["v5", "v4"])
def test_vit_directories_start_plain_students_as_transformers_loads_them(names, tmp_path):
    """ViTForImageClassification and ViTModel (the hub's facebook/deit-*-patch16-224 are the former, with v4
    names) into a plain student, and deit-eval's loader: the same logits and hidden states as transformers'."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(**HF_TINY, num_labels=10)
    images = torch.randn(3, 3, 16, 16)
    for model_class in (transformers.ViTForImageClassification, transformers.ViTModel):
        directory = tmp_path / model_class.__name__
        model_class(config).save_pretrained(directory)
        if names == "v4":
            state = {}
            for key, tensor in model_class.from_pretrained(directory).state_dict().items():
                for pattern, replacement in V5_TO_V4:
                    key = re.sub(pattern, replacement, key)
                state[key] = tensor.contiguous()
            assert any(".encoder.layer.0.attention.attention.query." in "." + key for key in state)
            save_file(state, str(directory / "model.safetensors"))
        theirs = model_class.from_pretrained(directory).eval()  # transformers' own reading of the v4 names
        student = plain_student(directory)
        with torch.no_grad():
            if model_class is transformers.ViTModel:
                assert largest(student.forward_features(images), theirs(images).last_hidden_state) < FP32
            else:
                assert largest(student(images), theirs(images).logits) < FP32
                assert largest(load_trained_model(directory).model(images), theirs(images).logits) < FP32
    with pytest.raises(DeitTrainError, match="is a ViT without distillation token .* start a plain student"):
        plain_student(tmp_path / "ViTModel", distilled=True)
    transformers.DeiTModel(transformers.DeiTConfig(**HF_TINY)).save_pretrained(tmp_path / "deit")
    with pytest.raises(DeitTrainError, match="is a distilled DeiT .* start a distilled student"):
        plain_student(tmp_path / "deit")


def test_an_imported_directory_trains_one_step_like_the_same_start_from_timm_weights(tmp_path, cache_dir, demo_data):
    """A ViTForImageClassification directory (written by transformers from a timm model) and that timm model's own
    .safetensors start the same run: one step later the weights are the same."""
    torch.manual_seed(0)
    start = timm.create_model("deit_tiny_patch16_224", num_classes=10, **TINY_KEYS)
    save_file({k: v.contiguous() for k, v in start.state_dict().items()}, str(tmp_path / "start.safetensors"))
    plain_run = compose_config(
        [
            *TINY_RUN,
            *TINY_DEMO,
            *TINY_VIT,
            "model=deit_tiny_plain",
            "+trainer.max_steps=1",
            f"model.init={tmp_path / 'start.safetensors'}",
            "model.init_unchecked_order=true",
        ],
        tmp_path / "timm_start",
        cache_dir,
    )
    train(plain_run)
    after_timm = torch.load(tmp_path / "timm_start/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    # the directory: transformers' ViTForImageClassification holding `start`, saved by save_pretrained
    names = sorted(path.name for path in (demo_data / "train").iterdir())
    export_transformers(TrainedModel(start.eval(), names, 16, 18), tmp_path / "hf", "ViTForImageClassification")
    assert transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf").config.model_type == "vit"
    hf_run = compose_config(
        [
            *TINY_RUN,
            *TINY_DEMO,
            *TINY_VIT,
            "model=deit_tiny_plain",
            "+trainer.max_steps=1",
            f"model.init={tmp_path / 'hf'}",
        ],
        tmp_path / "hf_start",
        cache_dir,
    )
    train(hf_run)
    after_hf = torch.load(tmp_path / "hf_start/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    students = [key for key in after_timm if key.startswith("student.")]
    assert students and not torch.equal(after_timm["student.head.weight"], start.state_dict()["head.weight"])
    for key in students:
        torch.testing.assert_close(after_hf[key], after_timm[key], rtol=0, atol=1e-6)


def transformers_classifier(directory: Path, class_names: list[str], size: int, seed: int = 0) -> Path:
    """A tiny random ResNetForImageClassification (BatchNorm: eval mode matters) with an image processor whose
    mean/std and size are its own, as transformers' run_image_classification.py leaves them."""
    torch.manual_seed(seed)
    config = transformers.ResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        num_labels=len(class_names),
        id2label=dict(enumerate(class_names)),
        label2id={name: i for i, name in enumerate(class_names)},
    )
    model = transformers.ResNetForImageClassification(config)
    for module in model.modules():  # BatchNorm statistics other than (0, 1): a teacher left in training mode differs
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    model.save_pretrained(directory)
    transformers.ViTImageProcessor(
        size={"height": size, "width": size}, resample=3, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.25]
    ).save_pretrained(directory)
    return directory


def test_transformers_teachers_logits_inside_the_step_equal_the_model_run_on_its_processors_output(
    tiny_config, random_teacher_checkpoint, demo_data, tmp_path, monkeypatch, record_property
):
    """teacher=ensemble with a timm member and two transformers members, one at the views' 16 px and one whose
    processor says 24 px. In the training step each member's logits equal its model run by hand on the processor's
    output for the same images (the processor resizing and normalising them itself), and the ensemble's their
    combination; the teacher stays frozen, out of the checkpoint, and in the cache's fingerprint by directory."""
    from deit_train import teacher as classify  # where the task imports build_teacher from, when it builds
    from deit_train.teacher import CacheSettings, ensemble_logits
    from deit_train.teacher.cache import tensor_digest

    names = sorted(path.name for path in (demo_data / "train").iterdir())
    same_size = transformers_classifier(tmp_path / "hf16", names, size=16, seed=1)
    larger = transformers_classifier(tmp_path / "hf24", names, size=24, seed=2)
    members = (
        f"teacher.members=[{{name:resnet10t,checkpoint:{random_teacher_checkpoint}}},"
        f"{{library:transformers,name:{same_size}}},{{library:transformers,name:{larger}}}]"
    )
    cfg = tiny_config(
        "loss=soft_distill", "teacher=ensemble", members, "+trainer.max_steps=1", "teacher.unchecked_order=true"
    )
    calls = []

    def build_and_watch(*args):
        teacher = build_teacher(*args)
        teacher.register_forward_hook(lambda module, inputs, output: calls.append((inputs, output)))
        calls.append(teacher)
        return teacher

    build_teacher = classify.build_teacher
    monkeypatch.setattr(classify, "build_teacher", build_and_watch)
    train(cfg)
    teacher = calls[0]
    (images, _view_keys, _batch_idx), output = next(call for call in calls[1:] if len(call[0]) == 3)
    assert [member.img_size for member in teacher.members] == [None, 16, 24]  # None: the views as they come
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # the data's normalisation (ImageNet's)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    raw = images * std + mean  # the views as images in [0, 1]
    by_hand = [timm_teacher(random_teacher_checkpoint)(images)]
    for directory in (same_size, larger):
        processor = transformers.AutoImageProcessor.from_pretrained(directory)
        model = transformers.AutoModelForImageClassification.from_pretrained(directory).eval()
        with torch.no_grad():
            pixels = processor(images=list(raw), do_rescale=False, return_tensors="pt")["pixel_values"]
            by_hand.append(model(pixels).logits)
    assert by_hand[2].shape == (len(images), 10) and pixels.shape[-1] == 24
    differences = [largest(member, expected) for member, expected in zip(output.member_logits, by_hand, strict=True)]
    differences.append(largest(output.logits, ensemble_logits(by_hand, tau=cfg.loss.tau)))
    record_property("largest_difference", f"teacher members (timm, hf 16 px, hf 24 px), ensemble: {differences}")
    assert max(differences) < FP32
    stored = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert not any(key.startswith("teacher.") for key in stored)
    settings = CacheSettings.from_config(cfg, 10, cfg.loss.tau, build_source(cfg.data))
    assert settings.config["teacher"] == ["resnet10t", str(same_size), str(larger)]
    digest = tensor_digest(teacher.members.state_dict())
    with torch.no_grad():
        teacher.members[2].network.model.classifier[-1].bias.add_(1.0)
    assert tensor_digest(teacher.members.state_dict()) != digest  # the fingerprint hashes its weights too


def timm_teacher(checkpoint: Path) -> torch.nn.Module:
    from safetensors.torch import load_file

    model = timm.create_model("resnet10t", num_classes=10)
    model.load_state_dict(load_file(str(checkpoint)))
    return model.eval().requires_grad_(False)


def test_a_transformers_teacher_is_refused_with_one_line_for_each_problem(
    tiny_config, demo_data, tmp_path, monkeypatch
):
    from deit_train.teacher import build_teacher_network
    from deit_train.train import check_config

    names = sorted(path.name for path in (demo_data / "train").iterdir())
    directory = transformers_classifier(tmp_path / "hf", names, size=16)
    teacher = tiny_config("loss=hard_distill", "teacher=hf", f"teacher.name={directory}").teacher
    other = transformers_classifier(tmp_path / "other", [f"class{i}" for i in range(10)], size=16)
    with pytest.raises(
        DeitTrainError,
        match=r"its classes are not the data's, label for label: other names at 10 of 10 "
        r"positions \(0: 'class0' against 'checker'",
    ):
        build_teacher_network(OmegaConf.merge(teacher, {"name": str(other)}), names)
    with pytest.raises(DeitTrainError, match=r"10 classes against 9 .*only in its id2label: \['vbars'\]"):
        build_teacher_network(teacher, names[:9])
    (tmp_path / "hf" / "preprocessor_config.json").unlink()
    with pytest.raises(DeitTrainError, match="has no preprocessor_config.json: teacher=hf takes a directory"):
        build_teacher_network(teacher, names)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(DeitTrainError, match=r"teacher=hf needs transformers: pip install 'deit-train\[hf\]'"):
        build_teacher_network(teacher, names)
    with pytest.raises(
        DeitTrainError, match="teacher.name=None: expected a transformers image classifier.s directory with teacher=hf"
    ):
        check_config(tiny_config("loss=hard_distill", "teacher=hf"))
    with pytest.raises(
        DeitTrainError, match="teacher.checkpoint=x.pth: expected null with teacher.library=transformers"
    ):
        check_config(
            tiny_config("loss=hard_distill", "teacher=hf", f"teacher.name={directory}", "teacher.checkpoint=x.pth")
        )
