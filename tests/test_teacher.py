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
        torch.testing.assert_close(Teacher(network, img_sizes=[8])(colour.expand(1, 3, 16, 16)).logits,
                                   network(colour.expand(1, 3, 8, 8)), rtol=1e-4, atol=1e-5)  # fmt: skip
        resized = torch.nn.functional.interpolate(images, size=(8, 8), mode="bicubic", antialias=True)
        torch.testing.assert_close(logits, network(resized), rtol=1e-4, atol=1e-5)
    assert Teacher(network, img_sizes=[16])(images).logits.shape == (2, 3)  # already at its size: unchanged
