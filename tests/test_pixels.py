"""uint8 views, the cheap per-pixel work on the device (data/pixels.py): the loader's uint8 pixels and erasing draws,
finished by model_input, give what timm's worker-side ToTensor, Normalize and RandomErasing gave, bit for bit outside
the erased rectangle, which is timm's; inside it, standard normal noise from the view's own counter-based stream
(data/noise.py), checked against a plain-Python reference and for its distribution, in a fixed number of ops."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import timm.data
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from PIL import Image
from timm.data.random_erasing import RandomErasing
from torchvision import transforms as T

from deit_train.data.pixels import IMAGENET_MEAN, IMAGENET_STD, DrawErasing, ErasableView, model_input
from deit_train.data.transforms import eval_transform, resize_crop_transform, train_transform
from deit_train.data.views import seeded, view_key
from deit_train.schema import AugmentConfig

from .conftest import official, on_device


def augment(**changes):
    return OmegaConf.merge(OmegaConf.structured(AugmentConfig), changes)


def photo(seed: int, width: int, height: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def timm_worker_transform(config, img_size: int):
    """The worker-side pipeline we had, and the official code has (scripts/bench/official.py): timm's
    create_transform with ToTensor, Normalize and RandomErasing(mode pixel, count 1) at its end."""
    return official().official_train_transform(img_size, config)


def test_the_mean_and_std_are_timms():
    assert IMAGENET_MEAN == timm.data.IMAGENET_DEFAULT_MEAN and IMAGENET_STD == timm.data.IMAGENET_DEFAULT_STD


# ---- the noise's reference: data/noise.py's specification in plain Python integers and math's double functions ----

MASK = 2**32 - 1
GOLDEN = 0x9E3779B9


def reference_mix(x: int) -> int:
    """hash-prospector's 32-bit hash [16 21f0aaad 15 735a2d97 15], on Python integers."""
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & MASK
    x ^= x >> 15
    x = (x * 0x735A2D97) & MASK
    return x ^ (x >> 15)


