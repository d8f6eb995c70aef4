"""Property-based tests (hypothesis) with inputs we did not write: drawn command lines, drawn image files in a data
folder, drawn checkpoint files. The property: either it runs and does what was asked, or it fails in one line (exit
status 2 for the command line) and leaves nothing behind. CI runs a fixed list of draws (the "ci" profile,
derandomized); HYPOTHESIS_PROFILE=dev draws ten times as many, afresh each time."""

import io
import json
import os
import pickle
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from deit_train.cli import refuse_bad_command_line
from deit_train.data.images import load_image
from deit_train.errors import DeitTrainError
from deit_train.models.checkpoints import load_weights, read_run_checkpoint
from deit_train.train import train

from .conftest import TINY, compose_config

# CI: a fixed list of draws, not shrunk (a failure prints its draw; shrinking a training run takes minutes)
settings.register_profile(
    "ci",
    max_examples=25,
    derandomize=True,
    deadline=None,
    phases=list(Phase)[:4],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
SCALE = {"ci": 1, "dev": 10}[os.environ.get("HYPOTHESIS_PROFILE", "ci")]

# ------------------------------------------------------------------------------------------------ command lines

NUMBERS = st.one_of(
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0, 1, -1, 0.5, 1.0, 2, 3, 7, 16, 1e-12, 1e12]),
)
WORDS = st.one_of(
    st.sampled_from(
        [
            "null",
            "true",
            "false",
            "abc",
            "[]",
            "[1,2]",
            "''",
            "auto",
            "none",
            "hard",
            "soft",
            "bce",
            "random_resized",
            "center",
            "bicubic",
            "3a",
            "max",
            "min",
        ]
    ),
    st.text("abcxyz_-.", min_size=1, max_size=6),
)
VALUES = st.one_of(NUMBERS, WORDS).map(lambda v: repr(v) if isinstance(v, float) else str(v))
KEYS = st.sampled_from(
    [
        "model.img_size",
        "model.patch_size",
        "model.depth",
        "model.num_heads",
        "model.embed_dim",
        "model.drop_path_rate",
        "loss.distillation_type",
        "loss.alpha",
        "loss.tau",
        "loss.kl_reduction",
        "loss.label_loss",
        "loss.bce_target_threshold",
        "data.batch_size",
        "data.num_workers",
        "data.scan",
        "data.max_image_pixels",
        "augment.crop",
        "augment.scale",
        "augment.reprob",
        "augment.mixup",
        "augment.cutmix",
        "augment.smoothing",
        "augment.repeated_aug",
        "augment.eval_crop_pct",
        "augment.train_interpolation",
        "optim.lr",
        "optim.weight_decay",
        "optim.warmup_epochs",
        "optim.lr_batch_ref",
        "ema.decay",
        "seed",
        "teacher.cache_topk",
        "teacher.img_size",
        "trainer.max_epochs",
        "trainer.devices",
        "trainer.accumulate_grad_batches",
        "trainer.precision",
        "trainer.gradient_clip_val",
        "trainer.log_every_n_steps",
        "task.optimized_mode",
        "resume",
        "compile",
    ]
)
OVERRIDES = st.lists(st.tuples(KEYS, VALUES), min_size=1, max_size=4, unique_by=lambda kv: kv[0]).map(
    lambda pairs: [f"{key}={value}" for key, value in pairs]
)


@settings(max_examples=60 * SCALE)
@given(overrides=OVERRIDES)
def test_a_drawn_command_line_is_accepted_or_refused_in_one_line(overrides, capsys):
    try:
        refuse_bad_command_line(["experiment=demo", *overrides])
    except SystemExit as refused:
        error = capsys.readouterr().err
        assert refused.code == 2, (overrides, error)
        lines = error.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("deit-train: error: "), (overrides, error)
        assert "Traceback" not in error


VALID_OVERRIDE_SETS = st.lists(
    st.sampled_from(
        [
            "augment.mixup=0.8",
            "augment.cutmix=1.0",
            "augment.reprob=0.5",
            "augment.smoothing=0.2",
            "ema.decay=0.5",
            "model.drop_path_rate=0.3",
            "augment=three_augment",
            "augment=none",
            "loss=bce augment.smoothing=0.0",
            "optim=sgd",
            "optim=lamb",
            "trainer.accumulate_grad_batches=2",
            "augment.repeated_aug=2",
            "augment.repeated_aug_single_process=true",
            "trainer.precision=bf16-mixed",
            "trainer.gradient_clip_val=0.5",
            "seed=4294967295",
            "augment.crop=simple_random",
            "optim.warmup_epochs=0",
        ]
    ),
    min_size=1,
    max_size=4,
    unique=True,
)


