"""One label space: class lists compared by name and order wherever two meet, and on the data where a model has no
names.

`check_same_classes` is the one comparison every reader of a class list uses (model.init, teachers, ensemble members,
the shards' _info.json, the splits of a Hugging Face dataset, the folders of train/ and val/): a list is accepted only
when it is the same names in the same order; otherwise one line says what differs (both lists, shortened, the first
positions that differ) and why it likely happened: names that differ only by Unicode normalisation (NFC and NFD
spell "é" as one code point or two, and macOS file names come in NFD), or the same names in numeric rather than
string order (0, 1, 2, ..., 10 against 0, 1, 10, 11, 2, ...: timm and torchvision sort class folders as strings).

`order_on_data` scores a network without class names (a plain state dict, a transformers `LABEL_k` config) on a
sample of the validation data: the only check left for its class order.
"""

import logging
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from deit_train.errors import DeitTrainError

log = logging.getLogger(__name__)

SHOWN = 6  # names shown of a long list


def shortened(names: Sequence[str]) -> str:
    """A class list for a message: all of a short one, else its length, its first and its last names. ascii() shows
    names that look alike (NFC / NFD, spaces) as different."""
    names = [ascii(str(name)) for name in names]
    if len(names) <= SHOWN:
        return f"[{', '.join(names)}]"
    return f"{len(names)} classes [{', '.join(names[: SHOWN - 1])}, ..., {names[-1]}]"


