"""Image files: which files are samples (never hidden ones), how one is read as the 8-bit RGB picture it shows
whatever Pillow mode it is stored in, and a scan that finds the unreadable ones before training does.

Reading: the EXIF orientation is applied (as transformers' load_image does, so deit-predict and pipeline() agree);
16-bit and 32-bit integer and float images are scaled to 0..255 (Pillow's convert("RGB") clips them, which turns a
16-bit scan almost white); transparent pixels are composited on white; CMYK, palette and grey images converted.
An image of more than data.max_image_pixels pixels (Pillow's decompression-bomb limit by default) is refused as
corrupt rather than decoded.

open_image checks a file the same way without decoding it (an EncodedImage): the first transform step decodes it,
a large JPEG at a reduced DCT scale where the crop allows (data/decode.py, data.decode=reduced).
"""

import io
import os
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from deit_train.errors import DataError, DeitTrainError

# torchvision's IMG_EXTENSIONS (tests/test_data.py compares), and GIF (its first frame), common in scraped data; written
# here so that reading a folder's listing imports no torchvision
DECODE_MODES = ("exact", "reduced")  # data.decode (data/decode.py)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
BACKGROUND = (255, 255, 255)  # what transparent pixels show
HIGH_BIT_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
READ_ERRORS = (
    OSError,
    UnidentifiedImageError,
    SyntaxError,
    ValueError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
    EOFError,
)


def is_hidden(name: str) -> bool:
    """Dot-files and folders (.ipynb_checkpoints, .DS_Store, macOS ._ files) and macOS archive leftovers."""
    return name.startswith(".") or name == "__MACOSX"


def image_files(folder: Path) -> list[Path]:
    """Every image file below `folder` outside hidden folders, in a fixed (sorted) order (find_images)."""
    return [path for path, _ in find_images(folder)]


def find_images(folder: Path) -> list[tuple[Path, str]]:
    """(path, real path) of every image file below `folder` outside hidden folders, sorted by path. Links are
    followed (a subset of a dataset made of links is common), each real folder once: a link back to a folder above
    it (a loop) adds nothing, and a file reached twice counts once."""
    return sorted(walk_images(Path(folder), set(), set()))


def has_images(folder: Path) -> bool:
    """Whether find_images(folder) finds any, reading no more of the listing than the first image found needs."""
    return next(walk_images(Path(folder), set(), set()), None) is not None


def walk_images(folder: Path, seen_folders: set[str], seen_files: set[str]) -> Iterator[tuple[Path, str]]:
    """find_images's files as they are listed: a folder's own files, then its sub-folders' in sorted order. A
    folder that cannot be listed holds none (as os.walk has it)."""
    real = os.path.realpath(folder)
    if real in seen_folders:
        return
    seen_folders.add(real)
    subfolders = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if is_hidden(entry.name):
                    continue
                if entry.is_dir():  # a link to a folder too
                    subfolders.append(entry.name)
                    continue
                path = folder / entry.name
                if path.suffix.lower() not in IMAGE_EXTENSIONS or not entry.is_file():  # a broken link: no file
                    continue
                real_file = os.path.realpath(path) if entry.is_symlink() else os.path.join(real, entry.name)
                if real_file not in seen_files:
                    seen_files.add(real_file)
                    yield path, real_file
    except OSError:
        return
    for name in sorted(subfolders):
        yield from walk_images(folder / name, seen_folders, seen_files)


def check_classes_hold_images(folder: Path, classes: list[str], empty: list[str] | None = None) -> None:
    """Each class folder of an ImageFolder split holds an image (`empty`: those found without, where the caller has
    listed them): a class without any could neither be learned nor scored."""
    empty = [name for name in classes if not has_images(folder / name)] if empty is None else empty
    if empty:
        raise DeitTrainError(
            f"{folder}: the class folder(s) {empty[:5]} hold no images (extensions: {', '.join(IMAGE_EXTENSIONS)}; "
            f"hidden files and broken links are not read); add images or remove the folder(s)"
        )


