"""Reading diagnostics: how a model reads held-out dense crops, split by tag length and by tags per crop.

Dense crops (1-3 free-placed tags, 16-56 px glyphs; the recipe's ``answer_data.dense_example``) come from the
held-out crop range, never a training seed. A model that reads a tag as an unordered bag of glyphs does well on
1-character tags and near chance on longer ones; one that cannot bind the asked colour to its tag fails when the
crop holds several tags. Run::

    python research/dense_reading.py [--model DIR] [--n 300] [--json]
"""

from __future__ import annotations

import collections
import json
import random

import model_args  # research/model_args.py: run these scripts as python research/NAME.py
from tqdm import tqdm

from qzoom_agent.model import QZoomModel
from qzoom_agent.recipes.zoomworld_tiny.answer_data import AnswerDataConfig, dense_example
from qzoom_agent.scoring import is_correct


def read_dense(qz: QZoomModel, n: int, alphabet: str) -> dict[str, list[int]]:
    """``{"chars=K": [right, asked], "tags=1" / "tags=2+": [right, asked]}`` over ``n`` held-out dense crops."""
    cfg = AnswerDataConfig(dense_max_tags=3, dense_sizes=(16, 56))
    tally: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for k in tqdm(range(n), desc="dense crops", mininterval=2.0):
        ex = dense_example(random.Random(f"dense-eval/{k}"), cfg, alphabet, k, split="eval")
        out = qz.answer(ex.image, ex.question, mode="never", budget=ex.budget, max_new_tokens=8).text
        right = int(is_correct(out, ex.answer))
        for key in (f"chars={len(ex.answer)}", "tags=1" if len(ex.dense.tags) == 1 else "tags=2+"):
            tally[key][0] += right
            tally[key][1] += 1
    return dict(sorted(tally.items()))


def main() -> None:
    args = model_args.parser(__doc__.splitlines()[0], 300, "held-out crops").parse_args()
    qz, alphabet = model_args.load(args)
    tally = read_dense(qz, args.n, alphabet)
    if args.json:
        print(json.dumps({"model": args.model, "n": args.n, "tally": tally}))
        return
    for key, (right, asked) in tally.items():
        print(f"{key:8s} {right:4d}/{asked:<4d} {right / asked:.3f}")


if __name__ == "__main__":
    main()
