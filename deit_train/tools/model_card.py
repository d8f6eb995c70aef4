"""The model card (README.md) deit-export writes beside the exported model, and its push to the Hugging Face Hub.

The card opens with the Hub's YAML header (library_name, pipeline_tag, tags, license, base_model when the run started
from one, datasets when the data names a Hub dataset, the results as model-index), written by huggingface_hub's own
ModelCardData. Then: the checkpoint's validation numbers (metrics.json of its run: the epoch best.ckpt holds, or the
last; they are what deit-eval computes on the same images, tests/conftest.py: assert_metrics_reproduce), the worst
classes, the teacher, the recipe (the composed config, shortened, and the command line), how to load it in
transformers, timm and onnxruntime, and the class names.
"""

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from deit_train.class_results import describe, read_class_results, worst_classes
from deit_train.errors import DeitTrainError
from deit_train.metric_units import BEST, LAST

# (metrics.json name, what the card calls it); the EMA's under val_ema/ when the EMA weights are exported
CARD_METRICS = (
    ("acc1_percent", "top-1"),
    ("acc5_percent", "top-5"),
    ("acc1_cls_percent", "top-1, class head"),
    ("acc1_dist_percent", "top-1, distillation head"),
    ("teacher_acc1_percent", "teacher's top-1"),
    ("agreement_percent", "agreement with the teacher's top-1"),
)
SHOWN_CLASSES = 100  # class names listed in the card; config.json's id2label / label_names hold them all
HUB_DATASETS = {  # the data sources whose data is a Hub dataset
    "CIFAR10Source": "uoft-cs/cifar10",
    "CIFAR100Source": "uoft-cs/cifar100",
}


def is_hub_id(text: object) -> bool:
    """NAME or OWNER/NAME as the Hub spells ids; a path (absolute, ./, ~, more than one /, a file suffix) is not."""
    return isinstance(text, str) and bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", text)) and not text.startswith(".")


@dataclass
class CardFacts:
    """What the card says, gathered from the checkpoint and its run directory."""

    class_names: list[str]
    img_size: int
    library: str  # transformers when the export has a transformers directory, else timm
    architecture: str | None  # the transformers class
    config: dict = field(default_factory=dict)  # the run's composed config (empty for an export directory)
    overrides: list[str] = field(default_factory=list)
    metrics: dict | None = None  # metrics.json's entry for this checkpoint
    which: str = ""  # "best.ckpt (epoch 30)"
    classes: list | None = None  # per_class.csv of the run
    ema: bool = False
    onnx: bool = False


def run_facts(checkpoint: Path, epoch: int | None, ema: bool) -> dict:
    """The run directory's metrics.json entry for the checkpoint's epoch, per_class.csv and overrides."""
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    facts: dict = {}
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():
        try:
            record = json.loads(metrics_file.read_text())
        except ValueError:
            record = {}
        for key, name in ((BEST, "best.ckpt"), (LAST, "last epoch")):
            entry = record.get(key) if isinstance(record, dict) else None
            if isinstance(entry, dict) and entry.get("epoch") == epoch and epoch is not None:
                prefix = "val_ema/" if ema else "val/"
                facts["metrics"] = {k.removeprefix(prefix): v for k, v in entry.items() if k.startswith(prefix)}
                facts["which"] = f"{name}, epoch {epoch}"
                break
    if not ema and facts.get("which", "").startswith("best"):
        facts["classes"] = read_class_results(run_dir)
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    if overrides_file.is_file():
        import yaml

        overrides = yaml.safe_load(overrides_file.read_text()) or []
        machine_only = ("hydra.", "paths.", "resume", "ckpt_path")  # where and how it ran, not what it trained
        facts["overrides"] = [o for o in overrides if isinstance(o, str) and not o.startswith(machine_only)]
    return facts


def base_model(config: dict) -> str | None:
    """The Hub model the run started from: model.init given as a Hub id, or timm's pretrained weights."""
    model = config.get("model") or {}
    if is_hub_id(model.get("init")) and not Path(str(model["init"])).exists():
        return model["init"]
    if model.get("pretrained") and model.get("name"):
        import timm

        try:
            return timm.models.get_pretrained_cfg(model["name"]).hf_hub_id or None
        except (RuntimeError, AttributeError):
            return None
    return None


def datasets(config: dict) -> list[str]:
    data = config.get("data") or {}
    target = str(data.get("_target_", "")).rsplit(".", 1)[-1]
    if target in HUB_DATASETS:
        return [HUB_DATASETS[target]]
    dataset = data.get("dataset")
    return [dataset] if is_hub_id(dataset) and not Path(str(dataset)).exists() else []


def dataset_name(config: dict) -> str:
    data = config.get("data") or {}
    named = datasets(config)
    if named:
        return named[0]
    root = data.get("root") or data.get("dataset") or data.get("shards")
    target = str(data.get("_target_", "data")).rsplit(".", 1)[-1].removesuffix("Source").lower()
    return f"{target} ({Path(str(root)).name})" if root else target


