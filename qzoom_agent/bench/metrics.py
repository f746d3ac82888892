"""Scoring answers and summarising comparison runs: answer normalisation, correctness, box overlap, per-agent means.

Everything here is a pure function of its inputs, so a summary can always be recomputed from ``results.jsonl``.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..boxes import box_intersection

OPTION_LETTERS = "ABCDEFGHIJ"
# An RoI "hits" its target when it covers >= 70% of it within 16x its area (the SD-RPN bar).
ROI_COVERAGE, ROI_MAX_AREA = 0.7, 16.0
SUMMARY_KEYS = (
    "accuracy", "accuracy_fine", "accuracy_coarse", "latency_s_mean", "visual_tokens_mean", "forward_passes_mean",
    "tool_calls_mean", "n",
)
_EDGE_CHARS = string.punctuation + string.whitespace + "\u2018\u2019\u201c\u201d"
_LETTER_FORM = re.compile(r"^\(?([a-z])(?:[).:]|\s|$)\s*(.*)$")

BoxLike = Sequence[float]


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


def _area(box: BoxLike) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def box_iou(a: BoxLike | None, b: BoxLike | None) -> float | None:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes; None when either is missing or both are empty.

    Examples:
        >>> box_iou((0, 0, 10, 10), (5, 0, 15, 10))
        0.3333333333333333
        >>> box_iou(None, (0, 0, 1, 1)) is None
        True
    """
    if a is None or b is None:
        return None
    inter = box_intersection(a, b)
    union = _area(a) + _area(b) - inter
    return inter / union if union > 0 else None


def box_coverage(pred: BoxLike | None, target: BoxLike | None) -> float | None:
    """Fraction of ``target``'s area inside ``pred``; None when either is missing or the target is empty.

    Examples:
        >>> box_coverage((0, 0, 100, 100), (10, 10, 20, 20))
        1.0
        >>> box_coverage((0, 0, 15, 100), (10, 10, 20, 20))
        0.5
    """
    if pred is None or target is None or _area(target) <= 0:
        return None
    return box_intersection(pred, target) / _area(target)


def _mean(values: Iterable[float]) -> float | None:
    vals = [float(v) for v in values]
    return sum(vals) / len(vals) if vals else None


