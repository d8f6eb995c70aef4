"""Large JPEGs decoded small (data/decode.py, data.decode=reduced): the crop boxes are timm's draws, a small image
or a non-JPEG gives timm's pixels bit for bit, and a large JPEG's reduced crop is close to the exact one (PSNR), in
every EXIF orientation, in training and in evaluation."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T

from deit_train.data import decode
from deit_train.data.decode import RandomResizedCrop, ResizeShortSide
from deit_train.data.images import EncodedImage, load_image, open_image
from deit_train.data.transforms import CenterCrop, eval_transform, train_transform
from deit_train.errors import DataError, DeitTrainError
from deit_train.schema import AugmentConfig

from .conftest import finished, official

AUGMENT = OmegaConf.structured(AugmentConfig)  # augment=deit: RandAugment, erasing 0.25, bicubic
# Reduced vs exact, measured with this file's images: the training crops of the 2000x1500 JPEG at 42-52 dB, of the
# odd-sided 2049x1801 one at 51-52 dB, evaluation's resize (at 1/8) at 42 dB; the 20 photo-like 4000x3000 JPEGs of
# scripts/benchmark_data.py --psnr 20: 47.6 dB on average. A misplaced box shows under 40 dB: the EXIF padding shift
# left out (7/8 of a reduced pixel) 29-38 dB, the box half a reduced pixel off 36-42 dB (a third of the 24 crops
# under 40), a wrong orientation or scale far lower.
MIN_PSNR = 40.0


def psnr(a: Image.Image, b: Image.Image) -> float:
    error = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if error == 0 else 10 * np.log10(255**2 / error)


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """A natural-looking picture: 1/f texture (the spectrum of photographs), smooth shading, and hard-edged
    objects, with a little grain."""
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    frequency = np.maximum(np.hypot(fx, fy), 1.0 / max(width, height))
    texture = np.fft.irfft2(np.fft.rfft2(rng.standard_normal((height, width))) / frequency, s=(height, width))
    texture /= texture.std()
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    pixels = np.stack([128 + 60 * (x * rng.uniform(-1, 1) + y * rng.uniform(-1, 1)) + 18 * texture] * 3, axis=-1)
    for _ in range(8):  # ellipses with hard edges and their own colour
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.2)
        pixels[(x - cx) ** 2 + ((y - cy) / 0.7) ** 2 < r * r] += rng.uniform(-60, 60, 3)
    pixels += rng.normal(0, 2, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def save_jpeg(image: Image.Image, path: Path, orientation: int = 1) -> Path:
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    image.save(path, quality=90, exif=exif.tobytes())
    return path


@pytest.fixture(scope="module")
def large_jpeg(tmp_path_factory) -> Path:
    return save_jpeg(photo_like(2000, 1500), tmp_path_factory.mktemp("large") / "large.jpg")


@pytest.fixture(scope="module")
def odd_picture() -> Image.Image:
    """Odd sides (2049x1801): decoded at 1/8, the last stored pixel of each side covers 1 of 8, so the EXIF flips
    shift the picture by 7/8 of a reduced pixel, which reduced_box must undo."""
    return photo_like(2049, 1801, seed=1)


def scales_used(monkeypatch) -> list[int]:
    """The DCT scales EncodedImage.decode gets, recorded from here on."""
    used, original = [], EncodedImage.decode

    def recording(self, scale=1):
        picture, got = original(self, scale)
        used.append(got)
        return picture, got

    monkeypatch.setattr(EncodedImage, "decode", recording)
    return used


def exact_crop(picture: Image.Image, seed: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> Image.Image:
    random.seed(seed)
    return RandomResizedCropAndInterpolation(224, scale, ratio, "bicubic")(picture)


def reduced_crop(path: Path, seed: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> Image.Image:
    random.seed(seed)
    return RandomResizedCrop(RandomResizedCropAndInterpolation(224, scale, ratio, "bicubic"), "reduced")(
        open_image(path)
    )


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(1, 6000),
    height=st.integers(1, 6000),
    seed=st.integers(0, 2**32 - 1),
    interpolation=st.sampled_from(["bicubic", "random"]),
    low=st.floats(0.01, 1.0),
)
def test_crop_draws_are_timms_for_any_size_and_seed(width, height, seed, interpolation, low):
    """Box and interpolation drawn from the header's size are those timm's __call__ draws on the decoded image
    (its get_params, then random.choice), and the random state after them is the same: every later augmentation
    draws the same too."""
    timm_crop = RandomResizedCropAndInterpolation(224, scale=(low, 1.0), interpolation=interpolation)
    random.seed(seed)
    box = timm_crop.get_params(Image.new("1", (width, height)), timm_crop.scale, timm_crop.ratio)
    expected = (*box, random.choice(timm_crop.interpolation) if interpolation == "random" else timm_crop.interpolation)
    after_timm = random.random()
    random.seed(seed)
    assert RandomResizedCrop(timm_crop, "reduced").draw((width, height)) == expected
    assert random.random() == after_timm


def test_the_box_is_drawn_from_the_size_the_image_shows(tmp_path, monkeypatch):
    """A JPEG stored 300x200 with EXIF orientation 6 (a phone held upright) shows 200x300: the boxes over many
    seeds are timm's on the decoded, turned image."""
    path = save_jpeg(Image.new("RGB", (300, 200), (90, 120, 30)), tmp_path / "turned.jpg", orientation=6)
    timm_crop = RandomResizedCropAndInterpolation(224, interpolation="bicubic")
    shown = load_image(path)
    assert shown.size == (200, 300) and open_image(path).size == (200, 300)
    for seed in range(200):
        random.seed(seed)
        expected = timm_crop.get_params(shown, timm_crop.scale, timm_crop.ratio)
        random.seed(seed)
        assert RandomResizedCrop(timm_crop, "reduced").draw(open_image(path).size)[:4] == expected


