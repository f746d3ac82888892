"""The official scorers of the benchmarks Q-Zoom reports, as the reference evaluation (lmms-eval 0.7.3) scores them.

Multiple choice (V*, HR-Bench, MME-RealWorld-lite) lives here, each benchmark with its own way of finding the
option letter in free text (exposed as ``*_letter`` helpers, so callers can count answers no rule could read);
the free-text rules live in :mod:`.scorers_text`. :data:`SCORERS` maps each task name to its scorer.

``tests/test_bench_scorers.py`` checks every scorer case by case against scores the lmms-eval functions themselves
produced (``tests/fixtures/bench/scorer_reference.jsonl``, made by ``tests/fixtures/bench/make_scorer_reference.py``).

Every scorer strips the prediction first, as lmms-eval's ``ConfigurableTask.process_results``
(``lmms_eval/api/task.py``) strips each ``generate_until`` output before a task's rule sees it.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from .base import BenchItem, Scorer
from .scorers_text import anls_score, chartqa_score, ocrbench_score, textvqa_score

__all__ = [
    "SCORERS", "anls_score", "chartqa_score", "hrbench_letter", "hrbench_score", "mme_realworld_letter",
    "mme_realworld_score", "ocrbench_score", "textvqa_score", "vstar_letter", "vstar_score",
]

# --- V* Bench -----------------------------------------------------------------------------------------------------

# Tried in order on the upper-cased answer; the first that matches gives the letter (lmms-eval 0.7.3,
# lmms_eval/tasks/vstar_bench/utils.py, extract_answer_letter). The first accepts ANY answer that begins with A-D,
# so "Because ..." reads as B: the benchmark's rule, kept.
_VSTAR_PATTERNS = tuple(re.compile(p, re.IGNORECASE) for p in (
    r"^([A-D])\s*[\.)\]]*",                                         # "B", "B.", "B) ..."
    r"(?:THE\s+)?(?:ANSWER|CHOICE|OPTION)(?:\s+IS)?[\s:]+([A-D])",  # "Answer: B", "the answer is B"
    r"\(([A-D])\)",                                                 # "(B)"
    r"([A-D])\s*(?:\.|\)|])",                                       # "B." / "B)" / "B]" anywhere
    r"(?:^|\s)([A-D])(?:\s|$)",                                     # a lone "B"
))


def vstar_letter(prediction: str) -> str | None:
    """The option letter V* reads in an answer, or None.

    Source: lmms-eval 0.7.3, ``lmms_eval/tasks/vstar_bench/utils.py``, ``extract_answer_letter``: the patterns of
    :data:`_VSTAR_PATTERNS` in order, then the only A-D capital left in the upper-cased answer, if exactly one. Option
    text is not matched to options; a text with a single A-D letter in it ("cat") reads as that letter. (The
    reference's last fallback, "the first character if it is A-D", can never fire after the first pattern.)

    Examples:
        >>> [vstar_letter(a) for a in ("B", "(c)", "The answer is D.", "Answer: a", "", "red")]
        ['B', 'C', 'D', 'A', None, 'D']
    """
    response = prediction.strip().upper()
    for pattern in _VSTAR_PATTERNS:
        found = pattern.search(response)
        if found:
            return found.group(1).upper()
    letters = re.findall(r"[A-D]", response)
    return letters[0] if len(letters) == 1 else None


def vstar_score(prediction: str, item: BenchItem) -> float:
    """V* Bench: 1.0 when :func:`vstar_letter` equals the correct letter (``item.answers[0]``), else 0.0.

    Source: lmms-eval 0.7.3, ``lmms_eval/tasks/vstar_bench/utils.py``, ``vstar_process_results`` (the label is
    stripped and upper-cased; an unreadable answer is wrong).

    Examples:
        >>> item = BenchItem(0, "q", "vstar", "direct_attributes", "", ("A",), ("white", "blue", "black", "red"))
        >>> vstar_score("A. white", item), vstar_score("(B)", item), vstar_score("white", item)
        (1.0, 0.0, 0.0)
    """
    return 1.0 if vstar_letter(prediction) == item.answers[0].strip().upper() else 0.0


# --- HR-Bench -----------------------------------------------------------------------------------------------------

# Answers the reference reads as "none of the options" ("Z"; lmms-eval 0.7.3, lmms_eval/tasks/hrbench/
# hrbench_evals.py, HRBenchEval.can_infer_option).
_HRBENCH_REFUSALS = (
    "Sorry, I can't help with images of people yet.", "I can't process this file.",
    "I'm sorry, but without the image provided", "Cannot determine the answer",
)
_HRBENCH_API_FAILURE = "Failed to obtain answer via API"
_HRBENCH_SEPARATORS = str.maketrans({mark: " " for mark in ".()[],:;!*#{}"})


def _hrbench_letter_by_token(answer: str, letters: str) -> str | None:
    """HRBenchEval.can_infer_option: exactly one option letter standing alone as a word."""
    if _HRBENCH_API_FAILURE in answer:
        return None
    if any(refusal in answer for refusal in _HRBENCH_REFUSALS):
        return "Z"
    words = set(answer.translate(_HRBENCH_SEPARATORS).split())
    named = [letter for letter in letters if letter in words]
    if len(named) == 1:
        return named[0]
    return "Z" if not named and "Z" in words else None


def _hrbench_letter_by_text(answer: str, options: Sequence[str], letters: str) -> str | None:
    """HRBenchEval.can_infer_text: exactly one option's text contained in the answer, ignoring case."""
    lowered = answer.lower()
    named = [letter for letter, text in zip(letters, options, strict=True) if str(text).lower() in lowered]
    return named[0] if len(named) == 1 else None


def hrbench_letter(prediction: str, options: Sequence[str]) -> str | None:
    """The option letter HR-Bench's rules read in an answer: a letter, ``"Z"`` for "none of them", or None.

    Source: lmms-eval 0.7.3, ``lmms_eval/tasks/hrbench/hrbench_evals.py``, ``HRBenchEval.can_infer`` (as
    ``get_chat_response`` calls it before any judge): first a lone capital option letter (``.()[],:;!*#{}`` read as
    spaces; one of the refusal phrases, or a lone ``Z`` with no letter, reads as ``"Z"``), then the one option
    whose text the answer contains. None is where the reference would ask its GPT judge; we never call one, so
    callers can count these. The ``VERBOSE`` environment switch of the reference is taken as unset.

    Examples:
        >>> options = ("red", "blue", "green", "black")
        >>> [hrbench_letter(a, options) for a in ("B", "(C) green", "It is blue.", "A or B", "Z", "purple")]
        ['B', 'C', 'B', None, 'Z', None]
    """
    answer = prediction.strip()
    letters = string.ascii_uppercase[:len(options)]
    return _hrbench_letter_by_token(answer, letters) or _hrbench_letter_by_text(answer, options, letters)


def hrbench_score(prediction: str, item: BenchItem) -> float:
    """HR-Bench 4K/8K: 1.0 when :func:`hrbench_letter` is the correct letter (``item.answers[0]``, any case).

    Source: lmms-eval 0.7.3, ``lmms_eval/tasks/hrbench/utils.py``, ``hrbench_process_results``. Where the rules
    read no letter the reference asks a GPT judge to match the answer to an option; we call no judge and score such
    an answer 0 (count them with :func:`hrbench_letter` returning None). The reference's benchmark score averages
    per ``cycle_category`` first, which is the caller's aggregation, not this per-question score.

    Examples:
        >>> item = BenchItem(0, "q", "hrbench8k", "single", "", ("C",), ("red", "blue", "green", "black"))
        >>> hrbench_score("C", item), hrbench_score("green", item), hrbench_score("dark green", item)
        (1.0, 1.0, 1.0)
        >>> hrbench_score("teal", item)
        0.0
    """
    letter = hrbench_letter(prediction, item.options)
    return 1.0 if letter is not None and letter.lower() == item.answers[0].lower() else 0.0


# --- MME-RealWorld-lite -------------------------------------------------------------------------------------------

# Removed (case-sensitive, in this order) before the letter is looked for (lmms-eval 0.7.3,
# lmms_eval/tasks/mme_realworld/utils.py, extract_characters_regex).
_MME_PREFIXES = (
    "The best answer is", "The correct answer is", "The answer is", "The answer", "The best option is",
    "The correct option is", "Best answer:", "Best option:",
)
_MME_LETTERS = "ABCDE"


def mme_realworld_letter(prediction: str) -> str:
    """The option letter MME-RealWorld reads in an answer, or "" for none.

    Source: lmms-eval 0.7.3, ``lmms_eval/tasks/mme_realworld/utils.py``, ``extract_characters_regex``: after the
    answer prefixes go, the FIRST capital A-E anywhere (so "Both ..." reads as B); failing that, the first of
    ``(A)``..``(E)`` that contains the answer, ignoring case: "b" reads as B, and an empty answer, being in "(A)",
    as A.

    Examples:
        >>> [mme_realworld_letter(a) for a in ("(C)", "The answer is D", "e", "", "none of these")]
        ['C', 'D', 'E', 'A', '']
    """
    answer = prediction.strip()
    for prefix in _MME_PREFIXES:
        answer = answer.replace(prefix, "")
    found = re.search(f"[{_MME_LETTERS}]", answer)
    if found:
        return found[0]
    # The reference first gives up on answers over 10 words; such an answer is never inside "(a)", so it needs no test.
    return next((letter for letter in _MME_LETTERS if answer.lower() in f"({letter.lower()})"), "")


def mme_realworld_score(prediction: str, item: BenchItem) -> float:
    """MME-RealWorld-lite: 1.0 when the correct letter (``item.answers[0]``) is :func:`mme_realworld_letter`.

    Source: lmms-eval 0.7.3, ``lmms_eval/tasks/mme_realworld/utils.py``, ``mme_realworld_process_results`` and the
    per-question test of ``mme_realworld_aggregate_results`` (equal ignoring case, or the answer contained in the
    read letter; the benchmark score is the plain mean over questions).

    Examples:
        >>> item = BenchItem(0, "q", "mme-realworld-lite", "Perception/Remote Sensing", "", ("B",))
        >>> mme_realworld_score("(B) a truck", item), mme_realworld_score("b", item), mme_realworld_score("A", item)
        (1.0, 1.0, 0.0)
    """
    return 1.0 if item.answers[0].lower() in mme_realworld_letter(prediction).lower() else 0.0


SCORERS: dict[str, Scorer] = {
    "vstar": vstar_score,
    "hrbench4k": hrbench_score,
    "hrbench8k": hrbench_score,
    "mme-realworld-lite": mme_realworld_score,
    "textvqa": textvqa_score,
    "docvqa": anls_score,
    "infovqa": anls_score,
    "chartqa": chartqa_score,
    "ocrbench": ocrbench_score,
}
"""Task name -> the benchmark's own per-question scorer."""