def test_a_drawn_valid_config_trains_what_it_asks(tmp_path_factory, cache_dir):
    """An accepted combination trains, and the config it saved in its checkpoint is the one asked for; a refused one
    is refused in one line and leaves nothing behind. Most of these combinations are valid: a test that passed on
    refusals alone would check nothing, so it counts what it drew, trained and refused, and at least half of the
    draws must train."""
    counts, refusals = Counter(), []

    @settings(max_examples=6 * SCALE)
    @given(overrides=VALID_OVERRIDE_SETS)
    def trains_what_it_asks(overrides):
        counts["drawn"] += 1
        overrides = [part for override in overrides for part in override.split()]
        run_dir = tmp_path_factory.mktemp("drawn") / "run"
        cfg = compose_config([*TINY, *overrides], run_dir, cache_dir)
        try:
            run = train(cfg)
        except DeitTrainError as refused:  # a combination the rules refuse: one line, nothing left behind
            counts["refused"] += 1
            refusals.append(f"{' '.join(overrides)} -> {str(refused)[:100]}")
            event(f"refused: {str(refused).split(':')[0]}")
            assert "\n" not in str(refused) and not run_dir.exists(), (overrides, str(refused))
            return
        counts["trained"] += 1
        event("trained")
        assert run.trainer.global_step > 0 and "val/acc1" in run.metrics
        checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
        stored = checkpoint["hyper_parameters"]["config"]
        asked = dict(override.split("=", 1) for override in overrides)  # the last of a key wins, as in Hydra
        for key, value in asked.items():
            if "." in key:
                group, name = key.split(".", 1)
                saved = stored[group][name]
                assert str(saved).lower() == value.lower() or float(saved) == float(value), (key, saved, value)

    trains_what_it_asks()
    summary = f"drawn {counts['drawn']}, trained {counts['trained']}, refused {counts['refused']}"
    print(summary, *refusals, sep="\n  ")
    assert counts["drawn"] == counts["trained"] + counts["refused"] > 0, counts
    assert counts["trained"] >= counts["drawn"] / 2, f"too few drawn combinations trained: {summary}"


# ----------------------------------------------------------------------------------------------- image files

MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "P+transparency"]
FORMATS = {
    "png": ("1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I", "P+transparency"),
    "jpg": ("L", "RGB", "CMYK"),
    "tiff": ("1", "L", "RGB", "RGBA", "CMYK", "I;16", "I", "F"),
    "bmp": ("1", "L", "P", "RGB"),
    "webp": ("RGB", "RGBA"),
    "gif": ("L", "P", "P+transparency"),
}


def drawn_image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(0, 65536, (height, width)).astype(np.int32))
    if mode == "F":
        return Image.fromarray(rng.random((height, width), dtype=np.float32))
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode == "P+transparency":
        image = image.convert("P")
        image.info["transparency"] = 0
        return image
    return image.convert(mode)


@st.composite
def image_files(draw) -> tuple[str, bytes]:
    """(file name, content) of a readable image of any mode, format and size."""
    extension = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(FORMATS[extension]))
    width, height = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    buffer = io.BytesIO()
    drawn_image(mode, width, height, draw(st.integers(0, 2**16))).save(
        buffer,
        format={"jpg": "JPEG"}.get(extension, extension.upper()),
        **({"transparency": 0} if mode == "P+transparency" and extension in ("png", "gif") else {}),
    )
    stem = draw(st.sampled_from(["img", "img", "x y", "UPPER", "ünï", "._img", ".hidden"]))  # a dot: a hidden file
    return f"{stem}{{}}.{extension}", buffer.getvalue()  # {} takes the file's number


