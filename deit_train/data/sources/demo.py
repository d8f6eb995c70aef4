"""A generated image-classification dataset, so that deit-train runs with no download.

Ten classes of shapes and textures drawn at random positions, sizes, rotations and colours on noisy gradient
backgrounds. Like many ImageNet photos, each image holds more than its label: the labelled object and a smaller
distractor of another class. A random crop may keep only the distractor, and then the label is wrong for the view
while a teacher's prediction on the view can be right: the case for DeiT's hard-label distillation (section 4).
Recognition needs translation and scale invariance, which a convnet has by construction and a small ViT must learn
from data. Written once as an ImageFolder (train/ and val/); every image is a pure function of (seed, split, class,
index), so the dataset is the same on every machine. data=demo (DemoSource) trains on it.
"""

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from deit_train.data.sources.imagefolder import FolderSource
from deit_train.errors import DeitTrainError
from deit_train.schema import Range, checked

CLASS_NAMES = (
    "checker",
    "circle",
    "cross",
    "diamond",
    "dots",
    "hbars",
    "ring",
    "square",
    "triangle",
    "vbars",
)
SUPERSAMPLE = 4  # draw large, then downsample with antialiasing


@dataclass
class DemoSource(FolderSource):
    """The generated data, written once under cache_dir as an ImageFolder: no download."""

    cache_dir: str | None = None  # where it is written (conf: paths.cache_dir)
    image_size: int = checked(
        32, Range(1, None, "a size in pixels >= 1", integer=True)
    )  # stored; trained at model.img_size
    train_per_class: int = checked(100, Range(1, None, "a number of images >= 1", integer=True))
    val_per_class: int = checked(60, Range(1, None, "a number of images >= 1", integer=True))
    seed: int = 0  # the drawing's seed, not the run's

    # each image is a function of the other keys, wherever cache_dir has it written
    reading_keys = (*FolderSource.reading_keys, "cache_dir")

    def check(self) -> None:
        super().check()
        if not self.cache_dir:
            raise DeitTrainError(
                "data=demo needs data.cache_dir=PATH (or paths.cache_dir): where the demo data is written"
            )

    def folder(self) -> Path:
        return ensure_demo_dataset(self.cache_dir, self.image_size, self.train_per_class, self.val_per_class, self.seed)


def demo_root(cache_dir: str | Path, image_size: int, train_per_class: int, val_per_class: int, seed: int) -> Path:
    name = f"demo-v3-s{image_size}-n{train_per_class}-{val_per_class}-seed{seed}"
    return Path(cache_dir).expanduser() / name