def official_train_transform():
    """facebookresearch/deit datasets.py build_transform (scripts/bench/official.py) at 224 px, augment=deit."""
    return official().official_train_transform(224, AUGMENT)


def seed_all(seed: int) -> None:
    """Python's, numpy's (RandAugment picks its ops with np.random) and torch's (erasing) generators."""
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_small_image_gives_timms_train_transform_bit_for_bit(tmp_path, suffix):
    """A 400x300 JPEG (no crop box reaches twice 224 px: nothing to reduce) and a PNG through the whole train
    transform, decode=reduced, from open_image: timm's create_transform output on the decoded image, bit for bit,
    under the same seeds (crop, flip, RandAugment, erasing)."""
    path = tmp_path / f"small{suffix}"
    photo_like(400, 300).save(path, **({"quality": 90} if suffix == ".jpg" else {}))
    ours, official = train_transform(AUGMENT, 224, decode="reduced"), official_train_transform()
    for seed in range(12):
        seed_all(seed)
        expected = official(load_image(path))
        seed_all(seed)
        got, outside = finished(ours(open_image(path)))  # all but the erased noise (tests/test_pixels.py)
        assert torch.equal(got[:, outside], expected[:, outside]), seed


def test_large_jpeg_reduced_crop_is_close_to_the_exact_one(large_jpeg, monkeypatch):
    """2000x1500: over 24 seeds most boxes are large enough to decode at 1/2 or 1/4; each crop is within MIN_PSNR
    of timm's exact crop of the same box. decode=exact gives timm's crop bit for bit."""
    exact = load_image(large_jpeg)
    used = scales_used(monkeypatch)
    for seed in range(24):
        assert psnr(reduced_crop(large_jpeg, seed), exact_crop(exact, seed)) > MIN_PSNR, seed
    assert sum(scale > 1 for scale in used) >= 12 and set(used) <= {1, 2, 4}, used
    timm_crop = RandomResizedCropAndInterpolation(224, interpolation="bicubic")
    for seed in range(3):
        random.seed(seed)
        crop = RandomResizedCrop(timm_crop, "exact")(open_image(large_jpeg))
        assert np.array_equal(np.asarray(crop), np.asarray(exact_crop(exact, seed))), seed


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_the_exact_paths(odd_picture, tmp_path, monkeypatch, orientation):
    """Each EXIF orientation, stored with odd sides: training's reduced crop (large boxes, decoded at 1/4 or 1/8)
    and evaluation's resize (decoded at 1/8) show the picture as the exact path does, where it does."""
    path = save_jpeg(odd_picture, tmp_path / "odd.jpg", orientation)
    exact = load_image(path)
    used = scales_used(monkeypatch)
    for seed in range(3):
        assert psnr(reduced_crop(path, seed, scale=(0.8, 1.0)), exact_crop(exact, seed, scale=(0.8, 1.0))) > MIN_PSNR
    resize_exact = ResizeShortSide(224, "exact")(exact)
    resize_reduced = ResizeShortSide(224, "reduced")(open_image(path))
    assert resize_reduced.size == resize_exact.size and psnr(resize_reduced, resize_exact) > MIN_PSNR
    assert 8 in used and min(used) >= 4, used