def class_folders(folder: Path) -> list[str]:
    """The class sub-folders of an ImageFolder split, hidden ones left out, sorted."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not is_hidden(entry.name))


def load_image(path: str | Path, max_pixels: int | None = Image.MAX_IMAGE_PIXELS) -> Image.Image:
    """The file as 8-bit RGB (module docstring), or a DataError that names it."""
    try:
        return read_rgb(path, max_pixels)
    except READ_ERRORS as error:
        raise corrupt(path, error) from error


def corrupt(name: object, error: BaseException) -> DataError:
    return DataError(
        f"corrupt image {name}: {reason(error)}. Remove or replace the file (in training, data.skip_corrupt=true "
        f"skips such files with a warning)"
    )


def read_rgb(path: str | Path | BinaryIO, max_pixels: int | None, decode: bool = True) -> Image.Image:
    """`path`: a file, or the bytes of one as a file object (a dataset's image column, a shard's sample)."""
    opened = open(path, "rb") if isinstance(path, str | Path) else nullcontext(path)  # noqa: SIM115 (with, below)
    with opened as file:
        image = open_checked(file, max_pixels)
        return decoded_rgb(image) if decode else image


def open_checked(file: BinaryIO, max_pixels: int | None) -> Image.Image:
    """The image's header read (Image.open), its size checked against `max_pixels`; nothing decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(file)
    pixels = image.width * image.height
    if max_pixels is not None and pixels > max_pixels:
        raise ValueError(
            f"{image.width}x{image.height} = {pixels} pixels, above data.max_image_pixels="
            f"{max_pixels} (a decompression bomb?)"
        )
    return image


def decoded_rgb(image: Image.Image) -> Image.Image:
    """An opened image decoded, turned as its EXIF orientation says, as 8-bit RGB (module docstring)."""
    image.load()
    ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of the (usual) unrotated image
    return to_rgb(image)


# How each EXIF orientation (2-8) shows the stored pixels, as exif_transpose applies it: (stored x and y swapped,
# shown x runs against the stored axis it comes from, shown y does). Orientation 6 (a phone held upright) is
# Pillow's ROTATE_270: shown x = stored height - 1 - stored y, shown y = stored x.
ORIENTATIONS = {
    1: (False, False, False),
    2: (False, True, False),
    3: (False, True, True),
    4: (False, False, True),
    5: (True, False, False),
    6: (True, True, False),
    7: (True, True, True),
    8: (True, False, True),
}


