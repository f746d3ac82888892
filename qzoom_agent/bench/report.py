"""Reports of a comparison run: the markdown summary table and the accuracy-by-budget plot."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_COLUMNS = (
    ("agent", None),
    ("n", "n"),
    ("accuracy", "accuracy"),
    ("fine", "accuracy_fine"),
    ("coarse", "accuracy_coarse"),
    ("latency_s mean", "latency_s_mean"),
    ("visual tokens mean", "visual_tokens_mean"),
    ("forward passes mean", "forward_passes_mean"),
    ("tool calls mean", "tool_calls_mean"),
    ("zooms mean", "zooms_mean"),
    ("RoI hit (fine)", "roi_hit_fine"),
)


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "n":
        return str(int(value))
    if key.startswith("accuracy") or key == "roi_hit_fine":
        return f"{value:.3f}"
    if key == "latency_s_mean":
        return f"{value:.4f}"
    if key == "zooms_mean":
        return f"{value:.2f}"
    return f"{value:.1f}"


def markdown_table(summary: Mapping[str, Any]) -> str:
    """The summary ``{"agents": {...}}`` as a markdown table, one row per agent; accuracies are fractions.

    Examples:
        >>> s = {"agents": {"lowres": {"n": 2, "accuracy": 0.5, "accuracy_fine": 0.0, "accuracy_coarse": 1.0,
        ...      "latency_s_mean": 0.01, "visual_tokens_mean": 256, "forward_passes_mean": 5,
        ...      "tool_calls_mean": 0}}}
        >>> print(markdown_table(s).splitlines()[2])
        | lowres | 2 | 0.500 | 0.000 | 1.000 | 0.0100 | 256.0 | 5.0 | 0.0 | - | - |
    """
    header = "| " + " | ".join(title for title, _ in _COLUMNS) + " |"
    rule = "|" + "|".join("---" if key is None else "---:" for _, key in _COLUMNS) + "|"
    rows = [header, rule]
    for name, stats in summary["agents"].items():
        cells = [name] + [_cell(key, stats.get(key)) for _, key in _COLUMNS[1:]]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def budget_agents(names: list[str], prefix: str = "plain") -> dict[str, int]:
    """``{name: budget}`` for agents named ``prefix@budget``, sorted by budget.

    Examples:
        >>> budget_agents(["lowres", "plain@1024", "plain@256"])
        {'plain@256': 256, 'plain@1024': 1024}
    """
    found = {}
    for name in names:
        head, sep, arg = name.partition("@")
        if sep and head == prefix and arg.isdigit():
            found[name] = int(arg)
    return dict(sorted(found.items(), key=lambda item: item[1]))


def plot_accuracy_by_budget(summary: Mapping[str, Any], path: str | Path, title: str = "") -> Path | None:
    """Plot fine and coarse accuracy of the ``plain@budget`` agents against the visual-token budget (log2 axis).

    Args:
        summary: the run summary.
        path: the PNG to write.
        title: the plot title (default: "Accuracy by visual-token budget").

    Returns:
        The path, or None when fewer than two budget agents are in the summary (nothing is written).
    """
    agents = summary["agents"]
    budgets = budget_agents(list(agents))
    if len(budgets) < 2:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)  # render off-screen, without pyplot's global state
    ax = fig.add_subplot()
    for key, label, marker in (("accuracy_fine", "fine", "o"), ("accuracy_coarse", "coarse", "s")):
        points = [(b, agents[name][key]) for name, b in budgets.items() if agents[name][key] is not None]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(budgets.values()))
    ax.set_xticklabels([str(b) for b in budgets.values()])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("visual-token budget (max tokens, log2 scale)")
    ax.set_ylabel("accuracy")
    ax.set_title(title or "Accuracy by visual-token budget")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    logger.info("wrote %s", out)
    return out