def reference_noise(seed: int, count: int) -> torch.Tensor:
    """The first `count` numbers of the stream of `seed`: Box-Muller on 24-bit uniforms from words 2n and 2n + 1,
    numbers 2n and 2n + 1 being r cos and r sin, with math's functions."""
    k0, k1 = seed & MASK, seed >> 32

    def word(n: int) -> int:
        return reference_mix(reference_mix((k0 + n * GOLDEN) & MASK) ^ k1) >> 8

    values = []
    for n in range((count + 1) // 2):
        u1, u2 = (word(2 * n) + 1) / 2**24, word(2 * n + 1) / 2**24
        radius = math.sqrt(-2 * math.log(u1))
        values += [radius * math.cos(2 * math.pi * u2), radius * math.sin(2 * math.pi * u2)]
    return torch.tensor(values[:count], dtype=torch.float64)


def rectangle(erase: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    top, left, h, w, _ = erase.tolist()
    inside = torch.zeros(size, dtype=torch.bool)
    inside[top : top + h, left : left + w] = True
    return inside


def assert_erased_as_timm(got: torch.Tensor, timm_erased: torch.Tensor, unerased: torch.Tensor, erase) -> None:
    """`got` is timm's output outside the rectangle bit for bit, the rectangle is the one timm erased (where its
    output left the image), and inside it is the view's noise stream in timm's (C, h, w) order."""
    inside = rectangle(erase, got.shape[-2:])
    assert torch.equal((timm_erased != unerased).any(0), inside)
    assert torch.equal(got[:, ~inside], timm_erased[:, ~inside])
    expected = reference_noise(int(erase[4]), int(inside.sum()) * got.shape[0])
    # ours: float64 polynomials for ln and cos, rounded to float32 (data/noise.py); the reference: math's, exactly
    # rounded to float32 here: at most the last bit apart
    torch.testing.assert_close(got[:, inside].flatten().double(), expected.float().double(), rtol=2**-23, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    reprob=st.sampled_from([0.25, 1.0]),
    size=st.sampled_from([16, 24]),
    shape=st.tuples(st.integers(16, 48), st.integers(16, 48)),
)
def test_device_side_erasing_and_normalisation_equal_timms_worker_side(seed, reprob, size, shape):
    config = augment(reprob=reprob)
    image = photo(seed, *shape)
    with seeded(seed):  # the view's seed, as SeededViews draws it
        view = train_transform(config, size)(image)
    assert view.pixels.dtype == torch.uint8 and view.pixels.shape == (3, size, size)
    got = on_device(view)

    reference = timm_worker_transform(config, size)
    *before, erasing = reference.transforms
    assert isinstance(erasing, RandomErasing)
    with seeded(seed):  # timm's pipeline as it ran, and its steps before the erasing
        as_it_ran = reference(image)
    with seeded(seed):
        normalised = T.Compose(before)(image)
    assert_erased_as_timm(got, as_it_ran, normalised, view.erase)


@pytest.mark.parametrize("policy", ["3a", None])
def test_deit_iiis_simple_random_crop_erases_and_normalises_as_timm_on_the_worker_did(policy):
    """augment.crop=simple_random: its torchvision steps, then (as before) ToTensor, Normalize and timm's
    RandomErasing on the worker: the same pixels, the same rectangle, the view's noise in it."""
    config = augment(crop="simple_random", auto_augment=policy, reprob=1.0)
    transform = train_transform(config, 16)
    steps = T.Compose(transform.transforms[:2])  # the crop, then the policy and jitter: before the uint8 steps
    erasing = RandomErasing(1.0, mode="pixel", device="cpu")
    for seed in range(20):
        image = photo(seed, 30, 21)
        with seeded(seed):
            view = transform(image)
        with seeded(seed):
            normalised = T.Compose([steps, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(image)
            erased = erasing(normalised.clone())
        assert view.erase[2] > 0
        assert_erased_as_timm(on_device(view), erased, normalised, view.erase)


def test_the_views_erased_are_those_timm_erases_at_deits_rate():
    """At DeiT's reprob 0.25 a view carries a rectangle exactly when timm's RandomErasing erased it, and otherwise
    is timm's output exactly."""
    config, image = augment(), photo(0, 40, 30)
    transform, reference = train_transform(config, 16), timm_worker_transform(config, 16)
    before = T.Compose(reference.transforms[:-1])
    erased = 0
    for seed in range(200):
        with seeded(seed):
            view = transform(image)
        with seeded(seed):
            as_it_ran = reference(image)
        with seeded(seed):
            timm_erased = not torch.equal(as_it_ran, before(image))
        assert bool(view.erase[2]) == timm_erased, seed
        if not timm_erased:
            assert torch.equal(on_device(view), as_it_ran)
        erased += timm_erased
    assert 30 < erased < 70  # about 50


def test_validation_pixels_normalised_on_the_device_equal_deit_evals_cpu_transform():
    config = augment()
    for seed, shape in enumerate([(37, 23), (16, 16), (50, 41)]):
        image = photo(seed, *shape)
        pixels = eval_transform(config, 16)(image)
        assert pixels.dtype == torch.uint8
        deit_eval = resize_crop_transform(18, 16)(image)  # floor(16 / 0.875)
        assert torch.equal(on_device(pixels), deit_eval)


def test_the_view_key_covers_the_erasing_draw():
    pixels = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    draw = torch.tensor([1, 2, 3, 4, 12345])
    key = view_key(7, 0, ErasableView(pixels, draw))
    for field in range(5):
        other = draw.clone()
        other[field] += 1
        assert not torch.equal(view_key(7, 0, ErasableView(pixels, other)), key), field
    assert not torch.equal(view_key(7, 0, pixels), key)
    edited = pixels.clone()
    edited[0, 0, 0] ^= 1
    assert not torch.equal(view_key(7, 0, ErasableView(edited, draw)), key)


def test_the_noise_is_a_function_of_the_view_not_of_the_batch():
    """The same view erased alone or among others, at any position in the batch: the same noise."""
    transform = train_transform(augment(reprob=1.0), 16)
    views = []
    for seed in range(4):
        with seeded(seed):
            views.append(transform(photo(seed, 30, 20)))
    batch = ErasableView(torch.stack([v.pixels for v in views]), torch.stack([v.erase for v in views]))
    together = model_input(batch)
    reversed_batch = ErasableView(batch.pixels.flip(0), batch.erase.flip(0))
    assert torch.equal(model_input(reversed_batch).flip(0), together)
    for i, view in enumerate(views):
        assert torch.equal(on_device(view), together[i])


def erased_batch(count: int, size: int = 32, seed: int = 0) -> ErasableView:
    """`count` views of zero pixels, each erased (reprob 1), with the draws timm's calls make under `seed`."""
    with seeded(seed):
        draws = [DrawErasing(1.0).draw(size, size) for _ in range(count)]
    return ErasableView(torch.zeros(count, 3, size, size, dtype=torch.uint8), torch.tensor(draws))


def test_the_noise_is_standard_normal_per_pixel_and_independent():
    """The erased pixels of 256 views, against N(0, 1), timm's distribution (RandomErasing: normal_() per pixel and
    channel in normalised space), with closed-form tolerances (the values are fixed by the seeds: no flakiness):
    Kolmogorov-Smirnov at the 0.1% level, mean and standard deviation within 5 standard errors, the tails beyond 3
    sigma, and no correlation between neighbouring pixels, channels, or two views whose seeds differ by one bit."""
    batch = erased_batch(256, size=48)
    noise = model_input(batch)
    values = torch.cat([noise[i][:, rectangle(draw, (48, 48))].flatten() for i, draw in enumerate(batch.erase)])
    n = values.numel()
    assert n > 100_000
    z = values.double().sort().values
    cdf = torch.special.ndtr(z)
    steps = torch.arange(n + 1, dtype=torch.float64) / n
    ks = torch.maximum(steps[1:] - cdf, cdf - steps[:-1]).max()
    assert ks < math.sqrt(-math.log(0.001 / 2) / 2) / math.sqrt(n), float(ks)
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.std()) - 1) < 5 / math.sqrt(2 * n)
    beyond = 2 * float(torch.special.ndtr(torch.tensor(-3.0, dtype=torch.float64)))  # 0.0027
    assert abs(float((z.abs() > 3).double().mean()) - beyond) < 5 * math.sqrt(beyond * (1 - beyond) / n)

    def assert_uncorrelated(a: torch.Tensor, b: torch.Tensor) -> None:
        r = float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]).double())[0, 1])
        assert abs(r) < 5 / math.sqrt(a.numel()), r

    top, left, h, w, _ = batch.erase[0].tolist()
    block = noise[0, :, top : top + h, left : left + w]
    assert_uncorrelated(block[:, :, :-1], block[:, :, 1:])  # neighbours in a row
    assert_uncorrelated(block[0], block[1])  # channels
    one_bit = ErasableView(batch.pixels[:2], batch.erase[:2].clone())
    one_bit.erase[1] = one_bit.erase[0]
    one_bit.erase[1, 4] ^= 1
    pair = model_input(one_bit)[:, :, top : top + h, left : left + w]
    assert_uncorrelated(pair[0], pair[1])


