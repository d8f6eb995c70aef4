"""timm and transformers in and out: the key mapping, deit-export, deit-eval, deit-predict.

Every model has random weights (nothing can be downloaded); equality is checked against transformers' and
timm's own loaders and forward passes.
"""

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    AutoImageProcessor,
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    pipeline,
)

from deit_train.data.images import load_image
from deit_train.errors import DeitTrainError
from deit_train.models.student import build_student, forward_heads
from deit_train.models.trained_model import load_trained_model
from deit_train.models.transformers_format import timm_to_transformers, transformers_to_timm
from deit_train.schema import ModelConfig
from deit_train.tools.evaluate import evaluate, open_eval_folder
from deit_train.tools.export import export
from deit_train.tools.predict import image_paths, predict
from deit_train.train import train

from .conftest import TINY_DEMO, TINY_RUN, TINY_VIT, compose_config

# A tiny transformers DeiT: 16 px images, 4 px patches, 2 layers of width 32. LayerNorm eps as timm's.
HF_TINY = dict(
    image_size=16,
    patch_size=4,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    layer_norm_eps=1e-6,
    num_labels=10,
)
STUDENT = dict(
    name="deit_tiny_distilled_patch16_224",
    pretrained=False,
    img_size=16,
    patch_size=4,
    embed_dim=32,
    depth=2,
    num_heads=2,
)
TINY_KEYS = ("patch_size", "embed_dim", "depth", "num_heads")
# Odd, non-square sizes: the resize and the center crop both have rounding to get right.
ODD_SIZES = [(37, 53), (301, 257), (99, 45), (64, 63), (211, 211)]


def odd_images(seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ODD_SIZES]


def student_from(init, num_classes=10):
    config = OmegaConf.merge(OmegaConf.structured(ModelConfig), {**STUDENT, "init": str(init)})
    return build_student(config, num_classes).eval()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, cache_dir):
    """A tiny distilled-architecture student trained one epoch on the demo data (CE, no teacher)."""
    run = tmp_path_factory.mktemp("interop") / "run"
    cfg = compose_config([*TINY_RUN, *TINY_DEMO, *TINY_VIT], run, cache_dir)
    metrics = train(cfg).metrics
    return run / "checkpoints" / "last.ckpt", metrics


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    return export(trained_run[0], tmp_path_factory.mktemp("export") / "out")


def hf_directory(tmp_path, model_class=DeiTForImageClassificationWithTeacher, **config):
    torch.manual_seed(0)
    model = model_class(DeiTConfig(**{**HF_TINY, **config})).eval()
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def test_transformers_model_loads_into_the_student_with_the_same_logits(tmp_path):
    hf_model, directory = hf_directory(tmp_path)
    student = student_from(directory)
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = hf_model(images)
        cls_logits, dist_logits = forward_heads(student, images)
    assert (cls_logits - expected.cls_logits).abs().max() < 1e-4
    assert (dist_logits - expected.distillation_logits).abs().max() < 1e-4


def test_hub_checkpoints_with_transformers_v4_names_load_like_transformers_loads_them(tmp_path):
    """The hub's DeiT files use v4 names (deit.encoder.layer.i.attention.attention.query, ...); transformers v5
    renames them on load. Our loader must give the same model as transformers' own conversion."""
    v5_to_v4 = [
        (r"\.layers\.", ".encoder.layer."),
        (
            r"\.attention\.([qkv])_proj\.",
            lambda m: ".attention.attention." + dict(q="query", k="key", v="value")[m[1]] + ".",
        ),
        (r"\.attention\.o_proj\.", ".attention.output.dense."),
        (r"\.mlp\.fc1\.", ".intermediate.dense."),
        (r"\.mlp\.fc2\.", ".output.dense."),
    ]
    hf_model, directory = hf_directory(tmp_path)
    state = {}
    for key, tensor in hf_model.state_dict().items():
        for pattern, replacement in v5_to_v4:
            key = re.sub(pattern, replacement, key)
        state[key] = tensor.contiguous()
    assert "deit.encoder.layer.0.attention.attention.query.weight" in state
    save_file(state, str(directory / "model.safetensors"))
    reloaded = DeiTForImageClassificationWithTeacher.from_pretrained(directory).eval()
    student = student_from(directory)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (forward_heads(student, images)[0] - reloaded(images).cls_logits).abs().max() < 1e-4


