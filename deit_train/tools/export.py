"""`deit-export CHECKPOINT OUT_DIR [--as KIND]`: a trained model for transformers, timm and (optionally) ONNX.

OUT_DIR/transformers  the transformers class for what the checkpoint is (docs/interop.md has the table):
                        distilled DeiT  DeiTForImageClassificationWithTeacher (--as with-teacher, the default),
                                        DeiTForImageClassification (--as classifier: the class head alone)
                        plain DeiT/ViT  ViTForImageClassification (--as classifier, the default)
                        task=mim run    DeiTForMaskedImageModeling, ViTForMaskedImageModeling for a plain encoder
                                        (--as mim, the default): encoder, mask token and decoder
                        any of these    DeiTModel / ViTModel (--as backbone): the encoder alone, without pooler
                      with config.json (class names as id2label, LayerNorm eps 1e-6), model.safetensors and a
                      preprocessor_config.json that reproduces our eval transform. A model transformers has no class
                      for (DeiT III's LayerScale, a convnet) gets no such directory, and one line that says so.
OUT_DIR/timm          timm.create_model("local-dir:OUT_DIR/timm", pretrained=True) loads it (a task=mim run: its
                      encoder), or the named architecture with pretrained_cfg_overlay=dict(file=.../model.safetensors).
OUT_DIR/model.onnx    with --onnx: images (N, 3, H, W) -> logits (N, classes), the average of both heads.
OUT_DIR/README.md     the model card (tools/model_card.py): the Hub's YAML header, the run's numbers, teacher, recipe,
                      how to load it, the class names. --push-to-hub OWNER/NAME uploads OUT_DIR to the Hub.
"""

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from deit_train.data.pixels import IMAGENET_MEAN, IMAGENET_STD
from deit_train.errors import DeitTrainError, error_boundary
from deit_train.mim.model import MaskedImageModel
from deit_train.models.checkpoints import non_finite, read_run_checkpoint
from deit_train.models.student import is_distilled
from deit_train.models.trained_model import TrainedModel, load_trained_model
from deit_train.models.transformers_format import (
    CLASSIFIER_HEAD,
    MIM_DECODER,
    WITH_TEACHER_HEADS,
    require_transformers,
    timm_to_transformers,
    transformers_config,
    why_no_transformers_class,
)
from deit_train.tools.arguments import ArgumentParser
from deit_train.tools.model_card import CardFacts, check_repo_id, model_card, push_to_hub, run_facts

log = logging.getLogger("deit_train")

# --as KIND: the transformers class for each family, the distilled DeiT ("deit") and the plain ViT ("vit").
CLASSES = {
    "with-teacher": {"deit": "DeiTForImageClassificationWithTeacher"},
    "classifier": {"deit": "DeiTForImageClassification", "vit": "ViTForImageClassification"},
    "mim": {"deit": "DeiTForMaskedImageModeling", "vit": "ViTForMaskedImageModeling"},
    "backbone": {"deit": "DeiTModel", "vit": "ViTModel"},
}


def encoder_of(model: torch.nn.Module) -> torch.nn.Module:
    return model.encoder if isinstance(model, MaskedImageModel) else model


def default_kind(model: torch.nn.Module) -> str:
    if isinstance(model, MaskedImageModel):
        return "mim"
    return "with-teacher" if is_distilled(model) else "classifier"


def transformers_class(model: torch.nn.Module, kind: str) -> str:
    """The transformers class name that `kind` writes `model` as, or a DeitTrainError saying why not."""
    family = "deit" if is_distilled(encoder_of(model)) else "vit"
    is_mim = isinstance(model, MaskedImageModel)
    if kind == "mim" and not is_mim:
        raise DeitTrainError(
            "--as mim writes a task=mim run (mask token and decoder); this checkpoint is a "
            "classifier: --as classifier or --as backbone"
        )
    if kind in ("with-teacher", "classifier") and is_mim:
        raise DeitTrainError(
            f"--as {kind}: a task=mim run has no classification head; fine-tune it first "
            f"(deit-train model.init=CHECKPOINT ...), or --as mim / --as backbone"
        )
    if family not in CLASSES[kind]:
        raise DeitTrainError(
            "--as with-teacher needs a distilled DeiT (two heads); this is a plain ViT with one "
            "head: --as classifier (ViTForImageClassification)"
        )
    return CLASSES[kind][family]


