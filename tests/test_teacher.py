"""The Teacher module: frozen, its own normalisation, and out of the student's checkpoints."""

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from deit_train.teacher import Teacher


def test_a_teacher_with_its_own_mean_and_std_sees_its_own_normalisation():
    torch.manual_seed(0)
    network = timm.create_model("resnet10t", num_classes=3).eval()
    network.pretrained_cfg = {**network.pretrained_cfg, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    teacher = Teacher(network)
    pixels = torch.rand(2, 3, 32, 32)  # in [0, 1], as ToTensor gives them
    mean, std = (
        torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1),
        torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1),
    )
    data_images = (pixels - mean) / std  # what the data pipeline delivers
    with torch.no_grad():
        expected = network((pixels - 0.5) / 0.5)
    torch.testing.assert_close(teacher(data_images).logits, expected, rtol=1e-4, atol=1e-5)
    assert teacher.members[0].renormalize


def test_a_teacher_with_the_datas_normalisation_gets_the_images_unchanged():
    network = timm.create_model("resnet10t", num_classes=3).eval()
    teacher = Teacher(network)
    images = torch.randn(2, 3, 32, 32)
    assert not teacher.members[0].renormalize
    with torch.no_grad():
        expected = network(images.contiguous(memory_format=torch.channels_last))  # the teacher's layout
        torch.testing.assert_close(teacher(images).logits, expected, rtol=0, atol=0)


def test_the_teacher_stays_in_eval_mode():
    teacher = Teacher(timm.create_model("resnet10t", num_classes=3))
    teacher.train()
    assert not [name for name, module in teacher.named_modules() if module.training]


def test_teacher_img_size_shows_the_teacher_the_views_at_its_resolution():
    """teacher.img_size: the student's 16 px views reach an 8 px teacher resized (bicubic, antialiased), not
    cropped: the same view at the teacher's resolution."""
    torch.manual_seed(0)
    network = timm.create_model("resnet10t", num_classes=3).eval()
    seen = []
    network.register_forward_hook(lambda module, inputs, output: seen.append(tuple(inputs[0].shape)))
    images = torch.randn(2, 3, 16, 16)
    logits = Teacher(network, img_sizes=[8])(images).logits
    assert seen == [(2, 3, 8, 8)]
    # A uniform colour stays that colour at any size: the teacher's logits are the network's on the 8 px image.
    colour = torch.randn(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(
            Teacher(network, img_sizes=[8])(colour.expand(1, 3, 16, 16)).logits,
            network(colour.expand(1, 3, 8, 8)),
            rtol=1e-4,
            atol=1e-5,
        )
        resized = torch.nn.functional.interpolate(images, size=(8, 8), mode="bicubic", antialias=True)
        torch.testing.assert_close(logits, network(resized), rtol=1e-4, atol=1e-5)
    assert Teacher(network, img_sizes=[16])(images).logits.shape == (2, 3)  # already at its size: unchanged


def weight_casts(teacher: Teacher, images: torch.Tensor) -> int:
    """How many of the teacher's weights are cast to another dtype in one bf16 autocast forward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    weights = {p.data_ptr() for p in teacher.parameters()}

    class CountCasts(TorchDispatchMode):
        casts = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            first = args[0] if args else None
            if func in (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype) and isinstance(first, torch.Tensor):
                CountCasts.casts += first.data_ptr() in weights and out.dtype != first.dtype  # a real copy
            return out

    with torch.autocast("cpu", dtype=torch.bfloat16), CountCasts():
        teacher(images)
    return CountCasts.casts


def test_the_teacher_is_held_in_the_training_precision_once_not_cast_every_step():
    """Under bf16-mixed autocast re-casts a frozen teacher's fp32 weights at every call (it caches only weights that
    need gradients); held in bf16 once (Teacher.hold_in) the step casts none, and the logits stay the autocast ones."""
    torch.manual_seed(0)
    teacher = Teacher(timm.create_model("resnet10t", num_classes=5).eval())
    images = torch.randn(4, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_logits = teacher(images).logits
    assert weight_casts(teacher, images) > 10  # every conv and the classifier, every step
    teacher.hold_in("bf16-mixed")
    assert weight_casts(teacher, images) == 0
    convs = [m.weight.dtype for m in teacher.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m.running_var.dtype for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert set(convs) == {torch.bfloat16} and set(norms) == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        held = teacher(images).logits
    assert held.dtype == torch.float32
    torch.testing.assert_close(held, autocast_logits, rtol=0, atol=0)  # autocast computed in bf16 already
    teacher.hold_in("32-true")  # nothing to do in fp32
    assert {m.weight.dtype for m in teacher.modules() if isinstance(m, torch.nn.Conv2d)} == {torch.bfloat16}
