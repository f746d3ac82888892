"""Scoring answers: normalisation, correctness (free text and multiple choice), and the ROC AUC of a score.

Pure functions shared by the comparison runner and the training stages (stage 2's judges, stage 3's gate labels).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

OPTION_LETTERS = "ABCDEFGHIJ"
_EDGE_CHARS = string.punctuation + string.whitespace + "\u2018\u2019\u201c\u201d"
_LETTER_FORM = re.compile(r"^\(?([a-z])(?:[).:]|\s|$)\s*(.*)$")


def normalize(text: str) -> str:
    """Lowercase, strip surrounding whitespace, punctuation and quotes, and collapse inner whitespace.

    Args:
        text: a model answer or a reference answer.

    Returns:
        The normalised text; inner punctuation is kept (``"A-3"`` stays ``"a-3"``).

    Examples:
        >>> normalize('  "The  Left." ')
        'the left'
        >>> normalize("(A)")
        'a'
        >>> normalize("A-3")
        'a-3'
    """
    return " ".join(str(text).lower().strip(_EDGE_CHARS).split())


def _correct_option(answer: str, options: Sequence[str]) -> int | None:
    """Index of the right option: ``answer`` is either an option letter or an option's text."""
    norm = normalize(answer)
    letters = [c.lower() for c in OPTION_LETTERS[: len(options)]]
    if norm in letters:
        return letters.index(norm)
    texts = [normalize(o) for o in options]
    return texts.index(norm) if norm in texts else None


def is_correct(prediction: str, answer: str, options: Sequence[str] | None = None) -> bool:
    """Whether ``prediction`` answers correctly.

    An exact match after :func:`normalize` always counts. For multiple choice, the right option's letter in any
    usual form (``B``, ``(B)``, ``B.``, ``B)``, optionally followed by the option's text) or the option's text
    alone also counts. A prediction that reads as a valid option letter is judged as a letter, never as text.

    Args:
        prediction: the model's answer.
        answer: the reference answer (for multiple choice, the option letter or the option text).
        options: the option texts of a multiple-choice question, else None.

    Returns:
        True when the prediction is correct.

    Examples:
        >>> is_correct("Left.", "left")
        True
        >>> is_correct("(B)", "B", ["7K", "7X", "QQ", "A1"])
        True
        >>> is_correct("7x", "B", ["7K", "7X", "QQ", "A1"])
        True
        >>> is_correct("B. 7X", "B", ["7K", "7X", "QQ", "A1"])
        True
        >>> is_correct("A", "B", ["7K", "7X", "QQ", "A1"])
        False
        >>> is_correct("right", "left")
        False
    """
    pred = normalize(prediction)
    if pred == normalize(answer):
        return True
    if not options:
        return False
    right = _correct_option(answer, options)
    if right is None:
        return False
    right_text = normalize(options[right])
    letter = _LETTER_FORM.match(pred)
    if letter and letter.group(1) in OPTION_LETTERS[: len(options)].lower():
        rest = normalize(letter.group(2))
        return OPTION_LETTERS.lower().index(letter.group(1)) == right and rest in ("", right_text)
    return pred == right_text


def auc(scores: Sequence[float], labels: Sequence[int]) -> float | None:
    """Area under the ROC curve (ties count half); None without both classes.

    Examples:
        >>> auc([0.9, 0.8, 0.3, 0.1], [1, 1, 0, 0]), auc([0.5, 0.5], [1, 0])
        (1.0, 0.5)
    """
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))
