"""Where does the SD-RPN box miss? Stage 1's RoI evaluation of an adapter, by question family and target size.

For ``--n`` val fine questions (ZoomWorld's fine mix, hr and doc alternating) at the adapter's global view, with
the zoom forced, this reports stage 1's figures (``train/stage1_eval.evaluate_roi``): the RoI hit rate (the box covers
>= 70% of the target within 16x its area), broken down by question family and by the target's larger side in
global-view tokens, and how often the twig's top token lies on the target (a miss with the top token off the
target is the twig's ranking; one with it on the target is the box rule's). ``--max-side`` sets the largest image
side (1024-4096 px is the test split's range); ``--families read`` keeps one family, so the size breakdown is not
mixed with others.

Run::

    python research/roi_breakdown.py --qzoom ADAPTER_DIR [--model DIR] [--n 300] [--max-side 4096]
        [--families F,..] [--json]
"""

from __future__ import annotations

import json
from pathlib import Path

import model_args  # research/model_args.py: run these scripts as python research/NAME.py

from qzoom_agent.train.stage1 import load_stage1_config
from qzoom_agent.train.stage1_eval import evaluate_roi

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train" / "stage1_zoomworld_tiny_box_aux.yaml"


def main() -> None:
    p = model_args.parser(__doc__.splitlines()[0], 300, "val fine questions (hr and doc alternating)")
    p.add_argument("--qzoom", default=None, help="Q-Zoom adapter folder; default: the model's bundled heads")
    p.add_argument("--max-side", type=int, default=4096, help="largest image side in pixels (smallest: 1024)")
    p.add_argument("--families", default=None, help="comma-separated fine families, equally weighted; default: "
                   "ZoomWorld's fine mix")
    args = p.parse_args()
    qz, alphabet = model_args.load(args, qzoom=args.qzoom)  # None: the model folder's own qzoom/
    budget = (qz.config.min_tokens, qz.config.max_tokens)
    cfg = load_stage1_config(CONFIG).model_copy(update={"size_range": (1024, args.max_side), "budget": budget})
    if args.families:
        cfg = cfg.model_copy(update={"families": dict.fromkeys(args.families.split(","), 1.0)})
    m = evaluate_roi(qz, cfg, alphabet, args.n)
    if args.json:
        print(json.dumps({"model": args.model, "qzoom": args.qzoom, "max_side": args.max_side, **m}))
        return
    print(f"{m['n']} val {args.families or 'fine'} questions, images 1024-{args.max_side} px, "
          f"view {budget[0]}-{budget[1]} tokens: RoI hit {m['roi_hit']:.3f}, coverage {m['roi_coverage']:.3f}, "
          f"top token on the target {m['roi_top1']:.3f}")
    top1 = m["roi_top1_by_family"]
    print("\n| family | RoI hit | top token on the target | questions |\n|---|---:|---:|---:|")
    for k, v in m["roi_hit_by_family"].items():
        print(f"| {k} | {v['hit']:.3f} | {top1[k]['hit']:.3f} | {v['n']} |")
    print("\n| target side (tokens) | RoI hit | questions |\n|---|---:|---:|")
    for k, v in m["roi_hit_by_size"].items():
        print(f"| {k} | {v['hit']:.3f} | {v['n']} |")


if __name__ == "__main__":
    main()
