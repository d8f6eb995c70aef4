"""Shared fixtures: tiny configs composed from the real conf/ and tiny generated data. No network."""

import os
import sys

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist (-n 2, the README's test command) a worker has a core: torch's threads, one per core by default,
# would have each worker wait on the other's (the quick loop took 60 % more CPU time, in the same wall time). Set
# before torch is imported, and inherited by the processes a test starts.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from deit_train.data.pixels import ErasableView, model_input
from deit_train.data.sources.demo import ensure_demo_dataset
from deit_train.train import CONFIG_DIR

from .tiny import TINY, TINY_DEMO, TINY_RUN, TINY_TEACHER, TINY_VIT  # noqa: F401  (the tests import them from here)


def save_safetensors(model, path: Path) -> dict:
    """Write `model`'s weights as .safetensors (which wants contiguous tensors); returns the saved state."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return state


@pytest.fixture
def random_teacher_checkpoint(tmp_path) -> Path:
    """A 10-class TINY_TEACHER (resnet10t) with random weights, as .safetensors."""
    import timm

    path = tmp_path / "teacher.safetensors"
    save_safetensors(timm.create_model(TINY_TEACHER, num_classes=10), path)
    return path


def hard_distill_from(teacher_checkpoint) -> list[str]:
    """Hard distillation from TINY_TEACHER's weights at teacher_checkpoint (random_teacher_checkpoint): random
    weights fit no class order, so the order check is switched off."""
    return [
        "loss=hard_distill",
        "teacher=timm",
        f"teacher.name={TINY_TEACHER}",
        f"teacher.checkpoint={teacher_checkpoint}",
        "teacher.unchecked_order=true",
    ]


@pytest.fixture(autouse=True)
def no_shared_wandb_service():
    """A W&B run made in this process leaves its service's address in os.environ (WANDB_SERVICE) after it finished,
    and every process a later test starts inherits it: a Slurm job then shared this process's service, where its
    requeued self met its first start's run ID as "in use". Each test's W&B service ends with the test."""
    yield
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()
    os.environ.pop("WANDB_SERVICE", None)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The tiny demo ImageFolder (train/ and val/) that TINY_DEMO selects."""
    return ensure_demo_dataset(tmp_path_factory.mktemp("cache"), image_size=16, train_per_class=8, val_per_class=4)


@pytest.fixture(scope="session")
def cache_dir(demo_data) -> Path:
    return demo_data.parent


def for_data(overrides: list[str]) -> list[str]:
    """The overrides without TINY_DEMO's keys where a later override chooses another data source: each source has
    its own keys (data/sources/), and the demo's are not another source's."""
    chosen = [arg.split("=", 1)[1] for arg in overrides if arg.startswith("data=")]
    if not chosen or chosen[-1] == "demo":
        return overrides
    return [arg for arg in overrides if arg not in TINY_DEMO]


def compose_config(overrides: list[str], output_dir: Path, cache_dir: Path) -> DictConfig:
    """The config `deit-train <overrides>` would run, composed from the installed conf/."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[*for_data(overrides), f"paths.output_dir={output_dir}", f"paths.cache_dir={cache_dir}"],
        )
    OmegaConf.resolve(cfg)
    return cfg


@pytest.fixture
def tiny_config(tmp_path, cache_dir):
    """tiny_config(*overrides, run="run"): the tiny demo config plus overrides, writing into tmp_path/run."""

    def make(
        *overrides: str, run: str = "run", student: list[str] = TINY_VIT, data: list[str] = TINY_DEMO
    ) -> DictConfig:
        return compose_config([*TINY_RUN, *data, *student, *overrides], tmp_path / run, cache_dir)

    return make


def same(a, b) -> bool:
    """torch.equal, and for training views (data/pixels.py: ErasableView) on both the pixels and the erasing draw."""
    if isinstance(a, tuple):
        return type(a) is type(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    return torch.equal(a, b)


def official():
    """scripts/bench/official.py, the official DeiT pipeline's loss and training transform as written there (the
    benchmark runs them too), loaded from its file: scripts/ is not a package."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench" / "official.py"
    spec = importlib.util.spec_from_file_location("official_deit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_device(view) -> torch.Tensor:
    """model_input on a batch of one, as the training module runs it after the copy (here the device is the CPU)."""
    if isinstance(view, ErasableView):
        return model_input(ErasableView(view.pixels[None], view.erase[None]))[0]
    return model_input(view[None])[0]


def finished(view) -> tuple[torch.Tensor, torch.Tensor]:
    """A view as the device finishes it (on_device) and the mask of the pixels outside its erased rectangle. Inside
    it both pipelines put standard normal noise, from other generators (on the device the view's own counter-based
    stream, data/noise.py; tests/test_pixels.py)."""
    image = on_device(view)
    top, left, h, w, _ = view.erase.tolist() if isinstance(view, ErasableView) else (0, 0, 0, 0, 0)
    outside = torch.ones(image.shape[-2:], dtype=torch.bool)
    outside[top : top + h, left : left + w] = False
    return image, outside


def assert_metrics_reproduce(run_dir: Path, data_root: Path, ema: bool = False) -> dict:
    """The run's metrics.json holds what its last checkpoint scores on data_root's val/ split, recomputed by
    deit-eval's code in one process, outside Lightning: the metrics belong to the weights the run saved, and its
    validation counted every image once. Returns the last epoch's metrics (accuracies in percent)."""
    from deit_train.models.trained_model import load_trained_model
    from deit_train.tools.evaluate import evaluate, open_eval_folder

    metrics = last_epoch(run_dir)
    trained = load_trained_model(run_dir / "checkpoints" / "last.ckpt", ema=ema)
    result = evaluate(trained, open_eval_folder(data_root, "val", trained), batch_size=7, num_workers=0)
    key = "val_ema/acc1_percent" if ema else "val/acc1_percent"
    assert metrics[key] == pytest.approx(result["heads"]["average"]["top1"], abs=1e-4), (key, metrics)
    return metrics


def last_epoch(run_dir: Path) -> dict[str, float]:
    """metrics.json's last epoch: accuracies in percent (`val/acc1_percent`), the epoch, losses."""
    import json

    return json.loads((run_dir / "metrics.json").read_text())["last_epoch"]
