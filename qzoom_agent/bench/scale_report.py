"""`bench-scale` results: rows of medians, the speed-up ratios, and scale.json, scale.md and bench_scale.png.

Every latency is a median in seconds. A row (one attention implementation, one budget) holds:

* ``plain_prefill_s``, ``plain_answer_s``: the model's own forward and ``generate`` (N new tokens).
* ``plain_engine_s``: the plain model's answer on this library's engine (prefill, all layers, the same decode loop
  as Q-Zoom's, no heads): the like-for-like baseline, so a ratio against it holds only the mechanism's effect.
* ``qzoom_rate0_s``, ``qzoom_rate1_s``: the whole Q-Zoom answer without and with the RoI pass; ``qzoom_rate05_s``
  is their mean (a gate that fires on half the questions), not a measurement.
* splits: ``rate0_perceive_s`` (layers < K and the gate), ``rate0_look_s`` (layers K..L-1), ``rate0_decode_s``;
  ``rate1_perceive_s`` (layers < K, gate, twig and box rule), ``rate1_zoom_s`` (crop, encode, re-prefill),
  ``rate1_decode_s``.
* derived: ``decode_per_token_s`` (rate 0's decode over its single-token steps), ``gate_extra_s`` (the gated
  prefill, perceive + look, minus the plain prefill), ``twig_extra_s`` (rate 1's perceive minus rate 0's),
  ``twig_gate_extra_s`` (their sum: the heads' cost against the plain prefill of the same input),
  ``roi_pass_extra_s`` (rate 1 minus rate 0: what a zoom adds).

Ratios: ``speedup_engine`` is the plain answer on the same engine at the plain budget over the Q-Zoom answer at the
Q-Zoom budget (the paper's matched point on Qwen2.5-VL-7B is Q-Zoom Max-576 against the baseline at Max-4096): the
bound the mechanism puts on the speed-up. ``speedup`` is the same against HF ``generate`` (the paper's baseline
runs it), which also holds the difference between the two decoding loops. ``overhead`` is Q-Zoom over the plain
engine answer at the same budget.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

JSON, MARKDOWN, PNG = "scale.json", "scale.md", "bench_scale.png"
RATES = (("rate0", "qzoom_rate0_s"), ("rate05", "qzoom_rate05_s"), ("rate1", "qzoom_rate1_s"))
# (column, key, unit scale) of the markdown table; latencies in milliseconds
COLUMNS = (
    ("budget", "budget", None), ("seq", "prompt_tokens", None), ("RoI tok", "roi_tokens", None),
    ("prefill ms", "plain_prefill_s", 1e3), ("decode ms/tok", "decode_per_token_s", 1e3),
    ("gate+twig ms", "twig_gate_extra_s", 1e3), ("plain generate ms", "plain_answer_s", 1e3),
    ("plain engine ms", "plain_engine_s", 1e3),
    ("Q-Zoom r=0 ms", "qzoom_rate0_s", 1e3), ("r=0.5 ms", "qzoom_rate05_s", 1e3), ("r=1 ms", "qzoom_rate1_s", 1e3),
)


def make_row(budget: int, grid: tuple[int, int], image_size: tuple[int, int], box, medians: dict[str, dict],
             new_tokens: int, totals: dict[str, list[float]] | None = None) -> dict[str, Any]:
    """One row from the medians of the variants (``{variant: {split: seconds}}``) at ``budget``; ``totals``, each
    round's total per variant, is kept as ``rounds_s`` (to judge the noise)."""
    r0, r1 = medians["qzoom_rate0"], medians["qzoom_rate1"]
    row: dict[str, Any] = {
        "budget": budget, "grid": list(grid), "image_size": list(image_size), "roi_box": list(box.as_tuple()),
        "roi_tokens": int(r1["roi_tokens"]), "prompt_tokens": int(r0["length"]),
        "spliced_tokens": int(r1["length"]), "new_tokens": new_tokens,
        "plain_prefill_s": medians["plain_prefill"]["total"], "plain_answer_s": medians["plain_answer"]["total"],
        "plain_engine_s": medians["plain_engine"]["total"],
        "qzoom_rate0_s": r0["total"], "qzoom_rate1_s": r1["total"], "qzoom_rate05_s": (r0["total"] + r1["total"]) / 2,
        "rate0_perceive_s": r0["perceive"], "rate0_look_s": r0["finish"], "rate0_decode_s": r0["decode"],
        "rate1_perceive_s": r1["perceive"], "rate1_zoom_s": r1["finish"], "rate1_decode_s": r1["decode"],
    }
    row["decode_per_token_s"] = r0["decode"] / max(1.0, r0["decode_steps"])
    row["gated_prefill_s"] = r0["perceive"] + r0["finish"]
    row["gate_extra_s"] = row["gated_prefill_s"] - row["plain_prefill_s"]
    row["twig_extra_s"] = r1["perceive"] - r0["perceive"]
    row["twig_gate_extra_s"] = row["gate_extra_s"] + row["twig_extra_s"]
    row["roi_pass_extra_s"] = r1["total"] - r0["total"]
    if totals is not None:
        row["rounds_s"] = totals
    return row