@st.composite
def damaged(draw, content: bytes) -> bytes:
    kind = draw(st.sampled_from(["truncate", "empty", "random", "text"]))
    if kind == "truncate":
        return content[: draw(st.integers(0, max(0, len(content) // 3)))]
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=200))
    return b"" if kind == "empty" else b"not an image at all\n"


@settings(max_examples=8 * SCALE)
@given(data=st.data(), junk_folder=st.sampled_from([None, ".ipynb_checkpoints", "__MACOSX", ".git"]))
def test_a_drawn_data_folder_trains_on_its_visible_images_or_is_refused_in_one_line(
    data, junk_folder, tmp_path_factory, cache_dir
):
    files = data.draw(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), image_files()), min_size=4, max_size=12))
    broken = data.draw(st.sets(st.integers(0, len(files) - 1), max_size=2) | st.just(set()))
    root = tmp_path_factory.mktemp("data")
    for split in ("train", "val"):
        for index, (label, (name, content)) in enumerate(files):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name.format(index)).write_bytes(data.draw(damaged(content)) if index in broken else content)
        if junk_folder:
            (root / split / junk_folder).mkdir(exist_ok=True)
            (root / split / junk_folder / "copy.png").write_bytes(files[0][1][1])
    run_dir = root.with_name(f"{root.name}-run")  # each example its own run
    cfg = compose_config(
        [*TINY, "data=imagefolder", f"data.root={root}", "data.batch_size=2", "data.scan=full"], run_dir, cache_dir
    )
    visible = [(label, index) for index, (label, (name, _)) in enumerate(files) if not name.startswith(".")]
    unreadable = [index for _, index in visible if index in broken]
    folders, classes = sorted({label for label, _ in files}), sorted({label for label, _ in visible})
    try:
        run = train(cfg)
    except DeitTrainError as refused:
        message = str(refused)
        event(
            "refused: "
            + next(
                why
                for phrase, why in [
                    ("cannot be read", "unreadable files"),
                    ("hold no images", "a class folder of hidden files only"),
                    ("needs at least 2", "one class"),
                ]
                if phrase in message
            )
        )
        assert "\n" not in message and not run_dir.exists(), message
        if len(folders) < 2:
            assert "classification needs at least 2" in message, message
        elif classes != folders:  # a class folder with hidden files only: said why they do not count
            assert "hold no images" in message and "hidden files and broken links are not read" in message, message
        else:
            assert unreadable and f"{2 * len(unreadable)} of {2 * len(visible)} images cannot be read" in message
        return
    event("trained")
    assert not unreadable and len(classes) >= 2 and classes == folders  # nothing unreadable trains silently
    assert run.datamodule.class_names == classes  # no hidden folder became a class
    trained_on = [Path(path).name for path, _ in run.datamodule.train_set.samples]
    assert sorted(trained_on) == sorted(files[index][1][0].format(index) for _, index in visible)


@settings(max_examples=30 * SCALE)
@given(pixels=st.lists(st.integers(0, 65535), min_size=1, max_size=64), width=st.integers(1, 8))
def test_a_16_bit_image_is_scaled_not_clipped(pixels, width, tmp_path_factory):
    height = max(1, len(pixels) // width)
    values = np.array((pixels * (width * height))[: width * height], dtype=np.uint16).reshape(height, width)
    path = tmp_path_factory.mktemp("png") / "deep.png"
    Image.fromarray(values).save(path)
    rgb = np.asarray(load_image(path))
    expected = np.rint(values / 257.0).astype(np.uint8)
    assert np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 2], expected)


# ---------------------------------------------------------------------------------------------- checkpoints

MARKER = Path("/tmp/deit-train-pickled-code-ran")


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


@st.composite
def checkpoint_files(draw, real: bytes) -> bytes:
    kind = draw(
        st.sampled_from(
            [
                "truncated",
                "random",
                "text",
                "json",
                "pickle_code",
                "torch_code",
                "state_dict",
                "nested",
                "scalar",
                "empty",
                "zip",
                "bitflip",
            ]
        )
    )
    if kind == "truncated":
        return real[: draw(st.integers(0, len(real) - 1))]
    if kind == "bitflip":
        data = bytearray(real)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=400))
    if kind == "text":
        return draw(st.text(min_size=1, max_size=100)).encode()
    if kind == "json":
        return json.dumps({"model": {"weight": [1, 2, 3]}}).encode()
    if kind == "empty":
        return b""
    if kind == "zip":
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("readme.txt", "hello")
        return buffer.getvalue()
    buffer = io.BytesIO()
    if kind == "pickle_code":
        pickle.dump({"model": RunsCode()}, buffer, protocol=draw(st.integers(2, 5)))
    elif kind == "torch_code":
        torch.save({"model": {"w": torch.zeros(2)}, "args": RunsCode()}, buffer)
    elif kind == "state_dict":
        names = draw(st.lists(st.text("abcdefgh.", min_size=1, max_size=12), min_size=1, max_size=4, unique=True))
        torch.save({name: torch.zeros(draw(st.integers(0, 3))) for name in names}, buffer)
    elif kind == "nested":
        torch.save({"state_dict": {"model": [torch.ones(1)]}, "epoch": 3}, buffer)
    else:
        torch.save(draw(st.sampled_from([3, "text", [1, 2], None])), buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory, cache_dir) -> bytes:
    run_dir = tmp_path_factory.mktemp("real") / "run"
    train(compose_config(TINY, run_dir, cache_dir))
    return (run_dir / "checkpoints" / "last.ckpt").read_bytes()