def count_ops(function) -> int:
    """The aten ops `function` dispatches (each a kernel on the device it runs on)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, op, types, args=(), kwargs=None):
            Count.ops += 1
            return op(*args, **(kwargs or {}))

    with Count():
        function()
    return Count.ops


def test_the_finish_makes_a_fixed_number_of_ops_however_many_images_are_erased():
    """Normalisation and erasing of a batch: the same ops for 1, 8 and 64 erased images (one batch-wide pass, not a
    pair of kernels per erased image), under 180 of them (views and the host's small table included)."""
    model_input(erased_batch(1))  # the first call copies its constants to the device once
    counts = {}
    for erased in (1, 8, 64):
        batch = erased_batch(64)
        batch.erase[erased:] = 0  # the others not erased
        counts[erased] = count_ops(lambda batch=batch: model_input(batch))
    assert counts[1] == counts[8] == counts[64], counts
    assert counts[1] < 180, counts


@pytest.mark.slow  # a process per instruction set: the whole suite runs it, the quick loop does not
def test_the_noise_is_the_same_whatever_the_cpus_vector_instructions():
    """torch's normal_ fills differently with and without AVX2 (ATEN_CPU_CAPABILITY); the counter-based stream is
    integer arithmetic and IEEE-754's basic operations, each rounded the same on every device."""
    script = (
        "import hashlib, torch\n"
        "from tests.test_pixels import erased_batch\n"
        "from deit_train.data.pixels import model_input\n"
        "digest = hashlib.sha256(model_input(erased_batch(8)).numpy()).hexdigest()\n"
        "print(torch.backends.cpu.get_cpu_capability(), digest)\n"
    )
    digests = {}
    for capability in ("default", torch.backends.cpu.get_cpu_capability().lower()):
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        name, digest = done.stdout.split()
        digests[name] = digest
    assert len(digests) == 2 or torch.backends.cpu.get_cpu_capability() == "DEFAULT", digests
    assert len(set(digests.values())) == 1, digests


@pytest.mark.slow
def test_the_same_seed_trains_the_same_weights_with_0_1_and_2_workers_with_erasing_on_the_device(tiny_config):
    """Every view erased (reprob 1), Mixup/CutMix after it: the noise follows the view, not the worker that made it."""
    from deit_train.train import train

    weights = {}
    for workers in (0, 1, 2):
        cfg = tiny_config(
            f"data.num_workers={workers}",
            "augment.reprob=1.0",
            "augment.mixup=0.8",
            "augment.cutmix=1.0",
            "trainer.max_epochs=2",
            run=f"w{workers}",
        )
        result = train(cfg)
        weights[workers] = {k: v.clone() for k, v in result.module.student.state_dict().items()}
    for workers in (1, 2):
        assert all(torch.equal(weights[0][k], weights[workers][k]) for k in weights[0]), workers


@pytest.mark.parametrize(
    "precision,dtype", [("bf16-true", torch.bfloat16), ("64-true", torch.float64), ("bf16-mixed", torch.float32)]
)
def test_the_finished_images_take_the_dtype_lightning_gives_a_float_batch(precision, dtype):
    """Lightning converts a float batch to a true-precision dtype before the copy and leaves a uint8 one: the module
    converts the images it makes, as the worker-made floats were."""
    from types import SimpleNamespace

    import lightning as L

    from deit_train.data.views import ViewsOnDevice

    class Module(ViewsOnDevice, L.LightningModule):
        pass

    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, logger=False)
    module = Module()
    module._trainer = SimpleNamespace(precision_plugin=trainer.precision_plugin, training=True)
    with seeded(0):
        view = train_transform(augment(reprob=1.0), 16)(photo(0, 30, 20))
    batch = (ErasableView(view.pixels[None], view.erase[None]), torch.tensor([1]), torch.tensor([[0, 0, 1]]))
    images, labels, keys = module.on_after_batch_transfer(batch, 0)
    assert images.dtype == dtype
    assert torch.equal(images, model_input(batch[0]).to(dtype))


def test_the_mean_and_std_made_under_inference_mode_serve_autograd():
    """mean_std keeps the first tensors it makes; the first caller may run under inference_mode (the label-order
    check), a later one in autograd (a loss on normalised pictures)."""
    from deit_train.data.pixels import full_scale, mean_std

    mean_std.cache_clear(), full_scale.cache_clear()
    with torch.inference_mode():
        normalize = model_input(torch.zeros(1, 3, 2, 2, dtype=torch.uint8))
    assert not normalize.requires_grad
    mean, std = mean_std(torch.device("cpu"))
    x = torch.ones(1, 3, 2, 2, requires_grad=True)
    (x * std + mean).sum().backward()
    assert torch.equal(x.grad, std.expand_as(x))