def _machine(device: torch.device) -> dict[str, Any]:
    import transformers

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def new_result(cfg, spec, device: torch.device, dtype: torch.dtype, attns: list[str], skipped: dict[str, str],
               params: dict[str, int]) -> dict[str, Any]:
    """The result skeleton: the run's settings and the machine; rows are appended as budgets finish."""
    from dataclasses import asdict

    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": {**asdict(cfg), "budgets": list(cfg.budgets)},
        "arch": {"name": spec.arch, "size": spec.size, "twig_K": spec.twig_K, "twig_T": spec.twig_T,
                 "text_config": spec.config["text_config"], "vision_config": spec.config["vision_config"],
                 "parameters": params, "weights": "random (latency depends on shapes, not on weight values)"},
        "device": str(device), "dtype": str(dtype).removeprefix("torch."), "attention": attns,
        "attention_skipped": skipped, "machine": _machine(device), "rows": [], "ratios": {}, "error": None,
    }


def _pick(budgets: list[int], wanted: int, fallback: int) -> int:
    return wanted if wanted in budgets else fallback


def ratios(rows: list[dict[str, Any]], qzoom_budget: int, plain_budget: int) -> dict[str, Any]:
    """Speed-ups and same-budget overheads of one attention implementation's rows.

    The Q-Zoom budget falls back to the smallest measured one and the plain budget to the largest when the asked
    ones were not measured (``*_budget_used`` says which were used).
    """
    by = {r["budget"]: r for r in rows}
    budgets = sorted(by)
    if not budgets:
        return {}
    q = _pick(budgets, qzoom_budget, budgets[0])
    p = _pick(budgets, plain_budget, budgets[-1])
    out: dict[str, Any] = {"qzoom_budget_used": q, "plain_budget_used": p,
                           "speedup_engine": {name: by[p]["plain_engine_s"] / by[q][key] for name, key in RATES},
                           "speedup": {name: by[p]["plain_answer_s"] / by[q][key] for name, key in RATES}}
    out["speedup_by_plain_budget"] = {
        str(b): {name: by[b]["plain_engine_s"] / by[q][key] for name, key in RATES} for b in budgets if b >= q}
    out["overhead_same_budget"] = {
        str(b): {name: by[b][key] / by[b]["plain_engine_s"] for name, key in RATES} for b in budgets}
    return out


def finish(result: dict[str, Any]) -> None:
    """Fill ``result["ratios"]``, per attention implementation, from its rows."""
    cfg = result["config"]
    for attn in result["attention"]:
        rows = [r for r in result["rows"] if r["attn"] == attn]
        result["ratios"][attn] = ratios(rows, cfg["qzoom_budget"], cfg["plain_budget"])


