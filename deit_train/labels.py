"""One label space: class lists compared by name and order wherever two meet, and on the data where a model has no
names.

`check_same_classes` is the one comparison every reader of a class list uses (model.init, teachers, ensemble members,
the shards' _info.json, the splits of a Hugging Face dataset, the folders of train/ and val/): a list is accepted only
when it is the same names in the same order; otherwise one line says what differs (both lists, shortened, the first
positions that differ) and why it likely happened: names that differ only by Unicode normalisation (NFC and NFD
spell "é" as one code point or two, and macOS file names come in NFD), or the same names in numeric rather than
string order (0, 1, 2, ..., 10 against 0, 1, 10, 11, 2, ...: timm and torchvision sort class folders as strings).

`order_on_data` checks a network without class names (a plain state dict, a transformers `LABEL_k` config) on a
stratified sample of the validation data, the only check left for its class order: the best one-to-one reading of
its outputs as the data's classes, refused where it differs from the data's order with evidence (OrderCheck).
"""

from __future__ import annotations

import logging
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from deit_train.errors import DeitTrainError

if TYPE_CHECKING:
    import torch

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

SIGNIFICANCE = 1e-3  # the chance of refusing a network whose outputs are in the data's order


def sample_size(num_classes: int) -> int:
    """Validation images the order check reads (all of a smaller split): 16 per class, at least 512, at most 2048.
    What these sizes can show: docs/troubleshooting.md ("class order")."""
    return min(max(16 * num_classes, 512), 2048)


def stratified_indices(targets: Sequence[int], images: int, seed: int) -> list[int]:
    """Up to `images` positions of a split whose labels are `targets`, covering its classes evenly: a seeded random
    image of each class in turn (a class out of images drops out), the class order itself drawn anew each round.
    Validation sets are often stored class by class: their first images would be a few classes."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for position, label in enumerate(targets):
        by_class.setdefault(int(label), []).append(position)
    queues = [
        [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
        for _, members in sorted(by_class.items())
    ]
    chosen: list[int] = []
    for round_ in range(max(map(len, queues), default=0)):
        for queue in (queues[i] for i in torch.randperm(len(queues), generator=generator).tolist()):
            if round_ < len(queue):
                chosen.append(queue[round_])
        if len(chosen) >= images:
            break
    return chosen[:images]


def binomial_tail(successes: int, trials: int, p: float) -> float:
    """P(X >= successes) for X ~ Binomial(trials, p), exactly (trials is at most a few thousand)."""
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
    top = max(log_terms, default=-math.inf)
    return 0.0 if top == -math.inf else min(1.0, math.exp(top) * sum(math.exp(t - top) for t in log_terms))


def best_reading(confusion: np.ndarray) -> np.ndarray:
    """The one-to-one reading of a network's outputs as the data's classes that gets the most images right:
    reading[o] = the class output o is read as, from confusion[o, c] = images of class c the network labels o
    (scipy's linear_sum_assignment). Ties go to the data's order, then to the reading that moves fewest outputs: a
    bonus of 1/(2K) per output left in place is less than one image in all."""
    from scipy.optimize import linear_sum_assignment  # here: scipy takes a while to import, and few runs need it

    classes = len(confusion)
    bonus = np.eye(classes) / (2 * classes)
    outputs, read_as = linear_sum_assignment(confusion + bonus, maximize=True)
    return read_as[np.argsort(outputs)]


def cycles(reading: np.ndarray) -> list[list[int]]:
    """The moved outputs of a reading, by cycle (o -> reading[o] -> ...): each cycle can be undone alone."""
    seen, found = set(), []
    for start in np.flatnonzero(reading != np.arange(len(reading))).tolist():
        cycle, output = [], start
        while output not in seen:
            seen.add(output)
            cycle.append(output)
            output = int(reading[output])
        if cycle:
            found.append(cycle)
    return found


def sign_test(confusion: np.ndarray, reading: np.ndarray, outputs: list[int]) -> float:
    """P-value that `reading` of `outputs` gets more images right than the data's order: of the images these outputs
    label, those right under one reading only are wins (confusion[o, reading[o]]) or losses (confusion[o, o]); under
    the data's order each is a win with probability at most 1/2, so P(Binomial(wins + losses, 1/2) >= wins)."""
    wins = int(sum(confusion[o, reading[o]] for o in outputs))
    losses = int(sum(confusion[o, o] for o in outputs))
    return binomial_tail(wins, wins + losses, 0.5)


def evidence(reading: np.ndarray, confusion: np.ndarray) -> float:
    """P-value, on a sample `reading` was not chosen on, that it beats the data's order: the smallest sign test of
    all its moves together and of each of its cycles, times their number (Bonferroni)."""
    groups = cycles(reading)
    if len(groups) > 1:
        groups.append([o for cycle in groups for o in cycle])
    if not groups:
        return 1.0
    return min(1.0, len(groups) * min(sign_test(confusion, reading, outputs) for outputs in groups))


@dataclass
class Move:
    """An output that fits another class: what the network calls `output` is class `read_as` on the data, with the
    sample's images right read so (`right_moved`) and as it stands (`right_as_is`)."""

    output: int
    read_as: int
    right_moved: int
    right_as_is: int


@dataclass
class OrderCheck:
    """Whether a network's outputs are in the data's class order, estimated on a labelled validation sample.

    The confusion C[o, c] counts the sample's images of class c the network labels o. The best one-to-one reading
    of outputs as classes (best_reading) is the data's order itself for a network whose outputs are in it, up to
    noise; a network trained with its classes in another order fits the order it was trained in. The test, so that
    noise alone refuses with probability at most SIGNIFICANCE (0.1%):

    - H0: the outputs are in the data's order: an image the network labels o is at least as likely to be of class
      o as of any other class (what "output o means class o" promises of any network better than a label-blind one).
    - The sample is split in two halves, stratified (alternate images of each class). The best reading is chosen on
      one half and tested on the other with sign_test (evidence: all its moves together, and each cycle of them,
      Bonferroni), then the other way round; p = 2 x the smaller (Bonferroni). Choosing and testing on the same
      images would find a "better" order for any network near chance.
    - Refused when p < SIGNIFICANCE; the refusal names the moves of the best reading on the whole sample, each with
      its images right moved against as it stands.

    What it cannot tell: a move shows only where the moved classes have images in both halves and the network labels
    them mostly right, so a swap of two classes needs about 12 images of them, right in order, in each half (p =
    4 x 2^-w for w wins and no losses: w >= 12); weaker networks need more. A network at chance, a sample without
    some classes or a network that confuses two classes as often as it tells them apart is accepted: nothing shows it
    to be misordered. Chance (logged, and warned of when the top-1 is not clearly above it): a label-blind network
    that predicts class k as often as this one does is right with probability p0 = sum_k f_label(k) f_predicted(k)
    (Cohen's kappa's chance agreement), which holds for any class imbalance of the sample."""

    images: int
    correct: int  # right with the outputs in the data's order
    chance: float
    p_value: float  # that a reading other than the data's order is better
    moves: list[Move]  # the best reading on the whole sample
    class_names: list[str]

    @property
    def refused(self) -> bool:
        return self.p_value < SIGNIFICANCE

    @property
    def above_chance(self) -> bool:
        return binomial_tail(self.correct, self.images, self.chance) < SIGNIFICANCE

    def describe(self) -> str:
        text = f"top-1 {100 * self.accuracy:.1f}% on {self.images} validation images (chance: {100 * self.chance:.1f}%)"
        if not self.refused:
            return text
        best = self.correct + sum(move.right_moved - move.right_as_is for move in self.moves)
        name = lambda k: ascii(self.class_names[k])  # noqa: E731
        shown = ", ".join(
            f"{name(m.output)} as {name(m.read_as)} ({m.right_moved} images against {m.right_as_is})"
            for m in self.moves[:SHOWN]
        )
        more = f", and {len(self.moves) - SHOWN} more" if len(self.moves) > SHOWN else ""
        order = self.usual_order()
        return (
            f"{text}; {100 * best / self.images:.1f}% with its outputs read in another order{order}, which moves "
            f"{len(self.moves)} of {len(self.class_names)} classes: {shown}{more} (p = {self.p_value:.1g})"
        )

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.images)

    def usual_order(self) -> str:
        """ " (the data's names in numeric order)" where the best reading is one of the usual orders, else ""."""
        reading = list(range(len(self.class_names)))
        for move in self.moves:
            reading[move.output] = move.read_as
        for what, mapping in other_orders(self.class_names).items():
            if mapping == reading:
                return f" (the data's names in {what})"
        return ""


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