def ensure_demo_dataset(
    cache_dir: str | Path,
    image_size: int = 32,
    train_per_class: int = 300,
    val_per_class: int = 60,
    seed: int = 0,
) -> Path:
    """The ImageFolder root of the demo data, written on first use. Safe against concurrent writers
    (DDP ranks, sweep jobs): each writes a private temporary folder and renames it into place."""
    root = demo_root(cache_dir, image_size, train_per_class, val_per_class, seed)
    if (root / "COMPLETE").exists():
        return root
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=root.name + ".tmp-", dir=root.parent))
    except OSError as error:
        raise DeitTrainError(
            f"the demo images cannot be written under {root.parent} ({error.strerror}): set paths.cache_dir (or "
            f"data.cache_dir) to a writable folder"
        ) from error
    try:
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            for class_index, class_name in enumerate(CLASS_NAMES):
                folder = staging / split / class_name
                folder.mkdir(parents=True)
                for index in range(count):
                    rng = np.random.default_rng([seed, 0 if split == "train" else 1, class_index, index])
                    draw_sample(class_name, image_size, rng).save(folder / f"{index:05d}.png")
        (staging / "COMPLETE").touch()
        try:
            os.rename(staging, root)
        except OSError:  # another process finished first
            if not (root / "COMPLETE").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def draw_sample(class_name: str, image_size: int, rng: np.random.Generator) -> Image.Image:
    size = image_size * SUPERSAMPLE
    # Dark object on a light background or the reverse: the shape, not the colour, carries the class.
    dark_background = rng.random() < 0.5
    image = Image.fromarray(background(size, rng, dark_background))
    draw = ImageDraw.Draw(image)
    low, high = (150, 256) if dark_background else (0, 106)
    colour = tuple(int(c) for c in rng.integers(low, high, 3))
    distractor = CLASS_NAMES[(CLASS_NAMES.index(class_name) + rng.integers(1, len(CLASS_NAMES))) % len(CLASS_NAMES)]
    for name, (low_extent, high_extent) in ((distractor, (0.25, 0.4)), (class_name, (0.5, 0.8))):
        extent = rng.uniform(low_extent, high_extent) * size
        cx, cy = rng.uniform(extent / 2, size - extent / 2, 2)
        draw_shape(draw, name, cx, cy, extent, rng.uniform(0, 2 * math.pi), colour, rng)
    image = image.resize((image_size, image_size), Image.Resampling.LANCZOS)
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 8, (image_size, image_size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def background(size: int, rng: np.random.Generator, dark: bool) -> np.ndarray:
    """A random linear colour gradient, dark or light."""
    start, end = rng.integers(0, 106, (2, 3)) + (0 if dark else 150)
    direction = rng.uniform(-1, 1, 2)
    ys, xs = np.mgrid[0:size, 0:size] / size
    weight = (direction[0] * xs + direction[1] * ys - min(direction.min(), 0) * 2) / (
        np.abs(direction).sum() * 2 + 1e-6
    )
    weight = np.clip(weight, 0, 1)[..., None]
    return (start * (1 - weight) + end * weight).astype(np.uint8)


def rotated(points: np.ndarray, cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return [tuple(p) for p in points @ rotation.T + (cx, cy)]


def draw_shape(draw: ImageDraw.ImageDraw, name: str, cx, cy, extent, angle, colour, rng) -> None:
    r = extent / 2
    width = max(2, int(extent * 0.18))
    if name == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif name == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=width)
    elif name == "square":
        draw.polygon(rotated(np.array([[-r, -r], [r, -r], [r, r], [-r, r]]) * 0.8, cx, cy, angle), fill=colour)
    elif name == "diamond":
        draw.polygon(rotated(np.array([[0, -r], [0.55 * r, 0], [0, r], [-0.55 * r, 0]]), cx, cy, angle), fill=colour)
    elif name == "triangle":
        corners = np.array([[r * math.cos(a), r * math.sin(a)] for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)])
        draw.polygon(rotated(corners, cx, cy, angle), fill=colour)
    elif name == "cross":
        for bar in (np.array([[-r, -width / 2], [r, -width / 2], [r, width / 2], [-r, width / 2]]),):
            draw.polygon(rotated(bar, cx, cy, angle), fill=colour)
            draw.polygon(rotated(bar, cx, cy, angle + math.pi / 2), fill=colour)
    elif name in ("hbars", "vbars"):
        # Stripes inside the object's box; orientation kept within 20 degrees of the class's axis.
        tilt = rng.uniform(-0.35, 0.35) + (0 if name == "hbars" else math.pi / 2)
        period = extent / 3
        for k in range(-1, 2):
            offset = k * period
            bar = np.array(
                [
                    [-r, offset - width / 2],
                    [r, offset - width / 2],
                    [r, offset + width / 2],
                    [-r, offset + width / 2],
                ]
            )
            draw.polygon(rotated(bar, cx, cy, tilt), fill=colour)
    elif name == "checker":
        cell = extent / 4
        for i in range(4):
            for j in range(4):
                if (i + j) % 2 == 0:
                    x0, y0 = cx - r + i * cell, cy - r + j * cell
                    draw.rectangle((x0, y0, x0 + cell, y0 + cell), fill=colour)
    elif name == "dots":
        for _ in range(6):
            dx, dy = rng.uniform(-r, r, 2)
            dot = extent * 0.09
            draw.ellipse((cx + dx - dot, cy + dy - dot, cx + dx + dot, cy + dy + dot), fill=colour)
    else:
        raise ValueError(f"unknown demo class {name}")
