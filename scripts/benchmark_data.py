"""Input-pipeline throughput per data-loader worker, each source against the official DeiT pipeline in the same run.

Rows (images/s with ONE data-loader worker, augment=deit at --img-size, on ImageNet-sized 500x375 JPEGs, quality 90):
  official               torchvision ImageFolder + timm create_transform with the paper's arguments, no model
  loader_<source>        deit-train's training loader alone (seeded views), for imagefolder, hf (Arrow, from
                         save_to_disk), shards (deit-shard, the JPEGs as they are) and shards_256 (re-encoded at a
                         short side of 256 px, quality 90)
  end_to_end_imagefolder deit-train training a trivial student (1 block of width 48) under Lightning, the loader
                         included: what the issue's target compares with `official`
the bytes of one training batch as the workers hand it over through shared memory (shm_bytes_per_batch_official:
fp32 images; shm_bytes_per_batch_deit: deit-train's uint8 pixels with erasing draws, labels and view keys), and the
seconds deit-shard takes for the test JPEGs and for the demo set (both splits, read back and checked).
Then the decode rows (data.decode, deit_train/data/decode.py), each against the official pipeline in the same run,
on the 500x375 JPEGs and on --large-images photo-like 4000x3000 JPEGs (quality 90, batch --large-batch), as images
per CPU-second of the loader run in this process (one worker's rate on a core of its own, not slowed by other jobs):
  official_<size>        as `official` above: torchvision's ImageFolder (a full PIL decode) + create_transform
  exact_<size>           deit-train's train transform (augment=deit) on open_image's files, decode=exact
  reduced_<size>         the same, decode=reduced (a large JPEG decoded at 1/2, 1/4 or 1/8 where the crop allows)
then end to end on the 4000x3000 JPEGs, one worker, the trivial student trained with data.decode=exact and =reduced
against the official pipeline's loader (official_e2e_4000x3000, end_to_end_4000x3000_<decode>),
and, with --gpu-images-per-s R, the workers one GPU eating R images/s would need with each row (workers_for_gpu_*).
--psnr N measures the reduced decode's pixel difference from the exact one on N photo-like 4000x3000 JPEGs (PSNR
in dB, 224 px crops of the same boxes), beside what the bicubic resize itself varies (psnr_* figures, decode_psnr).
Each figure is the best of --repeats passes, the rows interleaved so that drift in the machine's speed hits all.

    python scripts/benchmark_data.py [--images 512] [--img-size 224] [--repeats 2] [--batch 32] [--large-images 96]
        [--large-batch 8] [--gpu-images-per-s 3500] [--psnr 20] [--markdown] [--json out.json]

scripts/benchmark.py runs these rows as its `data` row.
"""

import argparse
import json
import math
import os
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torchvision
from bench.official import official_train_transform  # scripts/bench/, beside this script
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image, ImageDraw
from timm.data.transforms import RandomResizedCropAndInterpolation

from deit_train.data import DeiTDataModule
from deit_train.data.datamodule import PREFETCH_FACTOR
from deit_train.data.decode import RandomResizedCrop, ResizeShortSide
from deit_train.data.images import load_image, open_image
from deit_train.data.sources import build_source
from deit_train.data.sources.demo import ensure_demo_dataset
from deit_train.data.transforms import CenterCrop, train_transform
from deit_train.tools.shard import main as deit_shard
from deit_train.train import CONFIG_DIR

BATCH = 32  # the default batch; a run needs at least 4 batches of training JPEGs