def summarize_agent(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracy (overall, fine, coarse; fractions, None when empty), mean costs and zooms over one agent's records.

    For agents that propose boxes, ``roi_coverage_mean`` is the mean share of the target box covered (fine
    questions with a box) and ``roi_hit_fine`` the share of fine questions whose box covers >= 70% of the target
    within 16x its area (no box is a miss); both are None for agents without boxes. ``accuracy_by_family`` maps
    each question family present (e.g. read, mcq, color) to its accuracy, and ``roi_hit_by_family`` each fine
    family to its RoI hit rate (empty for agents without boxes).

    Examples:
        >>> rows = [{"correct": True, "kind": "fine", "latency_s": 1.0, "visual_tokens": 4, "forward_passes": 2,
        ...          "tool_calls": 0}, {"correct": False, "kind": "fine", "latency_s": 3.0, "visual_tokens": 4,
        ...          "forward_passes": 4, "tool_calls": 0}]
        >>> s = summarize_agent(rows)
        >>> s["accuracy"], s["accuracy_coarse"], s["latency_s_mean"], s["n"]
        (0.5, None, 2.0, 2)
    """
    fine = [r for r in records if r.get("kind") == "fine"]
    coarse = [r for r in records if r.get("kind") == "coarse"]
    out = {
        "accuracy": _mean(bool(r["correct"]) for r in records),
        "accuracy_fine": _mean(bool(r["correct"]) for r in fine),
        "accuracy_coarse": _mean(bool(r["correct"]) for r in coarse),
        "latency_s_mean": _mean(r["latency_s"] for r in records),
        "visual_tokens_mean": _mean(r["visual_tokens"] for r in records),
        "forward_passes_mean": _mean(r["forward_passes"] for r in records),
        "tool_calls_mean": _mean(r.get("tool_calls", 0) for r in records),
        "n": len(records),
        "zooms_mean": _mean(r.get("zooms", 0) for r in records),
        "roi_coverage_mean": None,
        "roi_hit_fine": None,
        "accuracy_by_family": {},
        "roi_hit_by_family": {},
    }
    for family in sorted({r["family"] for r in records if r.get("family")}):
        out["accuracy_by_family"][family] = _mean(bool(r["correct"]) for r in records if r.get("family") == family)
    if any(r.get("bbox") is not None for r in records):  # an agent that proposes boxes: how good are they
        boxed = [r for r in fine if r.get("coverage") is not None]
        out["roi_coverage_mean"] = _mean(r["coverage"] for r in boxed)
        out["roi_hit_fine"] = _mean(roi_hit(r.get("bbox"), r.get("target_box")) for r in fine)
        for family in sorted({r["family"] for r in fine if r.get("family")}):
            out["roi_hit_by_family"][family] = _mean(roi_hit(r.get("bbox"), r.get("target_box"))
                                                     for r in fine if r.get("family") == family)
    return out


def roi_hit(box: BoxLike | None, target: BoxLike | None, coverage: float = ROI_COVERAGE,
            max_area: float = ROI_MAX_AREA) -> bool:
    """Whether ``box`` covers at least ``coverage`` of ``target`` with at most ``max_area`` times its area.

    Examples:
        >>> roi_hit((0, 0, 40, 40), (10, 10, 30, 30)), roi_hit((0, 0, 100, 100), (10, 10, 20, 20))
        (True, False)
    """
    c = box_coverage(box, target)
    return c is not None and c >= coverage and _area(box) <= max_area * _area(target)


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


def gate_pairs(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The gate judged against what zooming truly did, from runs with both ``qzoom-always[@N]`` and
    ``qzoom-never[@N]`` agents at the same global view.

    For each question answered by both, "zoom helps" is 1 when the forced zoom is right and the direct answer wrong,
    and 0 when the direct answer is right; questions both get wrong carry no label. The score is the gate's, which
    the forced-zoom agent records from the same first pass the gated agent would use.

    Returns:
        ``{always_agent_name: {"gate_auc", "scored", "zoom_helps"}}``, one entry per matched pair (``gate_auc`` is
        None without both labels).

    Examples:
        >>> rows = [{"agent": "qzoom-always", "index": 0, "correct": True, "gate_score": 0.9},
        ...         {"agent": "qzoom-never", "index": 0, "correct": False, "gate_score": None},
        ...         {"agent": "qzoom-always", "index": 1, "correct": True, "gate_score": 0.2},
        ...         {"agent": "qzoom-never", "index": 1, "correct": True, "gate_score": None}]
        >>> gate_pairs(rows)
        {'qzoom-always': {'gate_auc': 1.0, 'scored': 2, 'zoom_helps': 1}}
    """
    by_agent: dict[str, dict[int, Mapping[str, Any]]] = {}
    for rec in records:
        by_agent.setdefault(rec["agent"], {})[int(rec["index"])] = rec
    out = {}
    for name, always in by_agent.items():
        prefix, sep, arg = name.partition("@")
        if prefix != "qzoom-always":
            continue
        never = by_agent.get("qzoom-never" + sep + arg, {})
        scores, labels = [], []
        for index, rec in always.items():
            direct = never.get(index)
            if direct is None or rec.get("gate_score") is None or not (rec["correct"] or direct["correct"]):
                continue
            scores.append(float(rec["gate_score"]))
            labels.append(int(bool(rec["correct"]) and not direct["correct"]))
        if never:
            out[name] = {"gate_auc": auc(scores, labels), "scored": len(scores), "zoom_helps": sum(labels)}
    return out


def summarize(records: Iterable[Mapping[str, Any]], agents: Sequence[str] | None = None) -> dict[str, Any]:
    """The run summary ``{"agents": {name: summarize_agent(...)}}``.

    Args:
        records: result records (``results.jsonl`` lines), each with at least ``agent`` and ``correct``.
        agents: agent order; agents without records still appear (with ``n`` 0). Default: order of appearance.

    Returns:
        The summary, JSON-ready.
    """
    records = list(records)
    by_agent: dict[str, list[Mapping[str, Any]]] = {name: [] for name in agents or []}
    for rec in records:
        by_agent.setdefault(rec["agent"], []).append(rec)
    summary: dict[str, Any] = {"agents": {name: summarize_agent(rows) for name, rows in by_agent.items()}}
    gate = gate_pairs(records)
    if gate:
        summary["gate"] = gate
    return summary
