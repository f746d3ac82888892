"""`qzoom-agent sweep`: Pareto curves of the plain model and of Q-Zoom over visual-token budgets, on one benchmark or
a group of them, and the paper's two headline numbers.

For each benchmark, one resumable `compare` run under ``OUT/<task>`` holds ``plain@B`` and ``qzoom@B`` for every
budget ``B`` (plus any ``--agents``), interleaved question by question, so every ratio is measured side by side.
A group of benchmarks is summarised as the paper does (Q-Zoom's ``03_summarize_tradeoff.py``):

- accuracy: the mean of the tasks' accuracies (each task's benchmark score, in points);
- throughput: samples per second at batch size 1 around the whole answer after a warm-up, per task
  ``n / sum(latency)``, combined as a harmonic mean weighted by each task's full official size (so a 100-question
  sample of a 5,000-question task weighs as the full task would).

Headline numbers, at the plain model's peak group accuracy (``plain_peak``):

- ``speedup``: the group throughput of the fastest Q-Zoom point whose accuracy is equal or better (within
  ``--tolerance`` points) over the peak's. None when no Q-Zoom point reaches it.
- ``gain``: the best Q-Zoom accuracy minus the plain peak, in points.

Outputs in OUT: ``sweep.json`` (per task and group points, the headline numbers), ``sweep.md`` and
``sweep_pareto.png`` (group accuracy against group throughput, both curves).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import registry, report, rundir, sources
from .runner import RUN, CompareConfig, run_compare

logger = logging.getLogger(__name__)

DEFAULT_BUDGETS = "256,576,1024,2048,4096"
SWEEP_JSON, SWEEP_MD, SWEEP_PNG = "sweep.json", "sweep.md", "sweep_pareto.png"
SERIES = ("plain", "qzoom")


@dataclass
class SweepConfig:
    """A validated sweep.

    Attributes:
        benches: ``--bench`` values, one `compare` run each (``zoomworld:hr``, ``vstar:DIR``, ...).
        budgets: visual-token budgets; each gives ``plain@B`` and ``qzoom@B``.
        extra_agents: further agents run alongside (e.g. ``deepeyes@576``), reported but not on the curves.
        out: output directory (one sub-folder per benchmark).
        n: questions per benchmark (None: 100 ZoomWorld questions, or every question of a real benchmark).
        seed: picks the questions.
        tolerance: accuracy points below the plain peak a Q-Zoom point may be and still count as matched.
        base: the `compare` settings shared by every run (model, device, preset, ...).
    """

    benches: list[str]
    budgets: list[int]
    extra_agents: list[str]
    out: str
    n: int | None = None
    seed: int = 0
    tolerance: float = 0.0
    base: dict[str, Any] | None = None

    @property
    def agents(self) -> list[str]:
        return [f"{s}@{b}" for s in SERIES for b in self.budgets] + self.extra_agents


def task_dir_name(bench: str) -> str:
    """The sub-folder of one benchmark: its task name (``vstar``) or ``zoomworld-hr``."""
    name, _, rest = bench.partition(":")
    return f"zoomworld-{rest}" if name == sources.ZOOMWORLD else name


def task_point(stats: Mapping[str, Any]) -> dict[str, float] | None:
    """One agent on one task, from its entry in the task's `compare` summary: accuracy (mean score, in points),
    samples per second (``n / sum(latency)``, i.e. 1 / mean latency) and mean visual tokens; None without
    questions.

    Examples:
        >>> task_point({"accuracy": 0.75, "latency_s_mean": 0.5, "visual_tokens_mean": 300.0, "n": 4})
        {'accuracy': 75.0, 'sps': 2.0, 'visual_tokens': 300.0, 'n': 4}
    """
    if not stats.get("n"):
        return None
    return {"accuracy": 100.0 * stats["accuracy"], "sps": report.throughput(stats) or float("inf"),
            "visual_tokens": stats["visual_tokens_mean"], "n": stats["n"]}


def group_point(points: Mapping[str, Mapping[str, float]], weights: Mapping[str, float]) -> dict[str, float] | None:
    """Tasks combined: mean accuracy, and throughput as the harmonic mean of the tasks' samples per second
    weighted by ``weights`` (each task's full size). None when a task has no point.

    Examples:
        >>> group_point({"a": {"accuracy": 80.0, "sps": 2.0, "visual_tokens": 100.0},
        ...              "b": {"accuracy": 60.0, "sps": 1.0, "visual_tokens": 300.0}}, {"a": 100, "b": 300})
        {'accuracy': 70.0, 'sps': 1.1428571428571428, 'visual_tokens': 200.0}
    """
    if not points or any(p is None for p in points.values()):
        return None
    total = sum(weights[t] for t in points)
    return {"accuracy": sum(p["accuracy"] for p in points.values()) / len(points),
            "sps": total / sum(weights[t] / p["sps"] for t, p in points.items()),
            "visual_tokens": sum(p["visual_tokens"] for p in points.values()) / len(points)}


def headline(group: Mapping[str, Mapping[str, float] | None], tolerance: float = 0.0) -> dict[str, Any] | None:
    """The paper's two numbers from group points keyed by agent name (``plain@B``, ``qzoom@B``).

    Returns:
        None without both series; else ``{"plain_peak", "qzoom_best", "matched", "speedup", "gain"}``: the agents
        (with their points) and the two numbers (``speedup`` None when no Q-Zoom point is within ``tolerance``).

    Examples:
        >>> pts = {"plain@576": {"accuracy": 70.0, "sps": 4.0}, "plain@4096": {"accuracy": 75.0, "sps": 1.0},
        ...        "qzoom@576": {"accuracy": 76.0, "sps": 3.0}, "qzoom@4096": {"accuracy": 77.0, "sps": 0.8}}
        >>> h = headline(pts)
        >>> h["matched"], h["speedup"], h["gain"]
        ('qzoom@576', 3.0, 2.0)
    """
    def series(prefix: str) -> list[str]:
        return [n for n, p in group.items() if p is not None and n.partition("@")[0] == prefix]

    plain, gated = series("plain"), series("qzoom")
    if not plain or not gated:
        return None
    peak = max(plain, key=lambda n: (group[n]["accuracy"], group[n]["sps"]))
    best = max(gated, key=lambda n: (group[n]["accuracy"], group[n]["sps"]))
    close = [n for n in gated if group[n]["accuracy"] >= group[peak]["accuracy"] - tolerance - 1e-9]
    matched = max(close, key=lambda n: group[n]["sps"]) if close else None
    return {"plain_peak": peak, "qzoom_best": best, "matched": matched, "tolerance": tolerance,
            "speedup": group[matched]["sps"] / group[peak]["sps"] if matched else None,
            "gain": group[best]["accuracy"] - group[peak]["accuracy"],
            "points": {n: dict(group[n]) for n in {peak, best, matched} - {None}}}


def _weight(run_dir: Path, n: int) -> float:
    """A task's weight in the harmonic mean: its full official size (run.json), else the questions run."""
    run = json.loads((run_dir / RUN).read_text(encoding="utf-8"))
    return float(run.get("full_size") or n)


def summarize_sweep(cfg: SweepConfig, summaries: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per-task points, group points and headline numbers from each benchmark's `compare` summary
    (``summaries[bench]``, as `run_compare` returns it)."""
    tasks: dict[str, dict[str, Any]] = {}
    weights: dict[str, float] = {}
    for bench in cfg.benches:
        name = task_dir_name(bench)
        stats = summaries[bench]["agents"]
        tasks[name] = {a: task_point(stats[a]) for a in cfg.agents}
        weights[name] = _weight(Path(cfg.out) / name, max((stats[a]["n"] for a in cfg.agents), default=0))
    group = {a: group_point({t: pts[a] for t, pts in tasks.items()}, weights) for a in cfg.agents}
    return {"benches": cfg.benches, "budgets": cfg.budgets, "weights": weights, "tasks": tasks, "group": group,
            "headline": headline(group, cfg.tolerance)}


def markdown(summary: Mapping[str, Any]) -> str:
    """The sweep as a table (group accuracy, per-task accuracy, group throughput, visual tokens) and the headline."""
    tasks = list(summary["tasks"])
    head = ["agent", "accuracy (mean)", *tasks, "throughput (samples/s)", "visual tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for agent, g in summary["group"].items():
        cells = [f"{summary['tasks'][t][agent]['accuracy']:.1f}" if summary["tasks"][t][agent] else "-"
                 for t in tasks]
        lines.append(f"| {agent} | {g['accuracy']:.1f} | " + " | ".join(cells) + f" | {g['sps']:.3f} | "
                     f"{g['visual_tokens']:.0f} |" if g else f"| {agent} | - |" + " - |" * (len(head) - 2))
    h = summary.get("headline")
    if h:
        lines += ["", f"- plain peak: {h['plain_peak']} ({h['points'][h['plain_peak']]['accuracy']:.1f}); best Q-Zoom:"
                      f" {h['qzoom_best']} ({h['points'][h['qzoom_best']]['accuracy']:.1f}): gain "
                      f"{h['gain']:+.1f} points over the plain peak",
                  f"- speed-up at matched accuracy (within {h['tolerance']:.1f} points): " +
                  (f"{h['matched']} at {h['speedup']:.2f}x the peak's throughput" if h["matched"] else
                   "no Q-Zoom point reaches the plain peak")]
    return "\n".join(lines) + "\n"


def plot(summary: Mapping[str, Any], path: Path) -> Path | None:
    """Group accuracy against group throughput (log x), one curve per series, points labelled by budget."""
    ax = report.axes((6.5, 4.5))
    drawn = 0
    for prefix, label, marker in (("plain", "plain model", "o"), ("qzoom", "Q-Zoom (gated)", "*")):
        pts = sorted(((int(n.partition("@")[2]), g) for n, g in summary["group"].items()
                      if g and n.partition("@")[0] == prefix and n.partition("@")[2].isdigit()),
                     key=lambda p: p[1]["sps"])
        if not pts:
            continue
        ax.plot([g["sps"] for _, g in pts], [g["accuracy"] for _, g in pts], marker=marker, label=label,
                markersize=9 if marker == "*" else 6)
        for budget, g in pts:
            ax.annotate(str(budget), (g["sps"], g["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        drawn += len(pts)
    if drawn < 2:
        return None
    ax.set_xscale("log")
    ax.set_xlabel("throughput (samples/s, batch 1, size-weighted harmonic mean; log scale)")
    ax.set_ylabel("accuracy (mean over tasks, points)")
    return report.finish(ax, f"Accuracy against throughput: {', '.join(summary['tasks'])}", path)


def run_sweep(cfg: SweepConfig) -> dict[str, Any]:
    """Run (or resume) every benchmark's `compare` run, then write sweep.json, sweep.md and the Pareto plot.

    Works under ``accelerate launch`` like `compare`: each run is sharded; the main process writes the sweep.
    """
    base = dict(cfg.base or {})
    summaries = {}
    for bench in cfg.benches:
        compare = CompareConfig(bench=bench, agents=cfg.agents, n=cfg.n, seed=cfg.seed,
                                out=str(Path(cfg.out) / task_dir_name(bench)))
        summaries[bench] = run_compare(replace(compare, **base))
    summary = summarize_sweep(cfg, summaries)
    if rundir.current_shard().main:
        out = Path(cfg.out)
        (out / SWEEP_JSON).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        (out / SWEEP_MD).write_text(markdown(summary), encoding="utf-8")
        plot(summary, out / SWEEP_PNG)
    return summary


# ---- command line ------------------------------------------------------------------------------------------------
BASE_OPTIONS = ("model", "device", "preset", "max_new_tokens", "policy", "crop_policy")


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    """Validate the parsed `sweep` options (benches are checked in form; their data is read by each run).

    Raises:
        ValueError: a bad bench, budget list, agent name, n or tolerance.
    """
    benches = [sources.check_bench(b.strip()) for b in str(args.bench).split(",") if b.strip()]
    if not benches:
        raise ValueError("no benchmark given; pass --bench vstar:DIR[,hrbench4k:DIR...]")
    if len({task_dir_name(b) for b in benches}) < len(benches):
        raise ValueError("a task appears twice in --bench; run one source per task")
    budgets = registry.parse_budgets(args.budgets)
    extra = [a.strip() for a in str(args.agents or "").split(",") if a.strip()]
    for name in extra:
        registry.check_agent_name(name)
    if args.n is not None and args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    if args.tolerance < 0:
        raise ValueError(f"--tolerance must be >= 0 points, got {args.tolerance}")
    cfg = SweepConfig(benches, budgets, extra, str(args.out), args.n, args.seed, args.tolerance,
                      {k: getattr(args, k) for k in BASE_OPTIONS if getattr(args, k) is not None})
    repeated = sorted({a for a in cfg.agents if cfg.agents.count(a) > 1})
    if repeated:
        raise ValueError(f"agents repeat: {', '.join(repeated)}; --agents adds agents beyond plain@B and qzoom@B")
    return cfg


def add_sweep_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``sweep`` subcommand to ``subparsers``."""
    p = subparsers.add_parser("sweep", help="Pareto curves of the plain model and Q-Zoom over token budgets",
                              description="Run plain@B and qzoom@B for every budget on each benchmark (resumable "
                              "compare runs), then report the group Pareto curves, the speed-up at matched accuracy "
                              "and the gain over the plain model's peak.")
    p.add_argument("--bench", required=True, help="one or more benchmarks, comma-separated: vstar:DIR,hrbench4k:DIR")
    p.add_argument("--budgets", default=DEFAULT_BUDGETS, help=f"visual-token budgets (default {DEFAULT_BUDGETS})")
    p.add_argument("--agents", default="", help="further agents run alongside, e.g. deepeyes@576")
    p.add_argument("--out", required=True, help="output directory; rerun with the same arguments to resume")
    p.add_argument("--n", type=int, default=None, help="questions per benchmark (default: all; 100 on ZoomWorld)")
    p.add_argument("--seed", type=int, default=0, help="picks the questions when --n is below a benchmark's size")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="accuracy points below the plain peak that still count as matched (default 0)")
    p.add_argument("--model", default=None, help="model directory or bundled name (default zoomworld-tiny)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--preset", default=None, help="RoI and gate thresholds: auto (default), none or a preset name")
    p.add_argument("--max-new-tokens", type=int, default=None, help="answer budget (default: each benchmark's own)")
    p.add_argument("--policy", default=None, help=argparse.SUPPRESS)
    p.add_argument("--crop-policy", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the sweep summary as one JSON object")
    p.set_defaults(func=cmd_sweep)
    return p


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run `qzoom-agent sweep`; prints the table and headline (or JSON); returns 0."""
    summary = run_sweep(config_from_args(args))
    if rundir.current_shard().main:
        print(json.dumps(summary) if args.json else markdown(summary))  # noqa: T201 - CLI output
    return 0