def natural_key(name: str) -> list:
    """Sort key that orders the digits in a name as a number: 2 before 10, class_2 before class_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def class_difference(theirs: Sequence[str], ours: Sequence[str], their_name: str, our_name: str) -> str | None:
    """What differs between two class lists, in words (None when they are the same names in the same order)."""
    theirs, ours = [str(n) for n in theirs], [str(n) for n in ours]
    if theirs == ours:
        return None
    lists = f"{their_name}: {shortened(theirs)}; {our_name}: {shortened(ours)}"
    nfc = lambda names: [unicodedata.normalize("NFC", n) for n in names]  # noqa: E731
    if Counter(nfc(theirs)) == Counter(nfc(ours)) and Counter(theirs) != Counter(ours):
        odd = next(name for name in theirs if name not in set(ours))
        twin = next(name for name in ours if unicodedata.normalize("NFC", name) == unicodedata.normalize("NFC", odd))
        return (
            f"names differ only by Unicode normalisation (NFC/NFD): {ascii(odd)} in {their_name} is {ascii(twin)} "
            f"in {our_name} ({lists}); write the names in one form (unicodedata.normalize('NFC', name); file "
            f"names copied from macOS are often NFD)"
        )
    if len(theirs) != len(ours):
        only_theirs = [n for n in theirs if n not in set(ours)]
        only_ours = [n for n in ours if n not in set(theirs)]
        extra = f"; only in {their_name}: {shortened(only_theirs)}" if only_theirs else ""
        extra += f"; only in {our_name}: {shortened(only_ours)}" if only_ours else ""
        return f"{len(theirs)} classes against {len(ours)} ({lists}{extra})"
    differing = [i for i, (a, b) in enumerate(zip(theirs, ours, strict=True)) if a != b]
    positions = ", ".join(f"{i}: {ascii(theirs[i])} against {ascii(ours[i])}" for i in differing[:3])
    if Counter(theirs) != Counter(ours):
        return f"other names at {len(differing)} of {len(ours)} positions ({positions}; {lists})"
    why = ""
    if sorted(theirs, key=natural_key) == theirs and sorted(ours) == ours:
        why = f": {their_name} lists them in numeric order (2 before 10), {our_name} sorted as strings (10 before 2)"
    elif sorted(ours, key=natural_key) == ours and sorted(theirs) == theirs:
        why = f": {their_name} lists them sorted as strings (10 before 2), {our_name} in numeric order (2 before 10)"
    return f"the same {len(ours)} names in another order{why} ({len(differing)} positions differ: {positions}; {lists})"


def normalisation_hint(unknown: Sequence[str], known: Sequence[str]) -> str:
    """Where names a model or data does not know are known names in another Unicode normalisation: a clause saying
    so, else ""."""
    nfc = {unicodedata.normalize("NFC", name): name for name in known}
    twins = [
        (name, nfc[unicodedata.normalize("NFC", name)]) for name in unknown if unicodedata.normalize("NFC", name) in nfc
    ]
    if not twins:
        return ""
    name, twin = twins[0]
    return (
        f" ({len(twins)} of them differ from known names only by Unicode normalisation (NFC/NFD), e.g. "
        f"{ascii(name)} against {ascii(twin)}: write the names in one form, unicodedata.normalize('NFC', name))"
    )


def check_same_classes(
    theirs: Sequence[str], ours: Sequence[str], what: str, their_name: str, our_name: str, fix: str
) -> None:
    """Refuse, in one line, two class lists that are not the same names in the same order: `what` names the reader
    (e.g. "teacher.checkpoint=PATH"), `fix` says what to do."""
    difference = class_difference(theirs, ours, their_name, our_name)
    if difference is not None:
        raise DeitTrainError(f"{what}: its classes are not the data's, label for label: {difference}. {fix}")


# ---- on the data: a network without class names ------------------------------------------------------------------

SAMPLE_IMAGES = 256  # a few batches of the validation set: enough to tell a teacher from chance (see OrderCheck)
SIGNIFICANCE = 1e-3  # the chance of refusing a network whose order is right, or of passing one at chance


def binomial_tail(successes: int, trials: int, p: float) -> float:
    """P(X >= successes) for X ~ Binomial(trials, p), exactly (trials is at most a few hundred)."""
    if successes <= 0:
        return 1.0
    p = min(max(p, 1e-12), 1 - 1e-12)
    log_terms = [
        math.lgamma(trials + 1)
        - math.lgamma(k + 1)
        - math.lgamma(trials - k + 1)
        + k * math.log(p)
        + (trials - k) * math.log1p(-p)
        for k in range(successes, trials + 1)
    ]
    top = max(log_terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in log_terms))


@dataclass
class OrderCheck:
    """A network's top-1 on a sample of labelled validation images, against what a network whose outputs are unrelated
    to the labels would score.

    Chance: a label-blind network that predicts class k as often as this one does is right with probability
    p0 = sum_k f_label(k) f_predicted(k) (the agreement expected by chance, as in Cohen's kappa), 1/K for balanced
    labels; it accounts for a sample that holds few classes (validation sets stored class by class) and for a
    network that predicts one class always. Its correct count is then Binomial(n, p0); the network is "clearly above
    chance" when scoring at least as many correct that way has probability below SIGNIFICANCE (0.1%).

    Another order: a network trained with its classes in numeric order (0, 1, 2, ..., 10) read in string order (0, 1,
    10, ...) still scores above chance on the classes whose index both orders share (15.3% instead of 63.9% on 12
    classes). Its top-1 is therefore also read under the other usual orders of the data's names; an order that wins
    on clearly more images (an exact sign test on the images where the two readings disagree, at SIGNIFICANCE) is
    named."""

    images: int
    correct: int
    chance: float
    p_value: float
    better_order: tuple[str, int] | None = None  # (which order, correct under it)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.images)

    @property
    def passed(self) -> bool:
        return self.p_value < SIGNIFICANCE and self.better_order is None

    def describe(self) -> str:
        text = f"top-1 {100 * self.accuracy:.1f}% on {self.images} validation images (chance: {100 * self.chance:.1f}%)"
        if self.better_order is not None:
            order, correct = self.better_order
            text += f", {100 * correct / self.images:.1f}% if its outputs are read in {order}"
        return text


def other_orders(class_names: Sequence[str]) -> dict[str, list[int]]:
    """{description: network output i -> data label} for the usual orders the data's names could have been in."""
    names = [str(n) for n in class_names]
    index = {name: i for i, name in enumerate(names)}
    orders = {
        "numeric order (2 before 10)": sorted(names, key=natural_key),
        "string order (10 before 2)": sorted(names),
        "case-insensitive order": sorted(names, key=str.casefold),
    }
    return {what: [index[n] for n in order] for what, order in orders.items() if order != names}


def order_on_data(
    predict: Callable[[torch.Tensor], torch.Tensor], batches: Iterable, class_names: Sequence[str]
) -> OrderCheck:
    """OrderCheck of `predict` (images -> logits) on `batches` of (images, labels); unlabelled rows (-1) left out."""
    labels, predicted = [], []
    with torch.inference_mode():
        for images, targets in batches:
            keep = targets >= 0
            if keep.any():
                labels.append(targets[keep])
                predicted.append(predict(images[keep]).argmax(dim=1).cpu())
    if not labels:
        return OrderCheck(0, 0, 1.0, 1.0)
    labels, predicted = torch.cat(labels), torch.cat(predicted)
    n, classes = len(labels), len(class_names)
    correct = int((predicted == labels).sum())
    label_freq = torch.bincount(labels, minlength=classes).double() / n
    predicted_freq = torch.bincount(predicted.clamp(0, classes - 1), minlength=classes).double() / n
    chance = float((label_freq * predicted_freq).sum())
    check = OrderCheck(n, correct, chance, binomial_tail(correct, n, chance))
    for what, mapping in other_orders(class_names).items():
        mapped = torch.tensor(mapping)[predicted.clamp(0, classes - 1)]
        wins, losses = (
            int(((mapped == labels) & (predicted != labels)).sum()),
            int(((predicted == labels) & (mapped != labels)).sum()),
        )
        significant = wins > losses and binomial_tail(wins, wins + losses, 0.5) < SIGNIFICANCE
        if significant and (check.better_order is None or wins - losses > check.better_order[1] - correct):
            check.better_order = (what, correct - losses + wins)
    return check
