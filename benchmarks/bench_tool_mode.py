"""Tool mode measured: is the zoom tool zero-cost, and what does tool mode do to accuracy, calls and latency?

On ZoomWorld test questions, interleaved question by question in one process (so machine drift cancels):

* ``no-zoom``: the base model at the 576-token view (`QZoomModel.answer(mode="never")`);
* ``auto``: the base model with its gate (the paper's inference, one pass);
* ``tool``: the bundled tool-calling policy through the LangGraph loop with the internal ``zoom`` tool;
* ``deepeyes`` and ``deepeyes-cached``: the external-crop agents of `compare` (the bundled DeepEyes-format policy
  ``zoomworld-tiny-deepeyes`` when installed, else the base model), re-encoding every turn or continuing the cache.

Zero-cost figures, from the tool runs: vision-tower encodes of the global image per question (counted at the
adapter's encoder), and for every turn that follows a zoom call, the tokens it prefilled against the tokens the
cache could not hold (the call's closing token, the tool turn with the crop, the next assistant header).

    python benchmarks/bench_tool_mode.py --n 200 --variants hr,doc --out runs/tool_mode.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from qzoom_agent.bench import registry
from qzoom_agent.bench.tool_agent import DEFAULT_POLICY, QZoomToolAgent
from qzoom_agent.config import budget_for
from qzoom_agent.loading import resolve_model_path, trained_alphabet
from qzoom_agent.model import QZoomModel
from qzoom_agent.scoring import is_correct
from qzoom_agent.zoomworld import sample


class EncodeCounter:
    """Counts vision-tower encodes of one image at an adapter (wraps this project's adapter, not library code)."""

    def __init__(self, adapter) -> None:
        self.inner = adapter.encode_image
        self.sizes: list[tuple[int, int]] = []
        adapter.encode_image = self

    def __call__(self, images):
        self.sizes += [tuple(im.source_size) for im in images]
        return self.inner(images)


def _mean(values) -> float | None:
    values = list(values)
    return statistics.fmean(values) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="test questions per variant")
    ap.add_argument("--variants", default="hr,doc")
    ap.add_argument("--start", type=int, default=0, help="first test index")
    ap.add_argument("--policy", default=DEFAULT_POLICY)
    ap.add_argument("--out", default=None, help="write the records and summary as JSON here")
    ap.add_argument("--tool-only", action="store_true",
                    help="run only the tool agent (its zero-cost figures); compare runs the others side by side")
    args = ap.parse_args()
    torch.set_num_threads(2)
    base = QZoomModel.from_pretrained("zoomworld-tiny")
    policy = QZoomModel.from_pretrained(args.policy)
    counter = EncodeCounter(policy.adapter)
    tool = QZoomToolAgent(policy, "tool")
    ctx = registry.AgentContext(base)
    crop_agents = {} if args.tool_only else {name: registry.make_agent(name, ctx)
                                             for name in ("deepeyes", "deepeyes-cached")}
    budget = budget_for(576)
    # the questions use the characters the model was trained to read (as `compare` does)
    alphabet = trained_alphabet(resolve_model_path("zoomworld-tiny"))
    records = []
    for variant in args.variants.split(","):
        for i in tqdm(range(args.start, args.start + args.n), desc=variant):
            s = sample(variant, "test", i, alphabet=alphabet)
            row = {"variant": variant, "index": i, "kind": s.kind, "family": s.family}
            for name in () if args.tool_only else ("no-zoom", "auto"):
                t0 = time.perf_counter()
                ans = base.answer(s.image, s.question, mode="never" if name == "no-zoom" else "auto", budget=budget,
                                  max_new_tokens=8)
                row[name] = {"correct": is_correct(ans.text, s.answer, s.options), "latency_s":
                             time.perf_counter() - t0, "generated_tokens": ans.generated_tokens,
                             "zoomed": ans.zoomed, "layer_tokens": ans.layer_tokens}
            counter.sizes.clear()
            res = tool.run(s.image, s.question)
            run = tool.last_run
            policy_turns = [r for r in run.trace if r["node"] == "policy"]
            after_zoom = []
            for prev, turn in zip(policy_turns, policy_turns[1:], strict=False):
                if prev.get("tool_calls"):
                    st, pst = turn["stats"], prev["stats"]
                    uncached = st["prompt_tokens"] - (pst["prompt_tokens"] + pst["generated_tokens"] - 1)
                    after_zoom.append({"prefilled": st["prompt_tokens"] - st["kv_reused"], "uncached": uncached,
                                       "crop_tokens": st["visual_tokens"]})
            row["tool"] = {"correct": is_correct(res.answer, s.answer, s.options), "latency_s": res.latency_s,
                           "generated_tokens": res.generated_tokens, "tool_calls": res.tool_calls,
                           "zooms": res.zooms, "layer_tokens": res.layer_tokens,
                           "global_encodes": sum(size == s.image.size for size in counter.sizes),
                           "after_zoom": after_zoom}
            for name, agent in {} if args.tool_only else crop_agents.items():
                d = agent.run(s.image, s.question)
                row[name] = {"correct": is_correct(d.answer, s.answer, s.options), "latency_s": d.latency_s,
                             "generated_tokens": d.generated_tokens, "tool_calls": d.tool_calls,
                             "vision_encodes": d.vision_encodes, "layer_tokens": d.layer_tokens}
            records.append(row)
    summary = {}
    for variant in args.variants.split(","):
        rows = [r for r in records if r["variant"] == variant]
        out = {"n": len(rows), "n_fine": sum(r["kind"] == "fine" for r in rows)}
        for name in ("tool",) if args.tool_only else ("no-zoom", "auto", "tool", "deepeyes", "deepeyes-cached"):
            for kind in ("fine", "coarse"):
                out[f"{name}_accuracy_{kind}"] = _mean(r[name]["correct"] for r in rows if r["kind"] == kind)
            out[f"{name}_latency_s"] = _mean(r[name]["latency_s"] for r in rows)
            out[f"{name}_generated_tokens"] = _mean(r[name]["generated_tokens"] for r in rows)
            out[f"{name}_layer_tokens"] = _mean(r[name]["layer_tokens"] for r in rows)
        for kind in ("fine", "coarse"):
            for name in ("tool",) if args.tool_only else ("tool", "deepeyes"):
                out[f"{name}_call_rate_{kind}"] = _mean(r[name]["tool_calls"] > 0 for r in rows if r["kind"] == kind)
        out["tool_global_encodes_mean"] = _mean(r["tool"]["global_encodes"] for r in rows)
        out["tool_global_encodes_all_one"] = all(r["tool"]["global_encodes"] == 1 for r in rows)
        zoom_turns = [z for r in rows for z in r["tool"]["after_zoom"]]
        out["turns_after_zoom"] = len(zoom_turns)
        out["after_zoom_prefilled_mean"] = _mean(z["prefilled"] for z in zoom_turns)
        out["after_zoom_crop_tokens_mean"] = _mean(z["crop_tokens"] for z in zoom_turns)
        out["after_zoom_nothing_recomputed"] = all(z["prefilled"] == z["uncached"] for z in zoom_turns)
        summary[variant] = out
    if not args.tool_only:
        summary["crop_policy"] = registry.crop_policy_for(ctx) or "zoomworld-tiny (base)"
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"summary": summary, "records": records}, indent=1))


if __name__ == "__main__":
    main()