def make_jpegs(root: Path, count: int) -> Path:
    """`count` photo-sized training JPEGs in 2 classes (smooth gradients plus noise, 500x375, quality 90), 4 val."""
    rng = np.random.default_rng(0)
    for split, n in (("train", count), ("val", 4)):
        for label in range(2):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for index in range(n // 2):
                base = np.linspace(0, 255, 500)[None, :, None] * rng.uniform(0.3, 1, 3)
                pixels = np.clip(base + rng.normal(0, 20, (375, 500, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.jpg", quality=90)
    return root


def save_hf(root: Path, out: Path) -> Path:
    import datasets

    splits = {}
    for split, name in (("train", "train"), ("val", "validation")):
        files = sorted((root / split).glob("*/*.jpg"))
        classes = sorted(p.name for p in (root / "train").iterdir())
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
        rows = {
            "image": [{"bytes": f.read_bytes(), "path": None} for f in files],
            "label": [classes.index(f.parent.name) for f in files],
        }
        splits[name] = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(out))
    return out


def timed_shards(src: Path, out: Path, *options: str) -> float:
    start = time.perf_counter()
    deit_shard([str(src), str(out), "--shard-samples", "64", "--workers", "1", *options])
    return time.perf_counter() - start


def compose_run(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=["augment=deit", "paths.output_dir=.", "paths.cache_dir=.", *overrides])


def official_folder(root: Path, img_size: int, augment: DictConfig) -> torchvision.datasets.ImageFolder:
    """The official pipeline's training set: torchvision's ImageFolder (a full PIL decode) + its transform."""
    return torchvision.datasets.ImageFolder(str(root / "train"), transform=official_train_transform(img_size, augment))


def official(root: Path, img_size: int, augment: DictConfig, batch: int) -> float:
    """The official pipeline (facebookresearch/deit datasets.py build_transform): timm create_transform."""
    dataset = official_folder(root, img_size, augment)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=1, drop_last=True)
    return drain(loader)


def decoding(root: Path, img_size: int, augment: DictConfig, batch: int, decode: str) -> float:
    """deit-train's train transform on undecoded files (open_image), its first step decoding as `decode` says."""
    transform = train_transform(augment, img_size, decode)
    return cpu_rate(
        torchvision.datasets.ImageFolder(str(root / "train"), transform=transform, loader=open_image), batch
    )


def official_cpu(root: Path, img_size: int, augment: DictConfig, batch: int) -> float:
    return cpu_rate(official_folder(root, img_size, augment), batch)


def cpu_rate(dataset, batch: int) -> float:
    """Images per CPU-second of a loader in this process (batches collated, as a worker makes them; the first
    batch not counted): one worker's images/s on a core of its own, whatever else the machine runs."""
    iterator = iter(torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True))
    next(iterator)
    start, count = time.process_time(), 0
    for _images, labels in iterator:  # deit-train's images are an ErasableView (data/pixels.py): count the labels
        count += len(labels)
    return count / (time.process_time() - start)


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """A natural-looking synthetic photograph: 1/f texture (the amplitude spectrum of natural images), smooth shading
    and colour, a linear gradient, a dozen hard-edged objects of their own colour, and sensor grain (sigma 2)."""
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(height)[:, None].astype(np.float32)
    fx = np.fft.rfftfreq(width)[None, :].astype(np.float32)
    frequency = np.sqrt(fx * fx + fy * fy)
    frequency[0, 0] = 1.0

    def field(power: float) -> np.ndarray:
        spectrum = np.fft.rfft2(rng.standard_normal((height, width), dtype=np.float32)) / frequency**power
        spectrum[0, 0] = 0
        out = np.fft.irfft2(spectrum, s=(height, width)).astype(np.float32)
        return out / out.std()

    texture, shade = field(1.0), field(1.6)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    gradient = x / width * rng.uniform(-1, 1) + y / height * rng.uniform(-1, 1)
    pixels = np.empty((height, width, 3), np.float32)
    for channel in range(3):
        pixels[..., channel] = (
            128 + 40 * rng.uniform(0.5, 1.5) * gradient + 25 * rng.uniform(0.5, 1.5) * shade + 18 * texture
        )
    mask = Image.new("L", (width, height))
    draw = ImageDraw.Draw(mask)
    for index in range(1, 13):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.03, 0.2) * width
        if index % 2:
            angles = np.sort(rng.uniform(0, 2 * np.pi, 7))
            draw.polygon(
                [
                    (cx + r * rng.uniform(0.5, 1.2) * np.cos(a), cy + r * rng.uniform(0.5, 1.2) * np.sin(a))
                    for a in angles
                ],
                fill=index,
            )
        else:
            draw.ellipse((cx - r, cy - 0.7 * r, cx + r, cy + 0.7 * r), fill=index)
    labels = np.asarray(mask)
    for index in range(1, 13):
        pixels[labels == index] += rng.uniform(-70, 70, 3).astype(np.float32)
    pixels += rng.normal(0, 2, pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_large_jpegs(root: Path, count: int, distinct: int = 8) -> Path:
    """`count` 4000x3000 training JPEGs (quality 90) in 2 classes: `distinct` photo_like pictures, each saved as
    several files (decoding costs the same for a copy; generating one takes seconds)."""
    files = []
    for seed in range(min(distinct, count)):
        files.append(root / f"source{seed}.jpg")
        root.mkdir(parents=True, exist_ok=True)
        photo_like(4000, 3000, seed).save(files[-1], quality=90)
    for index in range(count):
        folder = root / "train" / f"class{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(files[index % len(files)], folder / f"{index}.jpg")
    return root


def decode_rows(
    img_size: int, large_images: int, repeats: int, large_batch: int, batch: int = BATCH, small_images: int = 256
) -> dict[str, float]:
    """images/s per worker: official, exact and reduced on the 500x375 JPEGs and on 4000x3000 ones (docstring)."""
    torch.set_num_threads(1)
    augment = compose_run().augment
    with tempfile.TemporaryDirectory() as tmp:
        roots = {
            "500x375": (make_jpegs(Path(tmp) / "small", small_images), batch),
            "4000x3000": (make_large_jpegs(Path(tmp) / "large", large_images), large_batch),
        }
        rows = {}
        for size, (root, size_batch) in roots.items():
            rows[f"official_{size}"] = lambda root=root, b=size_batch: official_cpu(root, img_size, augment, b)
            for decode in ("exact", "reduced"):
                rows[f"{decode}_{size}"] = lambda root=root, b=size_batch, d=decode: decoding(
                    root, img_size, augment, b, d
                )
        best = dict.fromkeys(rows, 0.0)
        for _ in range(repeats):
            for name, measure in rows.items():
                best[name] = max(best[name], measure())
    results = {f"ips_per_worker_{name}": value for name, value in best.items()}
    for name, value in best.items():
        if not name.startswith("official"):
            results[f"x_official_{name}"] = value / best[f"official_{name.split('_', 1)[1]}"]
    return results


def large_end_to_end_rows(img_size: int, large_images: int, repeats: int, large_batch: int) -> dict[str, float]:
    """End to end on the 4000x3000 JPEGs, one worker: the official pipeline's loader (as `official`) against deit-train
    training the trivial student with data.decode=exact and =reduced (as `end_to_end_imagefolder`)."""
    torch.set_num_threads(1)
    augment = compose_run().augment
    with tempfile.TemporaryDirectory() as tmp:
        root = make_large_jpegs(Path(tmp) / "large", large_images)
        for folder in sorted((root / "train").iterdir()):  # a val split, which data=imagefolder asks for
            (root / "val" / folder.name).mkdir(parents=True)
            for picture in sorted(folder.glob("*.jpg"))[:2]:
                shutil.copyfile(picture, root / "val" / folder.name / picture.name)
        paths = {"jpegs": root}
        rows = {"official_e2e_4000x3000": lambda: official(root, img_size, augment, large_batch)}
        for decode in ("exact", "reduced"):
            rows[f"end_to_end_4000x3000_{decode}"] = lambda d=decode: end_to_end(
                "imagefolder", paths, img_size, large_batch, f"data.decode={d}"
            )
        best = dict.fromkeys(rows, 0.0)
        for _ in range(repeats):
            for name, measure in rows.items():
                best[name] = max(best[name], measure())
    results = {f"ips_per_worker_{name}": value for name, value in best.items()}
    for name in rows:
        if not name.startswith("official"):
            results[f"x_official_{name}"] = best[name] / best["official_e2e_4000x3000"]
    return results


def workers_for_gpu(results: dict[str, float], gpu_images_per_s: float) -> dict[str, float]:
    """The data-loader workers (one core each) that feed a GPU eating `gpu_images_per_s`, for each images/s row."""
    prefix = "ips_per_worker_"
    return {
        f"workers_for_gpu_{key[len(prefix) :]}": float(math.ceil(gpu_images_per_s / value))
        for key, value in results.items()
        if key.startswith(prefix)
    }


def psnr(a, b) -> float:
    error = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if error == 0 else float(10 * np.log10(255**2 / error))


def decode_psnr(images: int = 20, crops: int = 5, img_size: int = 224) -> dict[str, float]:
    """The reduced decode against the exact one, and what the bicubic resize itself varies, as the mean PSNR (dB)
    over `crops` training boxes (timm's draws, bicubic) of each of `images` photo-like 4000x3000 JPEGs (q 90):
      psnr_reduced_train          reduced crop vs exact crop of the same box (min: psnr_reduced_train_min)
      psnr_reduced_eval           eval's resize (short side img_size / 0.875) + center crop, reduced vs exact
      psnr_pil_vs_torch_bicubic   the exact crop resized by Pillow vs by torch (bicubic, antialias), rounded
      psnr_box_shift_half_pixel   the box moved by half a pixel of the 4000x3000 image (get_params rounds to whole
                                  pixels: the same draw), both by Pillow's resize(box=)
      psnr_box_shift_one_pixel    the box moved one pixel right
      psnr_bicubic_vs_bilinear    the exact crop resized bicubic vs bilinear (timm's interpolation=random mixes them)
    """
    timm_crop = RandomResizedCropAndInterpolation(img_size, interpolation="bicubic")
    reduced_crop = RandomResizedCrop(timm_crop, "reduced")
    resize_size = math.floor(img_size / 0.875)
    center = CenterCrop(img_size)
    sums: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(images):
            path = Path(tmp) / f"{seed}.jpg"
            photo_like(4000, 3000, 1000 + seed).save(path, quality=90)
            full = load_image(path)
            for crop in range(crops):
                random.seed(seed * crops + crop)
                top, left, height, width = timm_crop.get_params(full, timm_crop.scale, timm_crop.ratio)
                random.seed(seed * crops + crop)
                reduced = reduced_crop(open_image(path))
                box = (left, top, left + width, top + height)
                exact = full.crop(box).resize((img_size, img_size), Image.Resampling.BICUBIC)
                region = torch.from_numpy(np.array(full.crop(box))).permute(2, 0, 1)[None].float()
                by_torch = torch.nn.functional.interpolate(
                    region, size=(img_size, img_size), mode="bicubic", antialias=True, align_corners=False
                )
                by_torch = by_torch[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()
                step = 1 if left + width < full.width else -1
                moved = (left + step, top, left + width + step, top + height)
                half = (left + step / 2, top, left + width + step / 2, top + height)
                figures = {
                    "psnr_reduced_train": psnr(reduced, exact),
                    "psnr_pil_vs_torch_bicubic": psnr(exact, by_torch),
                    "psnr_box_shift_half_pixel": psnr(
                        full.resize((img_size, img_size), Image.Resampling.BICUBIC, box=box),
                        full.resize((img_size, img_size), Image.Resampling.BICUBIC, box=half),
                    ),
                    "psnr_box_shift_one_pixel": psnr(
                        exact, full.crop(moved).resize((img_size, img_size), Image.Resampling.BICUBIC)
                    ),
                    "psnr_bicubic_vs_bilinear": psnr(
                        exact, full.crop(box).resize((img_size, img_size), Image.Resampling.BILINEAR)
                    ),
                }
                for name, value in figures.items():
                    sums.setdefault(name, []).append(value)
            eval_exact = center(ResizeShortSide(resize_size, "exact")(full))
            eval_reduced = center(ResizeShortSide(resize_size, "reduced")(open_image(path)))
            sums.setdefault("psnr_reduced_eval", []).append(psnr(eval_exact, eval_reduced))
    results = {name: float(np.mean(values)) for name, values in sums.items()}
    results["psnr_reduced_train_min"] = float(np.min(sums["psnr_reduced_train"]))
    return results


def drain(loader) -> float:
    """images/s over a pass of `loader`, from its second batch (the first waits for the worker to start)."""
    iterator = iter(loader)
    next(iterator)
    start, count = time.perf_counter(), 0
    for _images, labels, *_ in iterator:  # deit-train's images may be an ErasableView (data/pixels.py)
        count += len(labels)
    return count / (time.perf_counter() - start)


def batch_bytes(batch) -> int:
    """The bytes of a batch's tensors: what a worker puts in shared memory for it."""
    if isinstance(batch, torch.Tensor):
        return batch.nbytes
    return sum(batch_bytes(part) for part in batch)


def shm_bytes(root: Path, img_size: int, augment: DictConfig, batch: int) -> dict[str, int]:
    """One training batch's bytes, the official loader's and deit-train's (imagefolder)."""
    dataset = official_folder(root, img_size, augment)
    official_batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=batch)))
    cfg = compose_run(
        *data_overrides("imagefolder", {"jpegs": root}),
        f"data.batch_size={batch}",
        "data.num_workers=0",
        "data.pin_memory=false",
    )
    datamodule = DeiTDataModule(cfg.data, cfg.augment, img_size)
    datamodule.setup()
    ours = next(iter(datamodule.train_dataloader()))
    return {"shm_bytes_per_batch_official": batch_bytes(official_batch), "shm_bytes_per_batch_deit": batch_bytes(ours)}


