"""Does the twig find the asked tag, or just a tag? SD-RPN scores on ZoomWorld read questions.

A read question names its tag by colour ("What is written on the green tag?") among 3-8 coloured tags. For each
question at a 256-576 token global view this reports where the twig's highest-scoring token lies: on the asked
tag (``top1``), within its best three (``top3``), or on any tag (``on_a_tag``), and the RoI hit of the box Q-Zoom
would crop (covers >= 70% of the target within 16x its area) under several box rules: ``enclosing`` at a few
foreground thresholds (the paper's Qwen rule) and ``peak`` at a few neighbourhood ratios (``roi.peak_cells``, with
the adapter's threshold). A twig that scores every tag high has ``on_a_tag`` near 1 and ``top1`` near one over the
number of tags. ``--families`` widens the questions to other fine families (top1 then counts the target's cells).

Run::

    python research/twig_pick.py --model DIR_WITH_BASE --qzoom ADAPTER_DIR [--n 100] [--split val] [--json]
"""

from __future__ import annotations

import json

import model_args  # research/model_args.py: run these scripts as python research/NAME.py
import torch
from tqdm import tqdm

from qzoom_agent.boxes import Box, box_to_cells, roi_hit
from qzoom_agent.model import QZoomModel
from qzoom_agent.results import Perception
from qzoom_agent.roi import RoiConfig, propose_boxes, qwen_sink_mask
from qzoom_agent.zoomworld import VARIANTS, generate, seed_for

BUDGET = (256, 576)
RULES = (("enclosing", 0.15), ("enclosing", 0.3), ("peak", 0.5), ("peak", 0.3), ("peak", 0.2))


def _cells(box, p: Perception) -> torch.Tensor:
    """(gh * gw,) bool: the tokens of ``p``'s global view that ``box`` (source pixels) overlaps."""
    r0, c0, r1, c1 = box_to_cells(Box(*box), p.grid, p.resized_size, p.image_size, p.canvas)
    mask = torch.zeros(p.grid, dtype=torch.bool)
    mask[r0:r1, c0:c1] = True
    return mask.flatten()


@torch.no_grad()
def measure(qz: QZoomModel, n: int, alphabet: str, split: str, families: dict[str, float]) -> dict:
    """The figures of the module docstring over ``n`` questions of ``split`` (hr and doc alternating)."""
    counts = {"top1": 0, "top3": 0, "on_a_tag": 0, "tags": 0}
    hits = dict.fromkeys(RULES, 0)
    for k in tqdm(range(n), desc="twig pick", mininterval=2.0):
        s = generate(VARIANTS[k % 2], seed_for(split, k), alphabet=alphabet, mix=families,
                     size_range=(1024, 2048))
        p = qz.perceive(s.image, s.question, roi="always", budget=BUDGET)
        order = p.roi_logits.flatten().argsort(descending=True)
        target = _cells(s.target_box, p)[order]
        tags = torch.stack([_cells(panel["box"], p) for panel in s.panels]).any(0)[order]
        counts["top1"] += bool(target[0])
        counts["top3"] += bool(target[:3].any())
        counts["on_a_tag"] += bool(tags[0])
        counts["tags"] += len(s.panels)
        sink = qwen_sink_mask(*p.grid, qz.config.sink_min_tokens)
        for mode, value in RULES:
            setting = {"threshold": value} if mode == "enclosing" else {"threshold": qz.config.roi_threshold,
                                                                          "peak_ratio": value}
            cfg = RoiConfig(mode=mode, sink_min_tokens=qz.config.sink_min_tokens, **setting)
            boxes = propose_boxes(p.roi_logits, grid=p.grid, resized_size=p.resized_size,
                                  source_size=p.image_size, cfg=cfg, sink_mask=sink)
            hits[mode, value] += roi_hit(boxes[0].to_json() if boxes else None, list(s.target_box))
    return {"n": n, "split": split, "top1": counts["top1"] / n, "top3": counts["top3"] / n,
            "on_a_tag": counts["on_a_tag"] / n, "tags_per_scene": counts["tags"] / n,
            "roi_hit": {f"{mode} {value}": h / n for (mode, value), h in hits.items()}}


def main() -> None:
    p = model_args.parser(__doc__.splitlines()[0], 100, "read questions (hr and doc alternating)")
    p.add_argument("--qzoom", required=True, help="Q-Zoom adapter folder (a stage-1 OUT/stage1/qzoom)")
    p.add_argument("--split", default="val", choices=("val", "test"))
    p.add_argument("--families", default="read", help="comma-separated fine families, equally weighted")
    args = p.parse_args()
    qz, alphabet = model_args.load(args, qzoom=args.qzoom)
    families = dict.fromkeys(args.families.split(","), 1.0)
    r = measure(qz, args.n, alphabet, args.split, families)
    if args.json:
        print(json.dumps({"model": args.model, "qzoom": args.qzoom, **r}))
        return
    print(f"{r['n']} {r['split']} {args.families} questions, {r['tags_per_scene']:.1f} tags a scene, "
          f"view <= {BUDGET[1]} tokens")
    print(f"top token on the asked tag {r['top1']:.3f}, asked tag in the top 3 {r['top3']:.3f}, "
          f"top token on any tag {r['on_a_tag']:.3f}")
    print("\n| box rule | RoI hit |\n|---|---:|")
    for rule, h in r["roi_hit"].items():
        print(f"| {rule} | {h:.3f} |")


if __name__ == "__main__":
    main()
