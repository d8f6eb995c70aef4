"""teacher=ensemble: the average of the members' probabilities, against hand computations; a training run with two
teachers, their per-member accuracies recomputed outside Lightning; the teacher cache keyed on every member."""

import math

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

from deit_train.data.pixels import model_input
from deit_train.losses import DistillationLoss
from deit_train.teacher import Teacher
from deit_train.train import train

from .conftest import save_safetensors

# Two teachers that disagree: A prefers class 0, B class 1; the third sample they see alike.
LOGITS_A = torch.tensor([[3.0, -5.0, 2.8], [2.0, 1.0, 0.0], [0.5, 0.2, 4.0]])
LOGITS_B = torch.tensor([[-5.0, 3.0, 2.8], [0.0, 4.0, 1.0], [0.1, 0.3, 3.0]])


class FixedLogits(nn.Module):
    """A stand-in network whose output is given: the combination, not the network, is under test here."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits[: images.shape[0]]


def softmax(row: list[float], tau: float) -> list[float]:
    exps = [math.exp(v / tau) for v in row]
    return [e / sum(exps) for e in exps]


def hand_average(tau: float) -> list[list[float]]:
    """p = (softmax(Z_A / tau) + softmax(Z_B / tau)) / 2, sample by sample."""
    return [
        [(pa + pb) / 2 for pa, pb in zip(softmax(a, tau), softmax(b, tau), strict=True)]
        for a, b in zip(LOGITS_A.tolist(), LOGITS_B.tolist(), strict=True)
    ]


def ensemble(tau: float) -> Teacher:
    return Teacher([FixedLogits(LOGITS_A), FixedLogits(LOGITS_B)], tau=tau)


IMAGES = torch.zeros(3, 3, 4, 4)


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_soft_target_is_the_average_of_the_members_probabilities(tau):
    target = torch.softmax(ensemble(tau)(IMAGES).logits / tau, dim=1)  # what soft distillation reads
    torch.testing.assert_close(target, torch.tensor(hand_average(tau)), rtol=1e-6, atol=1e-7)


def test_hard_target_is_the_argmax_of_the_average():
    expected = [max(range(3), key=row.__getitem__) for row in hand_average(1.0)]
    assert expected == [2, 1, 2]  # sample 0: neither member's own argmax
    assert ensemble(1.0)(IMAGES).logits.argmax(dim=1).tolist() == expected


def test_soft_distillation_from_an_ensemble_equals_the_formula_on_the_average():
    tau, alpha = 2.0, 0.5
    torch.manual_seed(0)
    cls_logits, dist_logits, labels = torch.randn(3, 3), torch.randn(3, 3), torch.tensor([0, 1, 2])
    loss = DistillationLoss("soft", alpha=alpha, tau=tau)
    terms = loss.terms(cls_logits, dist_logits, labels, ensemble(tau)(IMAGES).logits)
    kl = 0.0  # KL(p_teacher || p_student) at tau, summed over classes, averaged over the batch
    for p_row, z_row in zip(hand_average(tau), dist_logits.tolist(), strict=True):
        q_row = softmax(z_row, tau)
        kl += sum(p * (math.log(p) - math.log(q)) for p, q in zip(p_row, q_row, strict=True)) / 3
    assert terms["dist"].item() == pytest.approx(tau * tau * kl, rel=1e-5)


def test_a_single_teacher_is_passed_through_unchanged():
    teacher = Teacher(FixedLogits(LOGITS_A), tau=3.0)
    torch.testing.assert_close(teacher(IMAGES).logits, LOGITS_A, rtol=0, atol=0)


@pytest.fixture
def two_teachers(tmp_path):
    torch.manual_seed(1)
    first = tmp_path / "resnet10t.safetensors"
    second = tmp_path / "resnet14t.safetensors"
    save_safetensors(timm.create_model("resnet10t", num_classes=10), first)
    save_safetensors(timm.create_model("resnet14t", num_classes=10), second)
    return first, second


def ensemble_overrides(first, second, *extra):
    return [
        "loss=hard_distill",
        "teacher=ensemble",
        f"teacher.members=[{{name:resnet10t,checkpoint:{first}}},{{name:resnet14t,checkpoint:{second}}}]",
        "augment.mixup=0.8",
        "augment.cutmix=1.0",
        "teacher.unchecked_order=true",
        *extra,
    ]


def test_an_ensemble_run_reports_the_ensemble_and_each_member(tiny_config, two_teachers):
    first, second = two_teachers
    run = train(tiny_config(*ensemble_overrides(first, second)))
    # Recomputed outside Lightning: each member from its file, the ensemble as the mean of probabilities.
    networks = []
    for name, path in (("resnet10t", first), ("resnet14t", second)):
        network = timm.create_model(name, num_classes=10)
        network.load_state_dict(load_file(str(path)))
        networks.append(network.eval())
    correct, seen = [0, 0, 0], 0
    with torch.no_grad():
        for images, labels in run.datamodule.val_dataloader():
            member_logits = [network(model_input(images)) for network in networks]
            average = sum(torch.softmax(logits, dim=1) for logits in member_logits) / 2
            for i, logits in enumerate([*member_logits, average]):
                correct[i] += int((logits.argmax(dim=1) == labels).sum())
            seen += len(labels)
    for key, count in zip(("teacher_acc1_member0", "teacher_acc1_member1", "teacher_acc1"), correct, strict=True):
        assert run.metrics[f"val/{key}"] == pytest.approx(count / seen, abs=1e-6), key


def test_the_teacher_cache_is_keyed_on_every_member(tiny_config, two_teachers, tmp_path):
    first, second = two_teachers
    cache = tmp_path / "teacher_cache"
    train(tiny_config(*ensemble_overrides(first, second, f"teacher.cache={cache}"), run="fill"))
    train(tiny_config(*ensemble_overrides(first, second, f"teacher.cache={cache}"), run="read"))
    assert len([d for d in cache.iterdir() if d.is_dir()]) == 1  # the same ensemble: the same cache
    torch.manual_seed(2)  # the second member retrained: other weights, same name
    save_safetensors(timm.create_model("resnet14t", num_classes=10), second)
    train(tiny_config(*ensemble_overrides(first, second, f"teacher.cache={cache}"), run="other"))
    fingerprints = [d for d in cache.iterdir() if d.is_dir()]
    assert len(fingerprints) == 2
    members = [(d / "fingerprint.json").read_text() for d in fingerprints]
    assert all('"resnet10t"' in text and '"resnet14t"' in text for text in members)


def test_each_member_sees_the_views_at_its_own_resolution(tiny_config, two_teachers):
    """A 384 px teacher beside a 224 px one, in miniature: member 0 at 8 px, member 1 at teacher.img_size=12."""
    first, second = two_teachers
    members = (
        f"teacher.members=[{{name:resnet10t,checkpoint:{first},img_size:8}},{{name:resnet14t,checkpoint:{second}}}]"
    )
    run = train(
        tiny_config(
            *ensemble_overrides(first, second)[:2], members, "teacher.img_size=12", "teacher.unchecked_order=true"
        )
    )
    seen = []
    for member in run.module.teacher.members:
        member.network.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[-1]))
    run.module.teacher(torch.randn(2, 3, 16, 16))
    assert seen == [8, 12]
