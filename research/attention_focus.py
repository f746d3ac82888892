"""Where a model looks: the share of its response->image attention on the asked object, on held-out scenes.

This is the map stage 1 of Q-Zoom distils into the SD-RPN twig (`train.stage1_labels.response_attention`: the
model answers greedily, then one teacher-forced eager forward gives every layer's and head's attention of the
response tokens over the image). On ZoomWorld test questions (seeds disjoint from training) it reports, per
question kind:

* ``share``: the head- and layer-averaged map's mass on the tokens the target box touches, over all image
  tokens (a uniform map scores the target's token fraction, given as ``chance``);
* ``peak``: how often that map's highest token lies on the target;
* ``best_head_peak``: the same for the best single (layer, head) pair.

Run::

    python research/attention_focus.py [--model DIR] [--n 100] [--budget 576] [--layers 2,3] [--json]
"""

from __future__ import annotations

import collections
import json

import model_args  # research/model_args.py: run these scripts as python research/NAME.py
import torch
from tqdm import tqdm

from qzoom_agent.model import QZoomModel
from qzoom_agent.recipes.zoomworld_tiny.focus import focus_mask
from qzoom_agent.train.stage1_labels import response_attention
from qzoom_agent.zoomworld import VARIANTS, sample


def measure(qz: QZoomModel, variant: str, n: int, budget: int, layers: list[int], alphabet: str,
            first: int = 0) -> dict[str, dict[str, float]]:
    """Per kind ("fine", "coarse"): mean share, chance share, peak and best-head peak rates, and the count."""
    rows: dict[str, list[tuple[float, float, bool, torch.Tensor]]] = collections.defaultdict(list)
    for i in tqdm(range(first, first + n), desc=f"attention {variant}", mininterval=2.0):
        s = sample(variant, "test", i, alphabet=alphabet)
        maps = response_attention(qz, s.image, s.question, (4, budget))
        layer_count, heads, gh, gw = maps.maps.shape
        if max(layers) >= layer_count:
            raise ValueError(f"--layers {layers} exceed the model's {layer_count} layers")
        mask = focus_mask((0, 0, *s.image.size), tuple(s.target_box), (gh, gw))
        flat = maps.maps.reshape(layer_count, heads, -1).float()
        mean = flat[layers].mean((0, 1))
        share = float(mean[mask].sum() / mean.sum().clamp(min=1e-9))
        per_head = mask[flat.argmax(-1)]  # (layers, heads): does each head's peak lie on the target
        rows[s.kind].append((share, float(mask.float().mean()), bool(mask[mean.argmax()]), per_head))
    out = {}
    for kind, got in sorted(rows.items()):
        heads_hit = torch.stack([r[3] for r in got]).float().mean(0)
        out[kind] = {"n": len(got), "share": sum(r[0] for r in got) / len(got),
                     "chance": sum(r[1] for r in got) / len(got), "peak": sum(r[2] for r in got) / len(got),
                     "best_head_peak": float(heads_hit.max())}
    return out


def main() -> None:
    parser = model_args.parser(__doc__.splitlines()[0], 100, "test questions per variant")
    parser.add_argument("--budget", type=int, default=576, help="most visual tokens of the whole-scene view")
    parser.add_argument("--layers", default="2,3", help="decoder layers averaged, comma-separated")
    args = parser.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    qz, alphabet = model_args.load(args)
    result = {v: measure(qz, v, args.n, args.budget, layers, alphabet) for v in VARIANTS}
    if args.json:
        print(json.dumps({"model": args.model, "n": args.n, "budget": args.budget, "layers": layers,
                          "variants": result}))
        return
    print("| variant | kind | n | share on target | chance | peak on target | best head peak |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for variant, kinds in result.items():
        for kind, r in kinds.items():
            print(f"| {variant} | {kind} | {r['n']} | {r['share']:.3f} | {r['chance']:.3f} | {r['peak']:.3f} | "
                  f"{r['best_head_peak']:.3f} |")


if __name__ == "__main__":
    main()