def transformers_state(model: torch.nn.Module, architecture: str) -> dict[str, torch.Tensor]:
    """`model`'s weights under `architecture`'s names (transformers_format.py)."""
    base = "deit" if architecture.startswith("DeiT") else "vit"
    if isinstance(model, MaskedImageModel):
        state = {k.removeprefix("encoder."): v for k, v in model.state_dict().items()}
    else:
        state = model.state_dict()
    if architecture.endswith("Model"):  # the encoder alone, saved without the base-model prefix
        heads = ("head.", "head_dist.", "mask_token", "decoder.")
        return timm_to_transformers({k: v for k, v in state.items() if not k.startswith(heads)}, "", {})
    if architecture.endswith("ForMaskedImageModeling"):
        return timm_to_transformers(state, base, MIM_DECODER)
    if architecture.endswith("WithTeacher"):
        return timm_to_transformers(state, base, WITH_TEACHER_HEADS)
    # one head on the class token; a distilled student's distillation head stays behind
    return timm_to_transformers(
        {k: v for k, v in state.items() if not k.startswith("head_dist.")}, base, CLASSIFIER_HEAD
    )


def export_transformers(trained: TrainedModel, directory: Path, architecture: str) -> None:
    """`trained` as the transformers class `architecture`, with its class names and preprocessing."""
    transformers = require_transformers("the transformers export")
    encoder = encoder_of(trained.model)
    config = transformers_config(encoder, trained.class_names if "Classification" in architecture else [], architecture)
    config_class = transformers.DeiTConfig if config.pop("model_type") == "deit" else transformers.ViTConfig
    model_class = getattr(transformers, architecture)
    # DeiTModel / ViTModel add a pooler (dense + tanh on the class token) by default: not part of DeiT, never trained
    options = {"add_pooling_layer": False} if architecture.endswith("Model") else {}
    hf_model = model_class(config_class(**config), **options)
    hf_model.load_state_dict(transformers_state(trained.model, architecture), strict=True)
    hf_model.save_pretrained(directory)
    # DeiTImageProcessor's own default squashes to 256x256; DeiT's eval resizes the short side, then crops.
    transformers.DeiTImageProcessor(
        do_resize=True,
        size={"shortest_edge": trained.resize_size},
        resample=3,  # PIL bicubic
        do_center_crop=True,
        crop_size={"height": trained.img_size, "width": trained.img_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        # grey, palette and transparent images made RGB as our eval transform reads them (data/images.py); without
        # it the processor normalises a one-channel image with three means and fails
        do_convert_rgb=True,
    ).save_pretrained(directory)


def export_timm(trained: TrainedModel, directory: Path) -> None:
    from timm.models import save_for_hf

    save_for_hf(
        encoder_of(trained.model),
        str(directory),
        model_config={"label_names": trained.class_names} if trained.class_names else {},
        safe_serialization=True,
        data_config={
            "input_size": (3, trained.img_size, trained.img_size),
            "crop_pct": trained.img_size / trained.resize_size,
            "interpolation": "bicubic",
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
        },
    )
    # timm writes the architecture's pretrained_cfg, whose tag (fb_in1k), license and origin name the published
    # ImageNet weights: these are not those. What describes the input (size, crop, mean, std) stays.
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    for key in ("tag", "license", "hf_hub_id", "origin_url", "paper_ids", "paper_name", "notes", "source"):
        config["pretrained_cfg"].pop(key, None)
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def export_onnx(trained: TrainedModel, path: Path) -> None:
    try:
        import onnx  # noqa: F401  (torch.onnx.export writes through it)
    except ImportError as error:
        raise DeitTrainError("--onnx needs the onnx package: pip install 'deit-train[onnx]'") from error
    images = torch.zeros(1, 3, trained.img_size, trained.img_size)
    torch.onnx.export(
        trained.model,
        (images,),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )


def card_facts(source: str | Path, trained: TrainedModel, architecture: str | None, ema: bool, onnx: bool) -> CardFacts:
    """What the model card says about `source`: a deit-train checkpoint's config and its run's results."""
    facts = CardFacts(
        trained.class_names,
        trained.img_size,
        "transformers" if architecture else "timm",
        architecture,
        ema=ema,
        onnx=onnx,
    )
    path = Path(source).expanduser()
    if path.is_file():
        run = read_run_checkpoint(path, "CHECKPOINT")
        facts.config = run.config or {}
        for key, value in run_facts(path, run.epoch, ema).items():
            setattr(facts, key, value)
    return facts


def export(
    source: str | Path,
    out_dir: str | Path,
    ema: bool = False,
    onnx: bool = False,
    kind: str | None = None,
    repo_id: str | None = None,
    license: str = "unknown",
) -> Path:
    """Write `source` to OUT_DIR/transformers (as `kind`, else what it is), OUT_DIR/timm, OUT_DIR/README.md (the
    model card, its snippets loading from the Hub repo `repo_id` when given) and, with `onnx`, OUT_DIR/model.onnx."""
    trained = load_trained_model(source, ema=ema, classifier=False)
    # every refusal before anything is written
    diverged = non_finite(trained.model.state_dict())
    if diverged:
        raise DeitTrainError(
            f"{source} has non-finite weights ({len(diverged)} tensors, e.g. {diverged[0]}): its run "
            f"diverged. Export an earlier checkpoint of the run (e.g. best.ckpt)"
        )
    reason = why_no_transformers_class(encoder_of(trained.model))
    architecture = transformers_class(trained.model, kind or default_kind(trained.model)) if not reason else None
    if onnx and isinstance(trained.model, MaskedImageModel):
        raise DeitTrainError("--onnx writes a classifier; a task=mim run has none: fine-tune it first")
    out_dir = Path(out_dir).expanduser()
    check_output_dir(out_dir)
    # Written beside OUT_DIR first, then moved in: a failed export leaves an earlier one as it was.
    staging = out_dir.parent / f".{out_dir.name}.export-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if architecture:
            export_transformers(trained, staging / "transformers", architecture)
        else:
            log.warning("%s: transformers has no class for %s: exported to timm only", source, reason)
        export_timm(trained, staging / "timm")
        if onnx:
            export_onnx(trained, staging / "model.onnx")
        card = model_card(card_facts(source, trained, architecture, ema, onnx), str(out_dir), repo_id, license)
        card.save(staging / "README.md")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in EXPORT_ENTRIES:  # an earlier export's files go, also those this one does not write
            target, staged = out_dir / name, staging / name
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            if staged.exists():
                staged.replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


EXPORT_ENTRIES = {"transformers", "timm", "model.onnx", "README.md"}
EXPORT_FILES = {"model.onnx", "README.md"}


def check_output_dir(out_dir: Path) -> None:
    """OUT_DIR is new, empty or an earlier export (which is replaced); anything else is refused before work."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DeitTrainError(f"OUT_DIR {out_dir} is a file: give a folder to write the export into")
    entries = list(out_dir.iterdir()) if out_dir.is_dir() else []
    others = sorted(p.name for p in entries if p.name not in EXPORT_ENTRIES or p.is_dir() == (p.name in EXPORT_FILES))
    if others:
        raise DeitTrainError(
            f"OUT_DIR {out_dir} holds other files ({', '.join(others[:3])}): give a new or empty "
            f"folder, or an earlier export's, which is replaced"
        )


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="deit-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a deit-train .ckpt (last.ckpt, best.ckpt)")
    parser.add_argument("out_dir", help="written: OUT_DIR/transformers, OUT_DIR/timm (and OUT_DIR/model.onnx)")
    parser.add_argument(
        "--as",
        dest="kind",
        choices=list(CLASSES),
        help="the transformers class (default: what the checkpoint is): with-teacher (distilled DeiT), classifier "
        "(the class head alone), mim (task=mim run), backbone (DeiTModel / ViTModel)",
    )
    parser.add_argument("--ema", action="store_true", help="export the EMA weights (runs with ema.decay)")
    parser.add_argument("--onnx", action="store_true", help="also write OUT_DIR/model.onnx")
    hub = parser.add_argument_group("the Hugging Face Hub")
    hub.add_argument(
        "--push-to-hub",
        metavar="OWNER/NAME",
        help="upload OUT_DIR (model card included) to this Hub model repo, created if needed; the token from "
        "`hf auth login` or HF_TOKEN",
    )
    hub.add_argument("--private", action="store_true", help="create the Hub repo private")
    hub.add_argument(
        "--license", default="unknown", help="the model card's license id (default: unknown), e.g. apache-2.0"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with error_boundary("deit-export"):
        check_output_dir(Path(args.out_dir).expanduser())  # before the checkpoint is read
        if args.push_to_hub:
            check_repo_id(args.push_to_hub)
        out_dir = export(
            args.checkpoint,
            args.out_dir,
            ema=args.ema,
            onnx=args.onnx,
            kind=args.kind,
            repo_id=args.push_to_hub,
            license=args.license,
        )
        if args.push_to_hub:
            print(f"pushed:       {push_to_hub(out_dir, args.push_to_hub, args.private)}")
    if (out_dir / "transformers").is_dir():
        hf_dir = out_dir / "transformers"
        architecture = json.loads((hf_dir / "config.json").read_text())["architectures"][0]
        pooler = ", add_pooling_layer=False" if architecture.endswith("Model") else ""  # none was trained
        print(f"transformers: {architecture}.from_pretrained({str(hf_dir)!r}{pooler})")
    print(f"timm:         timm.create_model('local-dir:{out_dir / 'timm'}', pretrained=True)")
    if args.onnx:
        print(f"onnx:         {out_dir / 'model.onnx'}")
    print(f"model card:   {out_dir / 'README.md'}")


if __name__ == "__main__":
    main()