class EncodedImage:
    """An image file read and checked as load_image checks it (Pillow can open it, its size within max_pixels) but
    not decoded: `size` is the size it shows (EXIF orientation applied), and decode(scale) gives the picture
    load_image gives, a JPEG optionally at 1/2, 1/4 or 1/8 of that size by libjpeg's DCT scaling (Pillow's draft),
    which costs a fraction of a full decode. Errors while decoding are DataErrors naming the file, as load_image's.
    """

    def __init__(self, data: bytes, max_pixels: int | None, name: object) -> None:
        self.data, self.name = data, name
        header = open_checked(io.BytesIO(data), max_pixels)
        self.is_jpeg = header.format == "JPEG"
        # A JPEG's EXIF sits before its pixels, so the header tells its orientation; other formats (a PNG's eXIf
        # chunk may follow its pixels) are only decoded whole (decode() with scale 1), so theirs is never needed.
        self.orientation = header.getexif().get(ExifTags.Base.Orientation, 1) if self.is_jpeg else 1
        if self.orientation not in ORIENTATIONS:
            self.orientation = 1  # exif_transpose ignores such a value too
        self.stored_size = header.size
        swap = ORIENTATIONS[self.orientation][0]
        self.size = header.size[::-1] if swap else header.size

    def decode(self, scale: int = 1) -> tuple[Image.Image, int]:
        """(the RGB picture as load_image reads it, at 1/scale of `size` for a JPEG, the scale it got): libjpeg
        scales by 8, 4, 2 or 1 and gives ceil(side / scale) pixels, pixel k covering stored pixels k*scale ..
        (k+1)*scale - 1 (reduced_box maps coordinates)."""
        try:
            image = Image.open(io.BytesIO(self.data))  # checked in __init__
            got = 1
            if scale > 1 and self.is_jpeg:
                width, height = image.size
                drafted = image.draft("RGB", (max(1, width // scale), max(1, height // scale)))
                got = round(width / drafted[1][2]) if drafted is not None else 1
            return decoded_rgb(image), got
        except READ_ERRORS as error:
            raise corrupt(self.name, error) from error

    def reduced_box(self, box: tuple[float, float, float, float], scale: int) -> tuple[float, float, float, float]:
        """`box` (left, top, right, bottom in the pixels of `size`) in the coordinates of decode(scale)'s picture.
        Its stored picture covers ceil(side / scale) * scale pixels of each side, the last ones past the image's
        edge; where the shown picture runs against the stored one (a flip or a rotation), that padding comes first
        and shifts the box."""
        swap, flip_x, flip_y = ORIENTATIONS[self.orientation]
        stored_w, stored_h = self.stored_size
        pad_w, pad_h = -stored_w % scale, -stored_h % scale
        pad_x, pad_y = (pad_h, pad_w) if swap else (pad_w, pad_h)
        shift_x, shift_y = pad_x if flip_x else 0, pad_y if flip_y else 0
        left, top, right, bottom = box
        return (left + shift_x) / scale, (top + shift_y) / scale, (right + shift_x) / scale, (bottom + shift_y) / scale


def open_image(
    path: str | Path | BinaryIO, max_pixels: int | None = Image.MAX_IMAGE_PIXELS, name: object = None
) -> EncodedImage:
    """The file (or a file object holding one: a dataset's image column, a shard's sample) read and checked but not
    decoded (EncodedImage), or a DataError naming it (`name`, by default the path)."""
    name = path if name is None else name
    try:
        data = path.read() if hasattr(path, "read") else Path(path).read_bytes()
        return EncodedImage(data, max_pixels, name)
    except READ_ERRORS as error:
        raise corrupt(name, error) from error


def reason(error: BaseException) -> str:
    if isinstance(error, UnidentifiedImageError):  # Pillow's message quotes the file object
        return "not an image file Pillow can read"
    if isinstance(error, PermissionError):
        return "permission denied: make it readable (chmod a+r)"
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in HIGH_BIT_DEPTH:
        return Image.fromarray(scale_to_uint8(np.asarray(image), image.mode)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def scale_to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    """16-bit: / 257 (65535 -> 255). 32-bit integer in 0..65535 (how Pillow opens 16-bit PNGs and TIFFs): 8-bit data
    as it is, else / 257. Float in 0..1 or 0..255: as given. Anything else: its own range onto 0..255."""
    pixels = pixels.astype(np.float64)
    finite = pixels[np.isfinite(pixels)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and low >= 0 and 255 < high <= 65535):
        scaled = pixels / 257.0
    elif (mode == "I" and low >= 0 and high <= 255) or (mode == "F" and low >= 0 and 1 < high <= 255):
        scaled = pixels
    elif mode == "F" and low >= 0 and high <= 1:
        scaled = pixels * 255.0
    else:
        scaled = (pixels - low) / ((high - low) or 1.0) * 255.0
    return np.nan_to_num(np.clip(np.rint(scaled), 0, 255)).astype(np.uint8)


def unreadable(paths: Iterable[str | Path], full: bool, max_pixels: int | None) -> list[tuple[str, str]]:
    """(path, problem) of every file that cannot be read: its header (full=False: fast, finds non-images, empty
    and wrongly named files and oversized images) or its whole decode (full=True: also truncated data)."""

    def problem(path) -> str | None:
        try:
            read_rgb(path, max_pixels, decode=full)
        except READ_ERRORS as error:
            return reason(error)
        return None

    paths = [str(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(32, 4 * (os.cpu_count() or 1))) as pool:
        problems = list(pool.map(problem, paths, chunksize=256))
    return [(path, found) for path, found in zip(paths, problems, strict=True) if found is not None]
