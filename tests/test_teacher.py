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
    torch.testing.assert_close(teacher(data_images), expected, rtol=1e-4, atol=1e-5)
    assert teacher.members[0].renormalize


def test_a_teacher_with_the_datas_normalisation_gets_the_images_unchanged():
    network = timm.create_model("resnet10t", num_classes=3).eval()
    teacher = Teacher(network)
    images = torch.randn(2, 3, 32, 32)
    assert not teacher.members[0].renormalize
    with torch.no_grad():
        expected = network(images.contiguous(memory_format=torch.channels_last))  # the teacher's layout
        torch.testing.assert_close(teacher(images), expected, rtol=0, atol=0)


def test_the_teacher_stays_in_eval_mode():
    teacher = Teacher(timm.create_model("resnet10t", num_classes=3))
    teacher.train()
    assert not [name for name, module in teacher.named_modules() if module.training]
