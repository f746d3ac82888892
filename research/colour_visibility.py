"""Does the frozen base see an object's colour at a global view? Linear probes on its visual tokens.

Count questions ask about 8-14 px dots, which shrink to 2-8 px in a 256-576 token view of a 1024-4096 px image.
If the vision tower's output at a dot's token does not say the dot's colour, no head on top of it can find
"the red dots". For ``--n`` train and ``--n-val`` val count scenes (they hold dots and tags), this collects the
features of the tokens that hold one dot's centre (one colour only) and of tag tokens, in two places: the vision
tower's output and the language model's input to layer K (what the Q-Zoom heads read). It fits a linear
classifier of the colour on train tokens and reports its accuracy on val tokens (chance: one over the colours).
A second probe asks only whether a token holds a dot at all: dot-centre tokens against as many tokens of the same
scene that hold no dot centre and no tag (chance 0.5). A box around the right cluster needs at least that much.

Run::

    python research/colour_visibility.py [--model DIR] [--n 300] [--n-val 100] [--max-side 2048] [--json]
"""

from __future__ import annotations

import json

import model_args  # research/model_args.py: run these scripts as python research/NAME.py
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from qzoom_agent.model import QZoomModel
from qzoom_agent.recipes.zoomworld_tiny.dense_crops import COLOURS, centre_cell
from qzoom_agent.recipes.zoomworld_tiny.scene_targets import scene_targets, view_mapper
from qzoom_agent.train.stage1 import twig_inputs
from qzoom_agent.zoomworld import VARIANTS, generate, seed_for

BUDGET = (256, 576)
PLACES = ("vision", "layer_K")


@torch.no_grad()
def collect(qz: QZoomModel, split: str, n: int, alphabet: str, max_side: int) -> dict[str, dict]:
    """``{"dot" | "tag" | "presence": {"x": {place: (M, D) features}, "y": (M,) labels}}`` over ``n`` count scenes.

    Labels are colour indices for "dot" and "tag", and 1 (a dot's centre) or 0 (no dot, no tag) for "presence".
    """
    rows: dict[str, dict] = {kind: {"x": {p: [] for p in PLACES}, "y": []} for kind in ("dot", "tag", "presence")}
    rng = np.random.default_rng(len(split) * 1000 + n)
    for k in tqdm(range(n), desc=f"{split} features", mininterval=2.0):
        s = generate(VARIANTS[k % 2], seed_for(split, k), alphabet=alphabet, mix={"count": 1.0},
                     size_range=(1024, max_side))
        x = twig_inputs(qz, s, BUDGET)
        gh, gw = x.grid
        img = qz.adapter.prepare_image(s.image, min_tokens=BUDGET[0], max_tokens=BUDGET[1])
        feats = {"vision": qz.adapter.encode_image([img]).embeds.float(),
                 "layer_K": x.hidden_k[0, x.image_start:x.image_end].float()}
        view = view_mapper((0, 0, *s.image.size), (gh, gw))
        colours: dict[int, set[str]] = {}
        for d in s.dots:
            r, c = centre_cell(view(d["box"]))
            colours.setdefault(min(r, gh - 1) * gw + min(c, gw - 1), set()).add(d["colour"])
        dots = [(i, COLOURS.index(next(iter(cs)))) for i, cs in colours.items() if len(cs) == 1]
        t = scene_targets(s, (0, 0, *s.image.size), (gh, gw))
        tags = [(int(i), int(t.colour.ravel()[i])) for i in np.flatnonzero((t.present.ravel() == 1)
                                                                           & (t.colour.ravel() >= 0))]
        taken = set(colours) | {i for i, _ in tags}
        free = [i for i in range(gh * gw) if i not in taken]
        blank = rng.choice(free, size=min(len(colours), len(free)), replace=False).tolist() if free else []
        presence = [(i, 1) for i in colours] + [(int(i), 0) for i in blank]
        for kind, items in (("dot", dots), ("tag", tags), ("presence", presence)):
            for i, colour in items:
                for place in PLACES:
                    rows[kind]["x"][place].append(feats[place][i])
                rows[kind]["y"].append(colour)
    return {kind: {"x": {p: torch.stack(v) for p, v in r["x"].items()}, "y": torch.tensor(r["y"])}
            for kind, r in rows.items()}


def probe_accuracy(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
                   classes: int = len(COLOURS), steps: int = 300) -> float:
    """Val accuracy of a linear classifier (inputs standardised on train, Adam with a little weight decay).

    Args:
        x_train, x_val: (M, D) features; y_train, y_val: (M,) labels in ``0 .. classes-1``.
    """
    torch.manual_seed(0)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    lin = torch.nn.Linear(x_train.shape[1], classes)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(lin((x_train - mean) / std), y_train).backward()
        opt.step()
    with torch.no_grad():
        return float((lin((x_val - mean) / std).argmax(-1) == y_val).float().mean())


def main() -> None:
    p = model_args.parser(__doc__.splitlines()[0], 300, "train count scenes to fit the probes on")
    p.add_argument("--n-val", type=int, default=100, help="val count scenes to score them on")
    p.add_argument("--max-side", type=int, default=2048, help="largest image side in pixels (smallest: 1024)")
    args = p.parse_args()
    qz, alphabet = model_args.load(args, qzoom=None)  # the model's own heads set K (base weights are the same)
    train = collect(qz, "train", args.n, alphabet, args.max_side)
    val = collect(qz, "val", args.n_val, alphabet, args.max_side)
    classes = {"dot": len(COLOURS), "tag": len(COLOURS), "presence": 2}
    result = {kind: {place: probe_accuracy(train[kind]["x"][place], train[kind]["y"], val[kind]["x"][place],
                                           val[kind]["y"], classes[kind]) for place in PLACES} for kind in classes}
    counts = {kind: {"train": len(train[kind]["y"]), "val": len(val[kind]["y"])} for kind in classes}
    if args.json:
        print(json.dumps({"model": args.model, "K": qz.config.twig_K, "max_side": args.max_side,
                          "chance": {kind: 1 / c for kind, c in classes.items()},
                          "accuracy": result, "tokens": counts}))
        return
    print(f"colour of the object at a token, linear probe, val accuracy (chance {1 / len(COLOURS):.3f}); "
          f"images 1024-{args.max_side} px at {BUDGET[0]}-{BUDGET[1]} tokens, K = {qz.config.twig_K}")
    print("\n| tokens | train / val tokens | " + " | ".join(PLACES) + " |\n|---|---:|" + "---:|" * len(PLACES))
    labels = {"dot": "dot colour", "tag": "tag colour", "presence": "dot or nothing (chance 0.500)"}
    for kind, label in labels.items():
        print(f"| {label} | {counts[kind]['train']} / {counts[kind]['val']} | "
              + " | ".join(f"{result[kind][place]:.3f}" for place in PLACES) + " |")


if __name__ == "__main__":
    main()
