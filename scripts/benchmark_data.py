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
Each figure is the best of --repeats passes, the rows interleaved so that drift in the machine's speed hits all.

    python scripts/benchmark_data.py [--images 256] [--img-size 224] [--repeats 2] [--batch 32] [--markdown] [--json out.json]

scripts/benchmark.py runs these rows as its `data` row.
"""

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torchvision
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

from deit_train.data import DeiTDataModule
from deit_train.data.demo import ensure_demo_dataset
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
        rows = {"image": [{"bytes": f.read_bytes(), "path": None} for f in files],
                "label": [classes.index(f.parent.name) for f in files]}  # fmt: skip
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


def official(root: Path, img_size: int, augment: DictConfig, batch: int) -> float:
    """The official pipeline (facebookresearch/deit datasets.py build_transform): timm create_transform."""
    transform = create_transform(
        img_size, is_training=True, color_jitter=augment.color_jitter, auto_augment=augment.auto_augment,
        interpolation=augment.train_interpolation, re_prob=augment.reprob, re_mode="pixel", re_count=1,
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
    )  # fmt: skip
    dataset = torchvision.datasets.ImageFolder(str(root / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=1, drop_last=True)
    return drain(loader)


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
    transform = create_transform(img_size, is_training=True, auto_augment=augment.auto_augment, re_prob=augment.reprob,
                                 re_mode="pixel", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)  # fmt: skip
    dataset = torchvision.datasets.ImageFolder(str(root / "train"), transform=transform)
    official_batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=batch)))
    cfg = compose_run(*data_overrides("imagefolder", {"jpegs": root}), f"data.batch_size={batch}",
                      "data.num_workers=0", "data.pin_memory=false")  # fmt: skip
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
    return ["data=webdataset", f"data.train='{paths[source]}/train-{{000000..{last['train']:06d}}}.tar'",
            f"data.val='{paths[source]}/val-{{000000..{last['val']:06d}}}.tar'", "data.shuffle_buffer=64"]  # fmt: skip


def deit_loader(source: str, paths: dict[str, Path], img_size: int, batch: int) -> float:
    cfg = compose_run(*data_overrides(source, paths), f"data.batch_size={batch}", "data.num_workers=1",
                      "data.pin_memory=false")  # fmt: skip
    datamodule = DeiTDataModule(cfg.data, cfg.augment, img_size)
    datamodule.setup()
    return drain(datamodule.train_dataloader())


def end_to_end(source: str, paths: dict[str, Path], img_size: int, batch: int) -> float:
    """deit-train's training of a trivial student (1 block, width 48), loader included: images/s of the steps
    after the first two."""
    cfg = compose_run(*data_overrides(source, paths), "model=deit_tiny", f"model.img_size={img_size}",
                      "model.depth=1", "model.embed_dim=48", "model.num_heads=3", "loss=ce", "trainer=cpu",
                      f"data.batch_size={batch}", "data.num_workers=1", "data.pin_memory=false")  # fmt: skip
    built = instantiate(cfg.task).build(cfg)
    times = {}

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == 2:
                times["start"] = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            times["end"], times["batches"] = time.perf_counter(), batch_idx - 1

    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[Timer()])  # fmt: skip
    trainer.fit(built.module, datamodule=built.datamodule)
    return times["batches"] * batch / (times["end"] - times["start"])


def data_rows(img_size: int = 224, images: int = 256, repeats: int = 2, batch: int = BATCH) -> dict[str, float]:
    """Every row of this benchmark (module docstring) as {name: value}."""
    if images < 4 * batch:  # the end-to-end row times the steps after the first two
        raise ValueError(f"images={images}: the rows need at least 4 batches of {batch}; give more or a smaller batch")
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
    parser.add_argument("--images", type=int, default=256, help="training JPEGs")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = data_rows(args.img_size, args.images, args.repeats, args.batch)
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
