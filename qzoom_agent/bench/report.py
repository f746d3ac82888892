"""Reports of a comparison run: the markdown summary table and the plots (accuracy by budget, accuracy against
throughput and latency, tool calls per question)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
CALLS_CAP = 6  # tool_calls.png groups this many calls per question and more in one bar

_COLUMNS = (
    ("agent", None),
    ("n", "n"),
    ("accuracy", "accuracy"),
    ("fine", "accuracy_fine"),
    ("coarse", "accuracy_coarse"),
    ("latency_s mean", "latency_s_mean"),
    ("external calls", "external_calls_mean"),
    ("zooms", "zooms_mean"),
    ("forward passes", "forward_passes_mean"),
    ("layer-tokens", "layer_tokens_mean"),
    ("vision encodes", "vision_encodes_mean"),
    ("visual tokens", "visual_tokens_mean"),
    ("generated tokens", "generated_tokens_mean"),
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
    if key in ("zooms_mean", "external_calls_mean", "vision_encodes_mean"):
        return f"{value:.2f}"
    if key == "layer_tokens_mean":
        return f"{value:,.0f}"
    return f"{value:.1f}"


def markdown_table(summary: Mapping[str, Any]) -> str:
    """The summary ``{"agents": {...}}`` as a markdown table, one row per agent; accuracies are fractions, every
    cost a mean per question ("-" where an agent does not count it).

    Examples:
        >>> s = {"agents": {"lowres": {"n": 2, "accuracy": 0.5, "accuracy_fine": 0.0, "accuracy_coarse": 1.0,
        ...      "latency_s_mean": 0.01, "visual_tokens_mean": 256, "forward_passes_mean": 5,
        ...      "external_calls_mean": 0, "layer_tokens_mean": 12345.0}}}
        >>> print(markdown_table(s).splitlines()[2])
        | lowres | 2 | 0.500 | 0.000 | 1.000 | 0.0100 | 0.00 | - | 5.0 | 12,345 | - | 256.0 | - | - |
    """
    header = "| " + " | ".join(title for title, _ in _COLUMNS) + " |"
    rule = "|" + "|".join("---" if key is None else "---:" for _, key in _COLUMNS) + "|"
    rows = [header, rule]
    for name, stats in summary["agents"].items():
        cells = [name] + [_cell(key, stats.get(key)) for _, key in _COLUMNS[1:]]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def family_table(summary: Mapping[str, Any], key: str = "accuracy_by_family") -> str | None:
    """A per-family figure (columns) for each agent (rows) as markdown; None when no agent has one.

    Args:
        summary: :func:`metrics.summarize` output.
        key: the per-agent ``{family: value}`` field, ``accuracy_by_family`` or ``roi_hit_by_family``; agents
            without values for it are left out.

    Examples:
        >>> s = {"agents": {"lowres": {"accuracy_by_family": {"read": 0.25, "color": 1.0}}}}
        >>> print(family_table(s))
        | agent | color | read |
        |---|---:|---:|
        | lowres | 1.000 | 0.250 |
    """
    families = sorted({f for stats in summary["agents"].values() for f in stats.get(key) or {}})
    if not families:
        return None
    rows = ["| agent | " + " | ".join(families) + " |", "|---|" + "---:|" * len(families)]
    for name, stats in summary["agents"].items():
        by = stats.get(key) or {}
        if by:
            rows.append(f"| {name} | " + " | ".join(_cell("accuracy", by.get(f)) for f in families) + " |")
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


def axes(size: tuple[float, float]) -> Any:
    """One set of axes on a new figure, rendered off-screen without pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig.add_subplot()


def finish(ax: Any, title: str, path: str | Path) -> Path:
    """Title, grid and legend on ``ax``, then its figure written to ``path`` as a PNG."""
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.figure.tight_layout()
    out = Path(path)
    ax.figure.savefig(out, dpi=120)
    logger.info("wrote %s", out)
    return out


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
    ax = axes((6, 4))
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
    return finish(ax, title or "Accuracy by visual-token budget", path)


def qzoom_agents(names: list[str]) -> list[str]:
    """The gated Q-Zoom agents (``qzoom`` and ``qzoom@N``) among ``names``, in order.

    Examples:
        >>> qzoom_agents(["plain@256", "qzoom@576", "qzoom", "qzoom-always@576"])
        ['qzoom@576', 'qzoom']
    """
    return [n for n in names if n.partition("@")[0] == "qzoom"]