def order_check(predicted: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]) -> OrderCheck:
    """OrderCheck of a network's top-1 `predicted` against the `labels` of the same images (labelled: >= 0)."""
    classes = len(class_names)
    predicted, labels = predicted.clamp(0, classes - 1).numpy(), labels.numpy()
    n = len(labels)
    if n == 0:
        return OrderCheck(0, 0, 1.0, 1.0, [], list(class_names))
    # halves: alternate images of each class
    rank_in_class = np.zeros(n, dtype=int)
    seen = Counter()
    for i, label in enumerate(labels.tolist()):
        rank_in_class[i], seen[label] = seen[label], seen[label] + 1
    half = rank_in_class % 2 == 1

    def confusion(rows: np.ndarray) -> np.ndarray:
        counts = np.zeros((classes, classes), dtype=np.int64)
        np.add.at(counts, (predicted[rows], labels[rows]), 1)
        return counts

    first, second, whole = confusion(~half), confusion(half), confusion(np.ones(n, dtype=bool))
    p_value = min(1.0, 2 * min(evidence(best_reading(first), second), evidence(best_reading(second), first)))
    reading = best_reading(whole)
    moves = [
        Move(o, int(reading[o]), int(whole[o, reading[o]]), int(whole[o, o]))
        for o in np.flatnonzero(reading != np.arange(classes)).tolist()
    ]
    correct = int(np.trace(whole))
    label_freq, predicted_freq = whole.sum(axis=0) / n, whole.sum(axis=1) / n
    chance = float((label_freq * predicted_freq).sum())
    return OrderCheck(n, correct, chance, p_value, moves, list(class_names))


def order_on_data(
    predict: Callable[[torch.Tensor], torch.Tensor], batches: Iterable, class_names: Sequence[str]
) -> OrderCheck:
    """OrderCheck of `predict` (images -> logits) on `batches` of (images, labels); unlabelled rows (-1) left out.
    The one check of every network whose weights name no classes: teachers, ensemble members and model.init."""
    import torch

    labels, predicted = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)]
    with torch.inference_mode():
        for images, targets in batches:
            keep = targets >= 0
            if keep.any():
                labels.append(targets[keep].long())
                predicted.append(predict(images[keep]).argmax(dim=1).cpu())
    return order_check(torch.cat(predicted), torch.cat(labels), class_names)
