"""uint8 views, the cheap per-pixel work on the device (data/pixels.py): the loader's uint8 pixels and erasing draws,
finished by model_input, give what timm's worker-side ToTensor, Normalize and RandomErasing gave, bit for bit."""

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

from deit_train.data.pixels import IMAGENET_MEAN, IMAGENET_STD, ErasableView, model_input
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
    with seeded(seed):
        # timm's steps, then its RandomErasing with torch's generator in the state the device's is in: seeded by the
        # draw's noise seed. Python's generator (every erasing draw) continues untouched.
        normalised = T.Compose(before)(image)
        torch.default_generator.manual_seed(int(view.erase[4]))
        expected = erasing(normalised.clone())
    assert torch.equal(got, expected)

    with seeded(seed):  # and timm's pipeline as it ran: the same pixels but for the rectangle's noise
        as_it_ran = reference(image)
    top, left, h, w, _ = view.erase.tolist()
    outside = torch.ones(size, size, dtype=torch.bool)
    outside[top : top + h, left : left + w] = False
    assert torch.equal(got[:, outside], as_it_ran[:, outside])
    if h:  # erased there: noise, not the image
        assert not torch.equal(as_it_ran[:, ~outside], normalised[:, ~outside])


@pytest.mark.parametrize("policy", ["3a", None])
def test_deit_iiis_simple_random_crop_erases_and_normalises_as_timm_on_the_worker_did(policy):
    """augment.crop=simple_random: its torchvision steps, then (as before) ToTensor, Normalize and timm's
    RandomErasing on the worker; against ours with the noise generator in the same state."""
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
            torch.default_generator.manual_seed(int(view.erase[4]))
            expected = erasing(normalised)
        assert view.erase[2] > 0 and torch.equal(on_device(view), expected), seed


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_the_finished_batch_is_deterministic_and_close_to_the_cpus():
    transform = train_transform(augment(reprob=1.0), 32)
    views = []
    for seed in range(16):
        with seeded(seed):
            views.append(transform(photo(seed, 48, 40)))
    batch = ErasableView(torch.stack([v.pixels for v in views]), torch.stack([v.erase for v in views]))
    first = model_input(ErasableView(batch.pixels.cuda(), batch.erase)).cpu()
    second = model_input(ErasableView(batch.pixels.cuda(), batch.erase)).cpu()
    assert torch.equal(first, second)
    cpu = model_input(batch)
    erased = torch.zeros_like(cpu, dtype=torch.bool)
    for i, (top, left, h, w, _) in enumerate(batch.erase.tolist()):
        erased[i, :, top : top + h, left : left + w] = True
    assert torch.equal(first[~erased], cpu[~erased])  # normalisation: IEEE division on both


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