def _qps(point: Mapping[str, Any]) -> str:
    return "-" if point["throughput_qps"] is None else f"{point['throughput_qps']:.2f}"


def throughput(stats: Mapping[str, Any]) -> float | None:
    """Questions per second at batch size 1 (1 / mean latency); None without a positive latency."""
    latency = stats.get("latency_s_mean") or 0.0
    return 1.0 / latency if latency > 0 else None


def _point(name: str, stats: Mapping[str, Any], key: str) -> dict[str, Any]:
    return {"agent": name, key: stats.get(key), "throughput_qps": throughput(stats),
            "visual_tokens_mean": stats.get("visual_tokens_mean")}


def matched_accuracy(summary: Mapping[str, Any], key: str = "accuracy", tolerance: float = 0.01) -> dict | None:
    """Q-Zoom against the plain model's peak: the fastest gated agent within ``tolerance`` of the peak ``key``.

    The plain peak is the best ``plain@N`` agent (the faster one on ties). Throughput is questions per second at
    batch size 1 (1 / mean latency), so the speed-up compares agents timed side by side in one run.

    Returns:
        None without ``plain@N`` or gated Q-Zoom agents; else ``{"key", "tolerance", "plain_peak", "qzoom_best",
        "matched", "speedup"}``, where ``matched`` (and ``speedup``, its throughput over the peak's) is None when no
        Q-Zoom agent comes within the tolerance.

    Examples:
        >>> agents = {"plain@256": {"accuracy": 0.5, "latency_s_mean": 0.1},
        ...           "plain@4096": {"accuracy": 0.8, "latency_s_mean": 1.0},
        ...           "qzoom@576": {"accuracy": 0.795, "latency_s_mean": 0.25}}
        >>> m = matched_accuracy({"agents": agents})
        >>> m["matched"]["agent"], round(m["speedup"], 2)
        ('qzoom@576', 4.0)
    """
    agents = summary["agents"]
    plain = [n for n in budget_agents(list(agents)) if agents[n].get(key) is not None]
    gated = [n for n in qzoom_agents(list(agents)) if agents[n].get(key) is not None]
    if not plain or not gated:
        return None

    def speed(name: str) -> float:
        return throughput(agents[name]) or 0.0

    peak = max(plain, key=lambda n: (agents[n][key], speed(n)))
    best = max(gated, key=lambda n: (agents[n][key], speed(n)))
    close = [n for n in gated if agents[n][key] >= agents[peak][key] - tolerance - 1e-12]
    matched = max(close, key=speed) if close else None
    return {
        "key": key, "tolerance": tolerance, "plain_peak": _point(peak, agents[peak], key),
        "qzoom_best": _point(best, agents[best], key),
        "matched": _point(matched, agents[matched], key) if matched else None,
        "speedup": speed(matched) / speed(peak) if matched and speed(peak) > 0 else None,
    }


def findings(summary: Mapping[str, Any]) -> list[str]:
    """Markdown sections beyond the table, from the summary's ``matched`` entries (`matched_accuracy` per key, set
    when the run has ``plain@N`` and gated Q-Zoom agents) and its ``gate`` entries (`metrics.gate_pairs`); empty
    without either."""
    lines = []
    for key, m in (summary.get("matched") or {}).items():
        if m is None:
            continue
        peak, best = m["plain_peak"], m["qzoom_best"]
        line = (f"- {key}: plain peak {peak[key]:.3f} ({peak['agent']}, {_qps(peak)} q/s); "
                f"best Q-Zoom {best[key]:.3f} ({best['agent']}, {_qps(best)} q/s); ")
        if m["matched"]:
            line += (f"within {m['tolerance']:.2f} of the peak: {m['matched']['agent']} at "
                     f"{m['speedup']:.2f}x the peak's throughput")
        else:
            line += f"no Q-Zoom agent within {m['tolerance']:.2f} of the peak"
        lines.append(line)
    if lines:
        lines = ["## Matched accuracy", "", *lines]
    gate = summary.get("gate") or {}
    if gate:
        lines += ["", "## Gate"] if lines else ["## Gate"]
        lines.append("")
        for name, g in gate.items():
            value = "n/a (one class only)" if g["gate_auc"] is None else f"{g['gate_auc']:.3f}"
            lines.append(f"- {name}: AUC {value} for \"zoom helps\" over {g['scored']} questions that one of the "
                         f"two answers gets right ({g['zoom_helps']} where only the zoom does)")
    return lines