def teacher_line(config: dict) -> str:
    teacher, loss = config.get("teacher") or {}, config.get("loss") or {}
    kind = loss.get("distillation_type", "none")
    if kind == "none" or not (teacher.get("name") or teacher.get("members") or teacher.get("checkpoint")):
        return "None: trained on the labels alone (no distillation)."
    members = teacher.get("members") or []
    name = " + ".join(str(m.get("name", m)) if isinstance(m, dict) else str(m) for m in members) or teacher.get("name")
    source = teacher.get("checkpoint") or ("timm's pretrained weights" if teacher.get("pretrained") else "")
    weights = f", weights from `{Path(str(source)).name}`" if source and source != "timm's pretrained weights" else ""
    weights = weights or (f", {source}" if source else "")
    alpha = f", alpha {loss.get('alpha')}" if kind != "none" else ""
    tau = f", tau {loss.get('tau')}" if kind == "soft" else ""
    return f"`{name}` ({teacher.get('library', 'timm')}{weights}); {kind} distillation{alpha}{tau} (DeiT, section 3)."


def recipe_rows(config: dict) -> list[tuple[str, object]]:
    """The composed config, shortened to what a reader compares between recipes."""
    pick = {
        "model": ("name", "img_size", "patch_size", "embed_dim", "depth", "num_heads", "drop_path_rate", "init"),
        "loss": ("distillation_type", "alpha", "tau", "label_loss"),
        "optim": ("name", "lr", "lr_batch_ref", "weight_decay", "schedule", "warmup_epochs", "min_lr"),
        "augment": ("auto_augment", "mixup", "cutmix", "smoothing", "reprob", "repeated_aug"),
        "data": ("batch_size",),
        "trainer": ("max_epochs", "precision", "devices", "num_nodes"),
        "ema": ("decay",),
    }
    rows = [("seed", config.get("seed"))] if "seed" in config else []
    for group, keys in pick.items():
        node = config.get(group) or {}
        rows += [(f"{group}.{key}", node[key]) for key in keys if node.get(key) not in (None, "", [])]
    return rows