@settings(max_examples=60 * SCALE)
@given(data=st.data())
def test_a_drawn_checkpoint_file_is_read_or_refused_in_one_line_and_never_runs_code(
    data, real_checkpoint, tmp_path_factory
):
    MARKER.unlink(missing_ok=True)
    path = tmp_path_factory.mktemp("ckpt") / "drawn.ckpt"
    path.write_bytes(data.draw(checkpoint_files(real_checkpoint)))
    for read in (
        lambda: load_weights(path, "model.init"),
        lambda: load_weights(path, "teacher.checkpoint"),
        lambda: read_run_checkpoint(path, "ckpt_path"),
    ):
        try:
            read()
        except DeitTrainError as refused:
            assert "\n" not in str(refused) and str(path) in str(refused), str(refused)
            assert "weights_only=False" not in str(refused)
    assert not MARKER.exists(), "pickled code ran"


def listed_by_os_walk(folder: Path) -> list[tuple[Path, str]]:
    """The reference for data/images.py's find_images: os.walk following links, each real folder and file once,
    hidden names and other extensions left out (find_images was written this way before it was made lazy)."""
    from deit_train.data.images import IMAGE_EXTENSIONS, is_hidden

    found, seen_folders, seen_files = [], set(), set()
    for directory, subdirectories, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(directory)
        if real in seen_folders:
            subdirectories[:] = []
            continue
        seen_folders.add(real)
        subdirectories[:] = sorted(d for d in subdirectories if not is_hidden(d))
        for name in names:
            path = Path(directory, name)
            if is_hidden(name) or path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
                continue
            real_file = os.path.realpath(path) if path.is_symlink() else os.path.join(real, name)
            if real_file not in seen_files:
                seen_files.add(real_file)
                found.append((path, real_file))
    return sorted(found)


ENTRY_NAMES = st.sampled_from(["a", "b", ".hidden", "__MACOSX", "x.png", "y.JPG", ".z.png", "w.txt", "v.webp"])


@settings(max_examples=60 * SCALE)
@given(
    entries=st.lists(
        st.tuples(
            st.lists(ENTRY_NAMES, min_size=1, max_size=3),  # a path below the folder
            st.sampled_from(["folder", "file", "link to a folder above", "link to a file", "broken link"]),
        ),
        max_size=12,
    )
)
def test_find_images_lists_what_os_walk_lists_and_has_images_agrees(entries):
    """find_images (a lazy walk, which has_images stops at its first image) against the os.walk reference on drawn
    trees of folders, hidden and other files, links up (loops), links to files and broken links."""
    import tempfile

    from deit_train.data.images import find_images, has_images

    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary) / "root"
        root.mkdir()
        for parts, kind in entries:
            path = root.joinpath(*parts)
            if path.exists() or path.is_symlink() or any(p.is_symlink() or p.is_file() for p in path.parents):
                continue  # taken, or inside a link or a file
            path.parent.mkdir(parents=True, exist_ok=True)
            if kind == "folder":
                path.mkdir()
            elif kind == "file":
                path.write_bytes(b"\x89PNG")
            elif kind == "link to a folder above":
                path.symlink_to(path.parent.parent if path.parent != root else root)
            elif kind == "link to a file":
                (root / "target.png").write_bytes(b"\x89PNG")
                path.symlink_to(root / "target.png")
            else:
                path.symlink_to(root / "missing.png")
        for folder in [root, *(p for p in root.rglob("*") if p.is_dir() and not p.is_symlink())]:
            listed = find_images(folder)
            assert listed == listed_by_os_walk(folder), folder
            assert has_images(folder) == bool(listed), folder
