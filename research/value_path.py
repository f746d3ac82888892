"""Where colour gets lost: the path from a large object's visual tokens to a colour answer, on held-out scenes.

Colour questions ("What color is the large circle?") on ZoomWorld test scenes at a coarse budget (<= 256
tokens). Three figures, each at one link of the path:

* ``colour_share``: per decoder layer input (0 = the tower's output), the share of the variance of the tokens
  inside large objects that the objects' colours explain (between-colour over total sum of squares). 1 means the
  states are nothing but colour, 0 that colour is gone.
* ``image_mass`` and ``target_share``: per (layer, head), the attention of the last prompt token (the one that
  predicts the first answer character) that goes to image tokens, and the share of that on the asked object.
* ``accuracy``: greedy answers, by the number of coloured objects in the scene. With one object no routing is
  needed, so a model that fails there fails at reading the colour, not at finding the object.

Run::

    python research/value_path.py [--model DIR] [--n 60] [--json]
"""

from __future__ import annotations

import collections
import json

import model_args  # research/model_args.py: run these scripts as python research/NAME.py
import torch
from tqdm import tqdm

from qzoom_agent.model import QZoomModel
from qzoom_agent.recipes.zoomworld_tiny.focus import focus_mask
from qzoom_agent.recipes.zoomworld_tiny.scene_targets import scene_targets
from qzoom_agent.scoring import is_correct
from qzoom_agent.train.common import eager_attention
from qzoom_agent.zoomworld import VARIANTS, sample

BUDGET = (64, 256)


def explained_share(states: torch.Tensor, labels: torch.Tensor) -> float:
    """Between-class over total sum of squares of ``states`` (N, D) grouped by ``labels`` (N,)."""
    centred = states - states.mean(0)
    total = centred.pow(2).sum()
    between = sum(int((labels == c).sum()) * centred[labels == c].mean(0).pow(2).sum() for c in labels.unique())
    return float(between / total.clamp(min=1e-12))


@torch.no_grad()
def measure(qz: QZoomModel, n: int, alphabet: str) -> dict:
    """The three figures over ``n`` test colour questions per variant (see the module docstring)."""
    adapter, net = qz.adapter, qz.adapter.model
    states: list[list[torch.Tensor]] = [[] for _ in range(adapter.num_layers)]
    labels, attention, counts = [], [], collections.Counter()
    with eager_attention(net):  # only eager attention returns its weights
        for variant in VARIANTS:
            for i in tqdm(range(n), desc=f"value path {variant}", mininterval=2.0):
                s = sample(variant, "test", i, alphabet=alphabet, mix={"color": 1.0})
                img = adapter.prepare_image(s.image, min_tokens=BUDGET[0], max_tokens=BUDGET[1])
                prompt = adapter.build_prompt(img, s.question, system=None)
                out = net(**adapter.hf_inputs(prompt.input_ids.to(adapter.device), [img]), output_attentions=True,
                          output_hidden_states=True)
                image = slice(prompt.image_start, prompt.image_end)
                targets = scene_targets(s, (0, 0, *s.image.size), img.grid)
                colour = torch.as_tensor(targets.colour).flatten()
                inside = (colour >= 0) & (torch.as_tensor(targets.present).flatten() == 0)  # objects, not tags
                for layer in range(adapter.num_layers):
                    states[layer].append(out.hidden_states[layer][0, image][inside].float().cpu())
                labels.append(colour[inside])
                mask = focus_mask((0, 0, *s.image.size), tuple(s.target_box), img.grid)
                rows = torch.stack([a[0, :, -1].float().cpu() for a in out.attentions])  # (layers, heads, L)
                on_image = rows[..., image]
                mass = on_image.sum(-1)
                attention.append(torch.stack([mass, on_image[..., mask].sum(-1) / mass.clamp(min=1e-9)]))
                answer = qz.answer(s.image, s.question, mode="never", budget=BUDGET, max_new_tokens=10).text
                objects = sum(1 for o in s.objects if o["colour"])
                counts[objects, "n"] += 1
                counts[objects, "right"] += is_correct(answer, s.answer)
                counts["answer", answer.strip()] += 1
    y = torch.cat(labels)
    att = torch.stack(attention).mean(0)  # (2, layers, heads)
    return {
        "n": 2 * n,
        "object_tokens": int(y.numel()),
        "colour_share": [explained_share(torch.cat(s), y) for s in states],
        "image_mass": att[0].tolist(),
        "target_share": att[1].tolist(),
        "accuracy": {k: {"n": counts[k, "n"], "right": counts[k, "right"]}
                     for k in sorted({key[0] for key in counts if isinstance(key[0], int)})},
        "answers": dict(collections.Counter({k[1]: v for k, v in counts.items() if k[0] == "answer"}).most_common(5)),
    }


def main() -> None:
    args = model_args.parser(__doc__.splitlines()[0], 60, "test colour questions per variant").parse_args()
    qz, alphabet = model_args.load(args)
    r = measure(qz, args.n, alphabet)
    if args.json:
        print(json.dumps({"model": args.model, **r}))
        return
    print(f"{r['n']} colour questions, {r['object_tokens']} object tokens, budget <= {BUDGET[1]}")
    print("\n| decoder layer input | colour share of object-token variance |\n|---:|---:|")
    for layer, share in enumerate(r["colour_share"]):
        print(f"| {layer} | {share:.3f} |")
    print("\n| layer | image mass per head | share of it on the asked object per head |\n|---:|---|---|")
    for layer, (mass, share) in enumerate(zip(r["image_mass"], r["target_share"], strict=True)):
        print(f"| {layer} | {' '.join(f'{m:.2f}' for m in mass)} | {' '.join(f'{s:.2f}' for s in share)} |")
    print("\n| coloured objects | right |\n|---:|---:|")
    for k, v in r["accuracy"].items():
        print(f"| {k} | {v['right']}/{v['n']} |")
    print(f"\nmost common answers: {r['answers']}")


if __name__ == "__main__":
    main()
