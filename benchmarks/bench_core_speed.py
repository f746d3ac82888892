"""Side-by-side cost of Q-Zoom's first pass and of gated answering against the plain model.

Two claims are checked, each as a ratio of medians measured in one process with the variants interleaved
round by round (so machine drift cancels):

1. ``perceive`` on a question the gate skips costs at most (T-1)/L + 5% over a plain low-resolution prefill
   of the same model (the HF forward on the same prompt, last-token logits only).
2. ``answer(mode="never")`` is within 5% of plain ``generate`` for the same number of new tokens.

It also reports ``answer(mode="auto")`` on a skipped question (full prefill plus the T gate layers) against
``generate``: the end-to-end price of asking the gate.

Both sides include preparing the image and the prompt. Random-weight models built from configs are used:
speed does not depend on the weights. Run: ``python benchmarks/bench_core_speed.py [--rounds 15]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from PIL import Image

from qzoom_agent.backbones import adapter_class_for
from qzoom_agent.config import QZoomConfig
from qzoom_agent.model import QZoomModel
from qzoom_agent.tiny import build_tiny

QUESTION = "What is written on the green tag in the lower left corner?"

# (name, family, hidden, layers, K, T): a tiny test model and a model with Qwen2.5-VL-7B's depth split (28, 18, 3).
SETUPS = [
    ("tiny-h64-L4", "qwen2_5_vl", 64, 4, 2, 2),
    ("h256-L28-K18", "qwen2_5_vl", 256, 28, 18, 3),
]


def build(family: str, hidden: int, layers: int, k: int, t: int, budget: int) -> QZoomModel:
    model, tok = build_tiny(family, hidden=hidden, layers=layers, seed=0)
    cls = adapter_class_for(model.config)
    adapter = cls(model, tok, cls.default_image_processor(model.config))
    # gate_threshold=1.0: the sigmoid never reaches it, so every question is "skipped".
    config = QZoomConfig(twig_K=k, twig_T=t, min_tokens=budget, max_tokens=budget, gate_threshold=1.0)
    qm = QZoomModel(adapter, None, config)
    qm.init_heads()
    return qm


def plain_prefill(qm: QZoomModel, image: Image.Image, budget: int) -> None:
    a = qm.adapter
    img = a.prepare_image(image, min_tokens=budget, max_tokens=budget)
    prompt = a.build_prompt(img, QUESTION)
    a.model(**a.hf_inputs(prompt.input_ids, [img]), logits_to_keep=1)


def plain_generate(qm: QZoomModel, image: Image.Image, budget: int, new_tokens: int) -> int:
    a = qm.adapter
    img = a.prepare_image(image, min_tokens=budget, max_tokens=budget)
    prompt = a.build_prompt(img, QUESTION)
    out = a.model.generate(**a.hf_inputs(prompt.input_ids, [img]), max_new_tokens=new_tokens, do_sample=False)
    return out.shape[1] - prompt.input_ids.shape[1]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_setup(setup, rounds: int, budget: int, new_tokens: int) -> dict:
    name, family, hidden, layers, k, t = setup
    qm = build(family, hidden, layers, k, t, budget)
    g = torch.Generator().manual_seed(0)
    image = Image.fromarray((torch.rand(1344, 1792, 3, generator=g) * 255).byte().numpy())
    # Equal token counts on both sides: both decode greedily from the same weights and stop at the same place.
    n_plain = plain_generate(qm, image, budget, new_tokens)
    n_ours = qm.answer(image, QUESTION, mode="never", max_new_tokens=new_tokens).generated_tokens
    variants = {
        "plain_prefill": lambda: plain_prefill(qm, image, budget),
        "perceive_skip": lambda: qm.perceive(image, QUESTION, roi="auto"),
        "perceive_skip+twig": lambda: qm.perceive(image, QUESTION, roi="always"),
        "plain_generate": lambda: plain_generate(qm, image, budget, new_tokens),
        "answer_never": lambda: qm.answer(image, QUESTION, mode="never", max_new_tokens=new_tokens),
        "answer_auto_skip": lambda: qm.answer(image, QUESTION, mode="auto", max_new_tokens=new_tokens),
    }
    times = {key: [] for key in variants}
    with torch.inference_mode():
        for fn in variants.values():  # warm-up
            fn()
        for _ in range(rounds):
            for key, fn in variants.items():
                times[key].append(timed(fn))
    med = {key: statistics.median(v) for key, v in times.items()}
    bound = (t - 1) / layers + 0.05
    return {
        "setup": name,
        "visual_tokens": budget,
        "K": k,
        "T": t,
        "L": layers,
        "median_s": {key: round(v, 5) for key, v in med.items()},
        "perceive_skip_over_prefill": med["perceive_skip"] / med["plain_prefill"] - 1,
        "perceive_skip_twig_over_prefill": med["perceive_skip+twig"] / med["plain_prefill"] - 1,
        "perceive_bound": bound,
        "answer_never_over_generate": med["answer_never"] / med["plain_generate"] - 1,
        "answer_auto_skip_over_generate": med["answer_auto_skip"] / med["plain_generate"] - 1,
        "generated_tokens": {"plain_generate": n_plain, "answer_never": n_ours},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--budget", type=int, default=576, help="visual tokens of the low-resolution view")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [run_setup(s, args.rounds, args.budget, args.new_tokens) for s in SETUPS]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'setup':<14} {'tok':>4}  {'perceive(skip)':>15} {'+twig':>8} {'bound':>7}  {'answer(never)':>14} "
          f"{'answer(auto,skip)':>18}  tokens")
    for r in results:
        print(
            f"{r['setup']:<14} {r['visual_tokens']:>4}  {r['perceive_skip_over_prefill']:>+14.1%} "
            f"{r['perceive_skip_twig_over_prefill']:>+8.1%} {r['perceive_bound']:>+7.1%}  "
            f"{r['answer_never_over_generate']:>+13.1%} {r['answer_auto_skip_over_generate']:>+18.1%}  "
            f"{r['generated_tokens']}"
        )
    print("ratios are (variant / plain) - 1 on medians; negative means faster than the plain model")


if __name__ == "__main__":
    main()