def test_eval_transform_reduced_is_close_and_small_images_exact(large_jpeg, tmp_path, monkeypatch):
    """eval_transform(decode=reduced): a large JPEG decoded at 1/4 (short side 1500 >= 4 x 256) within MIN_PSNR
    of the exact transform; a small one (and any decoded image, as deit-predict gives) the exact transform's
    tensor bit for bit."""
    used = scales_used(monkeypatch)
    exact, reduced = eval_transform(AUGMENT, 224), eval_transform(AUGMENT, 224, decode="reduced")
    to_picture = T.Compose(reduced.transforms[:2])  # resize and crop, before the tensor steps
    assert psnr(to_picture(open_image(large_jpeg)), T.Compose(exact.transforms[:2])(load_image(large_jpeg))) > MIN_PSNR
    assert used == [4]
    small = tmp_path / "small.jpg"
    photo_like(500, 375).save(small, quality=90)
    official = T.Compose([T.Resize(256, T.InterpolationMode.BICUBIC), CenterCrop(224), *exact.transforms[2:]])
    assert torch.equal(reduced(open_image(small)), official(load_image(small)))
    assert torch.equal(reduced(load_image(large_jpeg)), official(load_image(large_jpeg)))


def test_png_and_other_formats_take_the_exact_path(tmp_path, monkeypatch):
    """A 2000x1500 PNG (with EXIF orientation 6, which Pillow finds only when it decodes a PNG), a 16-bit PNG and
    a transparent palette GIF: decoded whole (never drafted) and as load_image reads them; the PNG's training crops
    are timm's, drawn on the turned picture, bit for bit."""
    used = scales_used(monkeypatch)
    png = tmp_path / "large.png"
    exif = Image.Exif()
    exif[0x0112] = 6
    photo_like(2000, 1500).save(png, compress_level=1, exif=exif.tobytes())
    exact = load_image(png)
    assert exact.size == (1500, 2000)
    for seed in range(4):
        assert np.array_equal(np.asarray(reduced_crop(png, seed)), np.asarray(exact_crop(exact, seed)))
    deep = tmp_path / "deep.png"
    Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20).save(deep)
    palette = tmp_path / "palette.gif"
    Image.new("P", (64, 48), 3).save(palette, transparency=3)
    for path in (deep, palette):
        assert np.array_equal(np.asarray(open_image(path).decode()[0]), np.asarray(load_image(path))), path
    assert used == [1] * 6


def test_open_image_checks_as_load_image_does(large_jpeg, tmp_path):
    """open_image refuses an image over max_pixels from its header, and a truncated JPEG fails when decoded, each
    as a DataError naming the file (data.skip_corrupt skips it: it is raised in the dataset's __getitem__)."""
    with pytest.raises(DataError, match=f"corrupt image {large_jpeg}: 2000x1500 = 3000000 pixels, above"):
        open_image(large_jpeg, max_pixels=1_000_000)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(large_jpeg.read_bytes()[:5000])
    encoded = open_image(truncated)
    with pytest.raises(DataError, match=f"corrupt image {truncated}: "):
        encoded.decode(4)
    with pytest.raises(DataError, match="corrupt image"):
        load_image(truncated)


def test_unknown_decode_mode_is_one_line(tmp_path):
    with pytest.raises(DeitTrainError, match="data.decode must be one of exact, reduced, got 'fast'"):
        train_transform(AUGMENT, 224, decode="fast")


def test_scale_is_the_largest_that_keeps_the_output_size():
    assert [decode.reduction(room) for room in (0.5, 1.99, 2.0, 3.9, 4.0, 7.99, 8.0, 30.0)] == [1, 1, 2, 2, 4, 4, 8, 8]


def test_validation_decodes_whole_under_data_decode_reduced(tmp_path):
    """data.decode=reduced reduces training crops only: the validation images the run scores are, pixel for pixel,
    deit-eval's (whole decode, resize, centre crop), so metrics.json is reproduced from the checkpoint. 300x200
    JPEGs at 32 px: the short side is 5 times the resize (36 px), room for a 1/4 decode."""
    from deit_train.data import DeiTDataModule

    from .conftest import compose_config

    for split in ("train", "val"):
        for label in ("a", "b"):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            save_jpeg(photo_like(300, 200, seed=len(label + split)), tmp_path / "data" / split / label / "0.jpg")
    cfg = compose_config(
        ["data=imagefolder", f"data.root={tmp_path / 'data'}", "data.decode=reduced", "data.num_workers=0"],
        tmp_path / "run",
        tmp_path / "cache",
    )
    datamodule = DeiTDataModule(cfg.data, cfg.augment, 32)
    datamodule.setup()
    val = datamodule.splits[1]
    whole = eval_transform(cfg.augment, 32)
    for index, path in enumerate(sorted((tmp_path / "data" / "val").rglob("*.jpg"))):
        assert torch.equal(val[index][0], whole(load_image(path))), path