def model_card(facts: CardFacts, location: str, repo_id: str | None = None, license: str = "unknown"):
    """The huggingface_hub ModelCard of an export at `location` (the Hub repo, or the local folder)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    config = facts.config
    model_name = repo_id or (config.get("model") or {}).get("name") or "deit-train model"
    metrics = facts.metrics or {}
    data_name = dataset_name(config) if config else "unknown"
    results = [
        EvalResult(
            task_type="image-classification",
            task_name="Image Classification",
            dataset_type=datasets(config)[0] if datasets(config) else "imagefolder",
            dataset_name=data_name,
            dataset_split="validation",
            metric_type="accuracy",
            metric_name=f"{label} (%)",
            metric_value=round(metrics[key], 2),
        )
        for key, label in CARD_METRICS[:2]
        if key in metrics
    ]
    distilled = (config.get("loss") or {}).get("distillation_type", "none") != "none"
    data = ModelCardData(
        library_name=facts.library,
        pipeline_tag="image-classification",
        license=license,
        tags=["image-classification", "vision", "deit", "deit-train", facts.library]
        + (["knowledge-distillation"] if distilled else [])
        + (["onnx"] if facts.onnx else []),
        base_model=base_model(config),
        datasets=datasets(config) or None,
        metrics=["accuracy"] if results else None,
        model_name=model_name,
        eval_results=results or None,
    )
    body = "\n\n".join(
        [
            f"# {model_name}",
            summary(facts, data_name),
            results_section(facts),
            f"## Teacher\n\n{teacher_line(config) if config else 'Not recorded in this export.'}",
            recipe_section(facts),
            usage_section(facts, location, repo_id),
            classes_section(facts),
        ]
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def summary(facts: CardFacts, data_name: str) -> str:
    what = facts.architecture or (facts.config.get("model") or {}).get("name") or "an image classifier"
    return (
        f"An image classifier ({what}) trained with deit-train (the DeiT recipe, Touvron et al. 2021, "
        f"[arXiv 2012.12877](https://arxiv.org/abs/2012.12877)) on {data_name}: {len(facts.class_names)} classes, "
        f"{facts.img_size}x{facts.img_size} input. The weights are this run's, not ImageNet's; the license field "
        f"is what deit-export --license set (default: unknown)."
    )


def results_section(facts: CardFacts) -> str:
    metrics = facts.metrics
    if not metrics:
        return (
            "## Results\n\nNo validation numbers were found for this checkpoint (its run's metrics.json names "
            "another epoch, or there is none): measure it with `deit-eval MODEL DATA`."
        )
    weights = "the EMA weights" if facts.ema else "the weights"
    lines = [
        "## Results",
        "",
        f"Validation of {weights} of {facts.which} (the run's metrics.json; `deit-eval` on the same images gives the "
        f"same numbers). The prediction is the average of the class and distillation heads.",
        "",
        "| metric | % |",
        "|---|---|",
    ]
    lines += [f"| {label} | {metrics[key]:.2f} |" for key, label in CARD_METRICS if key in metrics]
    if "loss" in metrics:
        lines.append(f"| loss (cross-entropy, nats) | {metrics['loss']:.4f} |")
    if facts.classes:
        lines += ["", f"Worst classes: {describe(worst_classes(facts.classes, 5))}."]
    return "\n".join(lines)


def recipe_section(facts: CardFacts) -> str:
    if not facts.config:
        return "## Training recipe\n\nNot recorded in this export."
    rows = "\n".join(f"| `{key}` | {value} |" for key, value in recipe_rows(facts.config))
    command = " ".join(facts.overrides)
    return (
        "## Training recipe\n\n"
        + (f"```bash\ndeit-train {command}\n```\n\n" if command else "")
        + f"| key | value |\n|---|---|\n{rows}"
    )


def usage_section(facts: CardFacts, location: str, repo_id: str | None) -> str:
    if repo_id:
        fetch = (
            f'from huggingface_hub import snapshot_download\n\nfolder = snapshot_download("{repo_id}")  # or one '
            f"sub-folder: allow_patterns=['timm/*']\n"
        )
        timm_dir, onnx_file = 'f"{folder}/timm"', 'f"{folder}/model.onnx"'
        transformers_source = f'"{repo_id}", subfolder="transformers"'
    else:
        fetch = ""
        timm_dir, onnx_file = f'"{location}/timm"', f'"{location}/model.onnx"'
        transformers_source = f'"{location}/transformers"'
    parts = ["## How to use"]
    if facts.architecture:
        parts.append(
            "transformers (the processor resizes the short side and center-crops, as training validated):\n\n"
            "```python\n"
            f"from transformers import AutoImageProcessor, {facts.architecture}\n\n"
            f"processor = AutoImageProcessor.from_pretrained({transformers_source})\n"
            f"model = {facts.architecture}.from_pretrained({transformers_source})\n"
            "logits = model(**processor(images=image, return_tensors='pt')).logits\n"
            "print(model.config.id2label[logits.argmax(-1).item()])\n```"
        )
    parts.append(
        "timm:\n\n```python\nimport timm\n"
        + (fetch if repo_id else "")
        + f'model = timm.create_model("local-dir:" + {timm_dir}, pretrained=True).eval()\n'
        "transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))\n"
        "logits = model(transform(image).unsqueeze(0))\n```"
    )
    if facts.onnx:
        parts.append(
            "onnxruntime (input `images`: N x 3 x H x W, normalised as timm's transform above does; output `logits`):"
            "\n\n```python\nimport onnxruntime\n"
            + (fetch if repo_id else "")
            + f"session = onnxruntime.InferenceSession({onnx_file})\n"
            'logits = session.run(["logits"], {"images": pixels})[0]\n```'
        )
    else:
        parts.append("ONNX: export again with `deit-export --onnx` to add `model.onnx` (onnxruntime).")
    parts.append("Or with deit-train itself: `deit-eval FOLDER DATA`, `deit-predict FOLDER IMAGE`.")
    return "\n\n".join(parts)


def classes_section(facts: CardFacts) -> str:
    names = facts.class_names
    shown = ", ".join(f"`{name}`" for name in names[:SHOWN_CLASSES])
    more = f" and {len(names) - SHOWN_CLASSES} more (all in config.json)" if len(names) > SHOWN_CLASSES else ""
    return f"## Classes\n\n{len(names)} classes, in the order of the model's outputs: {shown}{more}."


def check_repo_id(repo_id: str) -> None:
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise DeitTrainError(f"--push-to-hub {repo_id}: give the Hub repo as OWNER/NAME (e.g. me/deit-tiny-pets)")


def push_to_hub(folder: Path, repo_id: str, private: bool) -> str:
    """Upload the export folder to the Hub repo `repo_id` (created if needed) with huggingface_hub's own API; the
    token comes from where huggingface_hub looks (HF_TOKEN, `hf auth login`). Returns the commit's URL."""
    import httpx2  # huggingface_hub's HTTP client: its transport errors (no connection, timeouts)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import LocalTokenNotFoundError, OfflineModeIsEnabled

    logging.getLogger("httpx2").setLevel(logging.WARNING)  # a line per HTTP request otherwise
    try:
        api = HfApi(endpoint=os.environ.get("HF_ENDPOINT"))
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="deit-export")
    except OfflineModeIsEnabled as error:
        raise DeitTrainError(
            f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set; unset it to upload (the export is in {folder})"
        ) from error
    except LocalTokenNotFoundError as error:
        raise DeitTrainError(
            f"--push-to-hub {repo_id}: no Hugging Face token: run `hf auth login` or set HF_TOKEN (the export is in "
            f"{folder})"
        ) from error
    except (httpx2.HTTPError, OSError) as error:  # HfHubHTTPError (the server's refusal) is an httpx2.HTTPError
        detail = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise DeitTrainError(
            f"--push-to-hub {repo_id}: the upload failed: {detail} (the export is in {folder})"
        ) from error
    return str(commit.commit_url if hasattr(commit, "commit_url") else commit)