def plot_pareto(summary: Mapping[str, Any], path: str | Path, title: str = "", key: str = "accuracy") -> Path | None:
    """Plot ``key`` against throughput (questions/s, log axis) for the ``plain@N``, gated ``qzoom@N`` and
    external-crop ``deepeyes@N`` agents.

    Each point is labelled with its global-view budget; the better corner is top right.

    Returns:
        The path, or None when the run has fewer than two such agents (nothing is written).
    """
    agents = summary["agents"]
    series = {"plain": list(budget_agents(list(agents))), "Q-Zoom (gated)": qzoom_agents(list(agents)),
              "external crop (DeepEyes)": [n for n in agents if n.partition("@")[0] == "deepeyes"]}
    points = {label: [(n, agents[n]) for n in names if agents[n].get(key) is not None and throughput(agents[n])]
              for label, names in series.items()}
    if sum(len(v) for v in points.values()) < 2:
        return None
    ax = axes((6.5, 4.5))
    for (label, pts), marker, offset in zip(points.items(), ("o", "*", "^"), ((4, -11), (4, 5), (-14, 5)),
                                            strict=True):
        if not pts:
            continue
        pts = sorted(pts, key=lambda p: throughput(p[1]))
        xs = [throughput(st) for _, st in pts]
        ys = [st[key] for _, st in pts]
        ax.plot(xs, ys, marker=marker, markersize=9 if marker == "*" else 6, label=label)
        for (name, _), x, y in zip(pts, xs, ys, strict=True):
            ax.annotate(name.partition("@")[2] or name, (x, y), textcoords="offset points", xytext=offset,
                        fontsize=8, color=ax.lines[-1].get_color())  # plain below, Q-Zoom above: no overlap
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("throughput (questions/s, batch 1, log scale)")
    ax.set_ylabel(key.replace("_", " "))
    return finish(ax, title or f"{key.replace('_', ' ')} against throughput", path)


def plot_accuracy_latency(summary: Mapping[str, Any], path: str | Path, title: str = "",
                          key: str = "accuracy") -> Path | None:
    """One point per agent: ``key`` against mean latency per question (log axis); the better corner is top left.

    Returns:
        The path, or None when fewer than two agents have both figures (nothing is written).
    """
    points = [(name, st["latency_s_mean"], st[key]) for name, st in summary["agents"].items()
              if st.get(key) is not None and (st.get("latency_s_mean") or 0) > 0]
    if len(points) < 2:
        return None
    ax = axes((6.5, 4.5))
    for name, x, y in points:
        external = (summary["agents"][name].get("external_calls_mean") or 0) > 0
        ax.plot([x], [y], marker="^" if external else "*" if name.startswith("qzoom") else "o", linestyle="",
                markersize=9, label=name)  # the legend names the points: labels beside them overlap
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("mean latency per question (s, batch 1, log scale)")
    ax.set_ylabel(key.replace("_", " "))
    return finish(ax, title or f"{key.replace('_', ' ')} against latency", path)


def plot_tool_calls(records: list[Mapping[str, Any]], agents: list[str], path: str | Path,
                    title: str = "") -> Path | None:
    """The distribution of tool calls (external calls, or internal zooms for Q-Zoom agents and crops probed by
    training-free searches) per question: one group of bars per count, counts from `CALLS_CAP` up in one group, one
    bar per agent that made any.

    Returns:
        The path, or None when no agent made a call or a zoom (nothing is written).
    """
    def calls(r: Mapping[str, Any]) -> int:
        return int(r.get("tool_calls") or 0) or int(r.get("zooms") or 0)

    per_agent = {a: [calls(r) for r in records if r["agent"] == a] for a in agents}
    per_agent = {a: v for a, v in per_agent.items() if v and any(v)}
    if not per_agent:
        return None
    top = min(CALLS_CAP, max(max(v) for v in per_agent.values()))
    ax = axes((6.5, 4.0))
    width = 0.8 / len(per_agent)
    for i, (name, values) in enumerate(per_agent.items()):
        shares = [sum(min(v, top) == k for v in values) / len(values) for k in range(top + 1)]
        ax.bar([k - 0.4 + width * (i + 0.5) for k in range(top + 1)], shares, width=width, label=name)
    ax.set_xticks(range(top + 1), [str(k) for k in range(top)] + [f"{top}+" if top == CALLS_CAP else str(top)])
    ax.set_xlabel("tool calls (or internal zooms) per question")
    ax.set_ylabel("share of questions")
    return finish(ax, title or "Tool calls per question", path)