def write_json(result: dict[str, Any], out: Path) -> Path:
    """Write ``scale.json`` (atomically: a crash mid-write keeps the previous one)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (JSON + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out / JSON)
    return out / JSON


def _cell(value: Any, scale: float | None) -> str:
    if scale is None:
        return str(value)
    return f"{value * scale:.1f}"


def markdown(result: dict[str, Any]) -> str:
    """The report: settings, one table per attention implementation, and the ratios."""
    a, cfg = result["arch"], result["config"]
    gpu = result["machine"].get("gpu")
    lines = [f"# bench-scale: {a['name']} ({a['size']}), K={a['twig_K']}, T={a['twig_T']}", "",
             f"{result['device']}{f' ({gpu})' if gpu else ''}, {result['dtype']}, torch {result['machine']['torch']}, "
             f"{result['machine']['torch_threads']} threads; {cfg['rounds']} rounds after a warm-up, medians; "
             f"{cfg['new_tokens']} new tokens; RoI = the centred half-width, half-height box; source image "
             f"{cfg['source_scale']}x the view; random weights."]
    for name, why in result["attention_skipped"].items():
        lines.append(f"\n{name} skipped: {why}.")
    for attn in result["attention"]:
        rows = [r for r in result["rows"] if r["attn"] == attn]
        lines += ["", f"## {attn}", "", "| " + " | ".join(c for c, _, _ in COLUMNS) + " |",
                  "|" + "---:|" * len(COLUMNS)]
        lines += ["| " + " | ".join(_cell(r[key], s) for _, key, s in COLUMNS) + " |" for r in rows]
        lines += _ratio_lines(result["ratios"].get(attn) or {})
    if result.get("error"):
        lines += ["", f"Stopped: {result['error']}."]
    return "\n".join(lines) + "\n"


def _ratio_lines(rat: dict[str, Any]) -> list[str]:
    if not rat:
        return []
    q, p = rat["qzoom_budget_used"], rat["plain_budget_used"]
    s, g = rat["speedup_engine"], rat["speedup"]
    lines = ["", f"Speed-up, plain answer at {p} tokens / Q-Zoom answer at {q} tokens (+ RoI pass when it zooms), "
             f"same engine: gate rate 1: {s['rate1']:.2f}x, rate 0.5: {s['rate05']:.2f}x, rate 0: {s['rate0']:.2f}x "
             "(the bound the mechanism puts on the speed-up at this size; accuracy is not measured here). Against HF "
             f"generate at {p}: {g['rate1']:.2f}x, {g['rate05']:.2f}x, {g['rate0']:.2f}x.", "",
             "| plain budget | speed-up r=0 | r=0.5 | r=1 | Q-Zoom/plain at same budget r=0 | r=0.5 | r=1 |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for b, over in rat["overhead_same_budget"].items():
        sp = rat["speedup_by_plain_budget"].get(b)
        speed = " | ".join(f"{sp[k]:.2f}x" for k in ("rate0", "rate05", "rate1")) if sp else "- | - | -"
        lines.append(f"| {b} | {speed} | " + " | ".join(f"{over[k]:.2f}" for k in ("rate0", "rate05", "rate1")) + " |")
    return lines


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """bench_scale.png: latency against visual tokens (log-x): plain answer and Q-Zoom at gate rates 0, 0.5 and 1;
    and the breakdown: plain prefill, decode of N tokens, gate + twig, RoI pass."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not result["rows"]:
        return None
    fig = Figure(figsize=(12, 4.8))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    styles = ("-", "--")
    for attn, style in zip(result["attention"], styles, strict=False):
        rows = sorted((r for r in result["rows"] if r["attn"] == attn), key=lambda r: r["budget"])
        x = [r["budget"] for r in rows]
        for label, key, color in (("plain answer (engine)", "plain_engine_s", "black"),
                                  ("plain answer (HF generate)", "plain_answer_s", "grey"),
                                  ("Q-Zoom rate 0", "qzoom_rate0_s",
                                  "tab:green"), ("Q-Zoom rate 0.5", "qzoom_rate05_s", "tab:orange"),
                                  ("Q-Zoom rate 1", "qzoom_rate1_s", "tab:red")):
            left.plot(x, [r[key] for r in rows], style, marker="o", color=color, label=f"{label} ({attn})")
        n = rows[0]["new_tokens"]
        for label, values, color in (
                ("plain prefill", [r["plain_prefill_s"] for r in rows], "black"),
                (f"decode, {n} tokens", [r["rate0_decode_s"] for r in rows], "tab:blue"),
                ("gate + twig", [r["twig_gate_extra_s"] for r in rows], "tab:purple"),
                ("RoI pass (rate 1 - rate 0)", [r["roi_pass_extra_s"] for r in rows], "tab:red")):
            right.plot(x, values, style, marker="o", color=color, label=f"{label} ({attn})")
    a = result["arch"]
    for ax, title in ((left, "whole answer"), (right, "breakdown")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("visual tokens of the global view")
        ax.set_ylabel("median latency (s)")
        ax.set_title(f"{a['name']} ({a['size']}), {result['device']}, {result['dtype']}: {title}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def write_outputs(result: dict[str, Any], out: Path) -> None:
    """scale.json, scale.md and bench_scale.png in ``out``."""
    write_json(result, out)
    (out / MARKDOWN).write_text(markdown(result), encoding="utf-8")
    plot(result, out / PNG)