def data_overrides(source: str, paths: dict[str, Path]) -> list[str]:
    if source == "imagefolder":
        return ["data=imagefolder", f"data.root={paths['jpegs']}"]
    if source == "hf":
        return ["data=hf", f"data.dataset={paths['hf']}"]
    info = json.loads((paths[source] / "_info.json").read_text())
    last = {split: len(entry["filenames"]) - 1 for split, entry in info["splits"].items()}
    return [
        "data=webdataset",
        f"data.train='{paths[source]}/train-{{000000..{last['train']:06d}}}.tar'",
        f"data.val='{paths[source]}/val-{{000000..{last['val']:06d}}}.tar'",
        "data.shuffle_buffer=64",
    ]


def deit_loader(source: str, paths: dict[str, Path], img_size: int, batch: int) -> float:
    cfg = compose_run(
        *data_overrides(source, paths), f"data.batch_size={batch}", "data.num_workers=1", "data.pin_memory=false"
    )
    datamodule = DeiTDataModule(cfg.data, cfg.augment, img_size)
    datamodule.setup()
    return drain(datamodule.train_dataloader())


def end_to_end(source: str, paths: dict[str, Path], img_size: int, batch: int, *more: str) -> float:
    """deit-train's training of a trivial student (1 block, width 48), loader included: images/s of the steps
    after the first two, less the PREFETCH_FACTOR batches its one worker may have made before the timing started
    (a lower bound: `official` has no such head start). `more`: further overrides (data.decode)."""
    cfg = compose_run(
        *data_overrides(source, paths),
        *more,
        "model=deit_tiny",
        f"model.img_size={img_size}",
        "model.depth=1",
        "model.embed_dim=48",
        "model.num_heads=3",
        "loss=ce",
        "trainer=cpu",
        f"data.batch_size={batch}",
        "data.num_workers=1",
        "data.pin_memory=false",
    )
    task = instantiate(cfg.task)
    built = task.build(cfg, task.datamodule(cfg, build_source(cfg.data)))
    times = {}

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == 2:
                times["start"] = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            times["end"], times["batches"] = time.perf_counter(), batch_idx - 1

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[Timer()],
    )
    trainer.fit(built.module, datamodule=built.datamodule)
    return (times["batches"] - PREFETCH_FACTOR) * batch / (times["end"] - times["start"])


