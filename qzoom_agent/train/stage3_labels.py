"""Stage-3 gate labels: when does more resolution turn a wrong answer into a right one?

Each question is answered at ascending token budgets. Q-Zoom's consistency rule (``FineGrainedMultiScaleDataset``)
then keeps only trustworthy cases:

* the two highest budgets must agree (else *unstable*, dropped) and be right (else *hallucinated*, dropped);
* *transition*: wrong at the lowest budgets and right from some budget on (the wrong budgets form a prefix);
  non-monotonic patterns are dropped;
* *easy*: right at every budget; as many are kept as there are transitions (balanced classes).

A training item picks one budget per epoch: a transition gives label 1 at one of its two highest wrong budgets
(probability ``positive_rate``), otherwise label 0 at a right budget below the top two; an easy question gives label
0 at a right budget below the top two.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from ..scoring import normalize

UNSTABLE, HALLUCINATED, NON_MONOTONIC, TRANSITION, EASY = "unstable", "hallucinated", "non_monotonic", \
    "transition", "easy"


def agree(a: str, b: str) -> bool:
    """Q-Zoom's match: after normalising, either answer contains the other (and neither is empty)."""
    na, nb = normalize(a), normalize(b)
    return bool(na) and bool(nb) and (na in nb or nb in na)


def classify(correct: Sequence[bool], top_two_agree: bool) -> str:
    """The category of a question from its per-budget correctness (ascending budgets).

    Examples:
        >>> classify([False, False, True, True], True), classify([True, True, True], True)
        ('transition', 'easy')
        >>> classify([True, False, True, True], True), classify([False, True, True], False)
        ('non_monotonic', 'unstable')
        >>> classify([True, False, False], True)
        'hallucinated'
    """
    if len(correct) < 2:
        raise ValueError("the rule needs answers at two budgets at least")
    if not top_two_agree:
        return UNSTABLE
    if not (correct[-1] and correct[-2]):
        return HALLUCINATED
    if all(correct):
        return EASY
    first_right = correct.index(True)
    return TRANSITION if all(correct[first_right:]) else NON_MONOTONIC


@dataclass(frozen=True)
class GateSample:
    """A question kept for gate training: its index, category and per-budget correctness."""

    index: int
    category: str
    correct: tuple[bool, ...]


def balance(samples: Sequence[GateSample], seed: int) -> list[GateSample]:
    """All transitions plus as many randomly drawn easy questions (fewer if there are not enough)."""
    transitions = [s for s in samples if s.category == TRANSITION]
    easy = [s for s in samples if s.category == EASY]
    rng = random.Random(seed)
    return sorted(transitions + rng.sample(easy, min(len(easy), len(transitions))), key=lambda s: s.index)


def pick(sample: GateSample, rng: random.Random, positive_rate: float = 0.9) -> tuple[int, int] | None:
    """(budget index, label) for one epoch's view of ``sample``, or None when no valid pick exists."""
    n = len(sample.correct)
    low_right = [i for i in range(max(0, n - 2)) if sample.correct[i]]  # right, below the top two
    if sample.category == TRANSITION:
        wrong = [i for i in range(n) if not sample.correct[i]]
        if rng.random() < positive_rate:
            return rng.choice(wrong[-2:]), 1
        return (rng.choice(low_right), 0) if low_right else None
    if sample.category == EASY:
        return (rng.choice(low_right), 0) if low_right else None
    return None