def test_encoder_only_and_single_head_transformers_models(tmp_path, caplog):
    encoder, directory = hf_directory(tmp_path, DeiTModel)
    student = student_from(directory)
    assert "no classification heads" in caplog.text
    torch.testing.assert_close(student.cls_token, encoder.embeddings.cls_token, rtol=0, atol=0)
    single, directory = hf_directory(tmp_path / "one", DeiTForImageClassification)
    student = student_from(directory)
    assert "distillation head starts as a copy" in caplog.text
    torch.testing.assert_close(student.head.weight, single.classifier.weight, rtol=0, atol=0)
    torch.testing.assert_close(student.head_dist.weight, single.classifier.weight, rtol=0, atol=0)


def test_key_mapping_round_trips_and_splits_qkv_in_order():
    model = timm.create_model("deit_tiny_distilled_patch16_224", img_size=16, **{k: STUDENT[k] for k in TINY_KEYS})
    state = model.state_dict()
    converted = timm_to_transformers(state)
    q, k, v = state["blocks.1.attn.qkv.weight"].chunk(3)
    torch.testing.assert_close(converted["deit.layers.1.attention.k_proj.weight"], k, rtol=0, atol=0)
    back = transformers_to_timm(converted)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[key], state[key]) for key in state)


def test_export_loads_in_transformers_and_timm_with_the_same_logits(trained_run, exported):
    ours = load_trained_model(trained_run[0])
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected_cls, expected_dist = forward_heads(ours.model, images)
        expected = ours.model(images)
        hf = DeiTForImageClassificationWithTeacher.from_pretrained(exported / "transformers").eval()
        hf_out = hf(images)
        assert (hf_out.cls_logits - expected_cls).abs().max() < 1e-4
        assert (hf_out.distillation_logits - expected_dist).abs().max() < 1e-4
        assert (hf_out.logits - expected).abs().max() < 1e-4
        assert hf.config.layer_norm_eps == 1e-6
        assert [hf.config.id2label[i] for i in range(10)] == ours.class_names
        from_dir = timm.create_model(f"local-dir:{exported / 'timm'}", pretrained=True).eval()
        assert (from_dir(images) - expected).abs().max() < 1e-4
        # The named architecture with the file as its pretrained weights. timm drops the heads of a file whose
        # num_classes differs from the overlay's (1000 by default), hence num_classes in both places.
        named = timm.create_model(
            "deit_tiny_distilled_patch16_224",
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(exported / "timm" / "model.safetensors"), num_classes=10),
            num_classes=10,
            img_size=16,
            **{k: STUDENT[k] for k in TINY_KEYS},
        ).eval()
        assert (named(images) - expected).abs().max() < 1e-4