def data_rows(img_size: int = 224, images: int = 512, repeats: int = 2, batch: int = BATCH) -> dict[str, float]:
    """Every row of this benchmark (module docstring) as {name: value}."""
    if images < 6 * batch:  # the end-to-end row times the steps after the first two, less the 2 prefetched
        raise ValueError(f"images={images}: the rows need at least 6 batches of {batch}; give more or a smaller batch")
    torch.set_num_threads(1)  # the main process: one core, as a data-loader worker has
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = {"jpegs": make_jpegs(tmp / "jpegs", images)}
        paths["hf"] = save_hf(paths["jpegs"], tmp / "hf")
        results = {"shard_write_s_jpegs": timed_shards(paths["jpegs"], tmp / "shards")}
        paths["shards"] = tmp / "shards"
        results["shard_write_s_jpegs_resize256"] = timed_shards(paths["jpegs"], tmp / "shards_256", "--resize", "256")
        paths["shards_256"] = tmp / "shards_256"
        demo = ensure_demo_dataset(tmp / "demo_cache", image_size=32, train_per_class=100, val_per_class=60)
        results["shard_write_s_demo"] = timed_shards(demo, tmp / "demo_shards")
        augment = compose_run().augment
        results.update(shm_bytes(paths["jpegs"], img_size, augment, batch))
        rows = {"official": lambda: official(paths["jpegs"], img_size, augment, batch)}
        for source in ("imagefolder", "hf", "shards", "shards_256"):
            rows[f"loader_{source}"] = lambda source=source: deit_loader(source, paths, img_size, batch)
        rows["end_to_end_imagefolder"] = lambda: end_to_end("imagefolder", paths, img_size, batch)
        best = dict.fromkeys(rows, 0.0)
        for _ in range(repeats):
            for name, measure in rows.items():
                best[name] = max(best[name], measure())
    for name, value in best.items():
        results[f"ips_per_worker_{name}"] = value
    for name in rows:
        if name != "official":
            results[f"x_official_{name}"] = best[name] / best["official"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512, help="training JPEGs")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument(
        "--large-images", type=int, default=96, help="4000x3000 JPEGs of the decode rows (0: no decode rows)"
    )
    parser.add_argument("--large-batch", type=int, default=8, help="the batch of the 4000x3000 rows")
    parser.add_argument("--gpu-images-per-s", type=float, help="add the workers a GPU at this rate would need")
    parser.add_argument(
        "--psnr",
        type=int,
        default=0,
        metavar="N",
        help="measure the reduced decode's PSNR on N 4000x3000 JPEGs (decode_psnr)",
    )
    parser.add_argument("--decode-only", action="store_true", help="only the decode rows (and --psnr)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.large_images and args.large_images < 6 * args.large_batch:
        parser.error(
            f"--large-images {args.large_images}: the large rows need at least 6 batches of "
            f"--large-batch {args.large_batch}"
        )
    results = {} if args.decode_only else data_rows(args.img_size, args.images, args.repeats, args.batch)
    if args.large_images:
        results.update(
            decode_rows(args.img_size, args.large_images, args.repeats, args.large_batch, args.batch, args.images)
        )
        if not args.decode_only:
            results.update(large_end_to_end_rows(args.img_size, args.large_images, args.repeats, args.large_batch))
    if args.gpu_images_per_s:
        results.update(workers_for_gpu(results, args.gpu_images_per_s))
    if args.psnr:
        results.update(decode_psnr(args.psnr, img_size=args.img_size))
    setup = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"
    if args.markdown:
        print(f"\n{setup}, {args.images} JPEGs 500x375 q90, {args.img_size} px, augment=deit, batch {args.batch}\n")
        print("| figure | value |\n| --- | ---: |")
        for key, value in results.items():
            print(f"| {key} | {value:.2f} |")
    else:
        for key, value in results.items():
            print(f"{key:45s} {value:10.2f}")
    if args.json:
        args.json.write_text(json.dumps({"setup": setup, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
