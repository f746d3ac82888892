"""Summarising comparison runs: per-agent accuracy, mean costs, RoI quality and the gate's AUC.

Everything here is a pure function of its inputs, so a summary can always be recomputed from ``results.jsonl``.
Answers are scored by :mod:`qzoom_agent.scoring`, boxes by :mod:`qzoom_agent.boxes`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..boxes import roi_hit
from ..scoring import auc

SUMMARY_KEYS = (
    "accuracy", "accuracy_fine", "accuracy_coarse", "latency_s_mean", "visual_tokens_mean", "forward_passes_mean",
    "tool_calls_mean", "n",
)


def _mean(values: Iterable[float]) -> float | None:
    vals = [float(v) for v in values]
    return sum(vals) / len(vals) if vals else None


def score_of(record: Mapping[str, Any]) -> float:
    """A record's score in [0, 1]: the benchmark's ``score`` (fractional for ANLS and VQA accuracy), or 1/0 from
    ``correct`` in records written before scores were kept."""
    return float(record["score"]) if record.get("score") is not None else float(bool(record["correct"]))


def summarize_agent(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracy (overall, fine, coarse: mean scores, None when empty), mean costs and zooms over one agent's records.

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
        "accuracy": _mean(score_of(r) for r in records),
        "accuracy_fine": _mean(score_of(r) for r in fine),
        "accuracy_coarse": _mean(score_of(r) for r in coarse),
        "latency_s_mean": _mean(r["latency_s"] for r in records),
        "visual_tokens_mean": _mean(r["visual_tokens"] for r in records),
        "forward_passes_mean": _mean(r["forward_passes"] for r in records),
        "tool_calls_mean": _mean(r.get("tool_calls", 0) for r in records),
        "n": len(records),
        "zooms_mean": _mean(r.get("zooms", 0) for r in records),
        "external_calls_mean": _mean(r.get("external_calls", 0) for r in records),
        "failed_mean": _mean(r.get("error") is not None for r in records),
        "generated_tokens_mean": _mean(r["generated_tokens"] for r in records if "generated_tokens" in r),
        # counted by the agents that report them (older records and some agents do not: then None)
        "vision_encodes_mean": _mean(r["vision_encodes"] for r in records if r.get("vision_encodes") is not None),
        "layer_tokens_mean": _mean(r["layer_tokens"] for r in records if r.get("layer_tokens") is not None),
        "tool_call_rate_fine": _mean(r.get("tool_calls", 0) > 0 for r in fine),
        "tool_call_rate_coarse": _mean(r.get("tool_calls", 0) > 0 for r in coarse),
        "roi_coverage_mean": None,
        "roi_hit_fine": None,
        "accuracy_by_family": {},
        "roi_hit_by_family": {},
    }
    for family in sorted({r["family"] for r in records if r.get("family")}):
        out["accuracy_by_family"][family] = _mean(score_of(r) for r in records if r.get("family") == family)
    if any(r.get("bbox") is not None for r in records):  # an agent that proposes boxes: how good are they
        boxed = [r for r in fine if r.get("coverage") is not None]
        out["roi_coverage_mean"] = _mean(r["coverage"] for r in boxed)
        out["roi_hit_fine"] = _mean(roi_hit(r.get("bbox"), r.get("target_box")) for r in fine)
        for family in sorted({r["family"] for r in fine if r.get("family")}):
            out["roi_hit_by_family"][family] = _mean(roi_hit(r.get("bbox"), r.get("target_box"))
                                                     for r in fine if r.get("family") == family)
    return out


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