def test_onnx_export_gives_the_same_logits_for_any_batch_size(trained_run, tmp_path):
    import onnxruntime

    from deit_train.tools.export import export_onnx

    trained = load_trained_model(trained_run[0])
    export_onnx(trained, tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    for batch in (1, 3):
        images = torch.randn(batch, 3, 16, 16)
        (logits,) = session.run(None, {"images": images.numpy()})
        with torch.no_grad():
            assert np.abs(logits - trained.model(images).numpy()).max() < 1e-4


def test_exported_preprocessor_reproduces_our_eval_transform(trained_run, exported):
    ours = load_trained_model(trained_run[0]).transform()
    exact = AutoImageProcessor.from_pretrained(exported / "transformers", backend="pil")
    default = AutoImageProcessor.from_pretrained(exported / "transformers")
    for image in odd_images():
        expected = ours(image)
        torch.testing.assert_close(exact(image, return_tensors="pt")["pixel_values"][0], expected, rtol=0, atol=1e-6)
        # The default torchvision backend resizes in uint8: at most 2 grey levels apart from PIL's resize.
        fast = default(image, return_tensors="pt")["pixel_values"][0]
        assert (fast - expected).abs().max() <= 2 / 255 / 0.224 + 1e-6


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGB"])
def test_exported_preprocessor_reads_grey_and_transparent_images_as_our_eval_transform(trained_run, exported, mode):
    """AutoImageProcessor on a grey image failed (one channel normalised with three means); now it sees the RGB image
    our eval transform reads (data/images.py: grey converted, transparency on white)."""
    trained = load_trained_model(trained_run[0])
    ours, side = trained.transform(), trained.img_size
    rgb = odd_images()[0]
    image = rgb.convert(mode)
    for backend in ("pil", "torchvision"):
        processor = AutoImageProcessor.from_pretrained(exported / "transformers", backend=backend)
        pixels = processor(image, return_tensors="pt")["pixel_values"][0]
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        expected = ours(load_image(io.BytesIO(buffer.getvalue())))
        assert pixels.shape == expected.shape == (3, side, side)
        assert (pixels - expected).abs().max() <= (1e-6 if backend == "pil" else 2 / 255 / 0.224 + 1e-6)


def test_pipeline_top1_equals_deit_predict(exported, tmp_path):
    paths = []
    for index, image in enumerate(odd_images(seed=1)):
        paths.append(tmp_path / f"{index}.png")
        image.save(paths[-1])
    classify = pipeline("image-classification", model=str(exported / "transformers"))
    theirs = [classify(Image.open(path))[0]["label"] for path in paths]
    for model in ("transformers", "timm"):
        records = list(predict(load_trained_model(exported / model), image_paths([str(tmp_path)]), top_k=3))
        by_image = {record["image"]: record["predictions"][0]["label"] for record in records}
        assert [by_image[str(path)] for path in paths] == theirs


def test_deit_eval_reproduces_the_validation_accuracy_of_the_run(trained_run, exported, demo_data):
    checkpoint, metrics = trained_run
    for source in (checkpoint, exported / "transformers", exported / "timm"):
        trained = load_trained_model(source)
        result = evaluate(trained, open_eval_folder(demo_data, "val", trained), batch_size=16, num_workers=0)
        assert result["images"] == 40
        assert result["heads"]["average"]["top1"] == pytest.approx(100 * metrics["val/acc1"], abs=1e-4)
        assert result["heads"]["class"]["top1"] == pytest.approx(100 * metrics["val/acc1_cls"], abs=1e-4)
        assert result["heads"]["distillation"]["top1"] == pytest.approx(100 * metrics["val/acc1_dist"], abs=1e-4)
        assert result["images_per_second"] > 0


def test_deit_eval_maps_a_subset_of_classes_by_name(trained_run, demo_data, tmp_path):
    trained = load_trained_model(trained_run[0])
    subset = tmp_path / "subset"
    subset.mkdir()
    for name in ("ring", "circle"):  # folder order differs from the model's label order
        (subset / name).symlink_to(demo_data / "val" / name)
    dataset = open_eval_folder(subset, "val", trained)
    assert {trained.class_names[label] for _, label in dataset.samples} == {"ring", "circle"}
    result = evaluate(trained, dataset, batch_size=8, num_workers=0)
    with torch.no_grad():
        images = torch.stack([image for image, _ in dataset])
        labels = torch.tensor([label for _, label in dataset])
        expected = (trained.model(images).argmax(-1) == labels).float().mean().item()
    assert result["heads"]["average"]["top1"] == pytest.approx(100 * expected, abs=1e-4)


def run_tool(tool, *args, cwd):
    command = [sys.executable, "-m", f"deit_train.tools.{tool}", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.mark.slow
def test_cli_tools_write_json_and_report_bad_input_clearly(trained_run, exported, demo_data, tmp_path):
    checkpoint = trained_run[0]
    result = run_tool(
        "evaluate",
        checkpoint,
        demo_data,
        "--json",
        tmp_path / "eval.json",
        "--num-workers",
        "0",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "average" in result.stdout and "images/s" in result.stdout
    assert json.loads((tmp_path / "eval.json").read_text())["images"] == 40
    # deit-predict: one JSON line per image; a corrupt image gets an error line and exit status 1.
    folder = tmp_path / "images"
    folder.mkdir()
    odd_images()[0].save(folder / "good.png")
    (folder / "bad.jpg").write_bytes(b"not a jpeg")
    result = run_tool("predict", exported / "timm", folder, "--top-k", "2", cwd=tmp_path)
    records = {Path(r["image"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    assert result.returncode == 3  # some images could not be read
    assert len(records["good.png"]["predictions"]) == 2 and "corrupt image" in records["bad.jpg"]["error"]
    # deit-export: the written directories, and the commands that load them.
    result = run_tool("export", checkpoint, tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "transformers" / "preprocessor_config.json").is_file()
    assert "local-dir:" in result.stdout


def test_bad_sources_each_give_one_clear_error(trained_run, exported, tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(trained_run[0].read_bytes()[:5000])
    with pytest.raises(DeitTrainError, match="truncated.ckpt.? is a truncated torch checkpoint"):
        student_from(truncated)
    with pytest.raises(DeitTrainError, match="truncated.ckpt is a truncated torch checkpoint"):
        load_trained_model(truncated)
    resnet = tmp_path / "resnet.safetensors"
    save_file(timm.create_model("resnet10t", num_classes=10).state_dict(), str(resnet))
    with pytest.raises(DeitTrainError, match=r"does not match the student architecture.*missing tensors"):
        student_from(resnet)
    with pytest.raises(DeitTrainError, match="resnet.safetensors is a safetensors file: expected a deit-train .ckpt"):
        load_trained_model(resnet)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    with pytest.raises(DeitTrainError, match="not a DeiT export.*its config.json describes bert"):
        student_from(bert)
    with pytest.raises(DeitTrainError, match=r"config.json is missing \(pass one of"):
        load_trained_model(exported)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((exported / "transformers" / "config.json").read_text())
    with pytest.raises(DeitTrainError, match="no model.safetensors"):
        load_trained_model(no_weights)
    Image.new("RGB", (8, 8)).save(tmp_path / "image.png")  # (the images are looked for first)
    result = run_tool("predict", tmp_path / "missing.ckpt", tmp_path / "image.png", cwd=tmp_path)
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_ema_weights_export_and_a_single_head_student_exports_to_timm_only(tiny_config, tmp_path, caplog):
    run = tiny_config("ema.decay=0.5", run="ema")
    train(run)
    checkpoint = f"{run.paths.output_dir}/checkpoints/last.ckpt"
    stored = torch.load(checkpoint, weights_only=True)["state_dict"]
    out = export(checkpoint, tmp_path / "ema_export", ema=True)
    exported = load_trained_model(out / "transformers")
    torch.testing.assert_close(exported.model.head.weight, stored["ema.module.head.weight"], rtol=0, atol=0)
    assert not torch.equal(stored["ema.module.head.weight"], stored["student.head.weight"])

    convnet = tiny_config("model=timm", "model.name=resnet10t", "model.img_size=16", run="convnet", student=[])
    train(convnet)
    images = torch.randn(2, 3, 16, 16)
    out = export(f"{convnet.paths.output_dir}/checkpoints/last.ckpt", tmp_path / "convnet_export")
    assert not (out / "transformers").exists() and "timm only" in caplog.text
    ours = load_trained_model(f"{convnet.paths.output_dir}/checkpoints/last.ckpt").model
    with torch.no_grad():
        torch.testing.assert_close(load_trained_model(out / "timm").model(images), ours(images))


def test_a_distilled_deit_iii_student_exports_to_timm_only_with_the_same_logits(tiny_config, tmp_path, caplog):
    """transformers' DeiT has no LayerScale: the export must not drop DeiT III's ls1/ls2 or fail on their names."""
    run = tiny_config("model=deit3_small_distilled", run="deit3")
    train(run)
    checkpoint = f"{run.paths.output_dir}/checkpoints/last.ckpt"
    out = export(checkpoint, tmp_path / "deit3_export")
    assert not (out / "transformers").exists() and "LayerScale (DeiT III)" in caplog.text
    ours = load_trained_model(checkpoint).model
    assert any(key.endswith("ls1.gamma") for key in ours.state_dict())
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(load_trained_model(out / "timm").model(images), ours(images))
