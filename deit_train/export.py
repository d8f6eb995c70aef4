"""`deit-export CHECKPOINT OUT_DIR`: a trained student for transformers, timm and (optionally) ONNX.

OUT_DIR/transformers  DeiTForImageClassificationWithTeacher.from_pretrained and pipeline("image-classification")
                      load it: config.json (class names as id2label, LayerNorm eps 1e-6), model.safetensors and a
                      preprocessor_config.json that reproduces our eval transform.
OUT_DIR/timm          timm.create_model("local-dir:OUT_DIR/timm", pretrained=True) loads it, or the named
                      architecture with pretrained_cfg_overlay=dict(file=OUT_DIR/timm/model.safetensors).
OUT_DIR/model.onnx    with --onnx: images (N, 3, H, W) -> logits (N, classes), the average of both heads.
"""

import argparse
import logging
import sys
from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from deit_train.errors import DeitTrainError
from deit_train.models import is_distilled
from deit_train.models.transformers_format import timm_to_transformers, transformers_config
from deit_train.trained import TrainedModel, load_trained_model

log = logging.getLogger("deit_train")


def export_transformers(trained: TrainedModel, directory: Path) -> None:
    """A distilled DeiT as DeiTForImageClassificationWithTeacher, with its class names and preprocessing."""
    try:
        from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher, DeiTImageProcessor
    except ImportError as error:
        raise DeitTrainError(
            "the transformers export needs transformers: pip install 'deit-train[hf]'"
        ) from error
    config = transformers_config(trained.model, trained.class_names)
    config.pop("model_type")
    hf_model = DeiTForImageClassificationWithTeacher(DeiTConfig(**config))
    hf_model.load_state_dict(timm_to_transformers(trained.model.state_dict()), strict=True)
    hf_model.save_pretrained(directory)
    # DeiTImageProcessor's own default squashes to 256x256; DeiT's eval resizes the short side, then crops.
    DeiTImageProcessor(
        do_resize=True,
        size={"shortest_edge": trained.resize_size},
        resample=3,  # PIL bicubic
        do_center_crop=True,
        crop_size={"height": trained.img_size, "width": trained.img_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
    ).save_pretrained(directory)


def export_timm(trained: TrainedModel, directory: Path) -> None:
    from timm.models import save_for_hf

    save_for_hf(
        trained.model,
        str(directory),
        model_config={"label_names": trained.class_names},
        safe_serialization=True,
        data_config={
            "input_size": (3, trained.img_size, trained.img_size),
            "crop_pct": trained.img_size / trained.resize_size,
            "interpolation": "bicubic",
            "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD,
        },
    )


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


def has_transformers_class(model: torch.nn.Module) -> bool:
    """transformers' DeiT classes hold the two-token DeiT, without DeiT III's LayerScale (ls1, ls2)."""
    return is_distilled(model) and all(isinstance(block.ls1, torch.nn.Identity) for block in model.blocks)


def export(source: str | Path, out_dir: str | Path, ema: bool = False, onnx: bool = False) -> Path:
    trained = load_trained_model(source, ema=ema)
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    if has_transformers_class(trained.model):
        export_transformers(trained, out_dir / "transformers")
    else:
        kind = "a single-head" if not is_distilled(trained.model) else "a LayerScale (DeiT III)"
        log.warning(
            "%s is %s %s: no transformers export, timm only", source, kind, type(trained.model).__name__
        )
    export_timm(trained, out_dir / "timm")
    if onnx:
        export_onnx(trained, out_dir / "model.onnx")
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="deit-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a deit-train .ckpt (last.ckpt, best.ckpt)")
    parser.add_argument(
        "out_dir", help="written: OUT_DIR/transformers, OUT_DIR/timm (and OUT_DIR/model.onnx)"
    )
    parser.add_argument("--ema", action="store_true", help="export the EMA weights (runs with ema.decay)")
    parser.add_argument("--onnx", action="store_true", help="also write OUT_DIR/model.onnx")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out_dir = export(args.checkpoint, args.out_dir, ema=args.ema, onnx=args.onnx)
    except DeitTrainError as error:
        print(f"deit-export: error: {error}", file=sys.stderr)
        sys.exit(2)
    if (out_dir / "transformers").is_dir():
        hf_dir = str(out_dir / "transformers")
        print(f"transformers: DeiTForImageClassificationWithTeacher.from_pretrained({hf_dir!r})")
    print(f"timm:         timm.create_model('local-dir:{out_dir / 'timm'}', pretrained=True)")
    if args.onnx:
        print(f"onnx:         {out_dir / 'model.onnx'}")


if __name__ == "__main__":
    main()
