"""Held-out evaluation of phase 2 through the inference path (`QZoomModel.answer`, ``mode="never"``, greedy).

Three sets from ZoomWorld's VAL split (never a training seed):

* ``oracle_read``: fine read questions; the target tag with one panel size of context per side, enlarged 3x and
  encoded at <= 256 tokens (an ideal zoom's view).
* ``coarse``: colour/shape of the large object on the whole scene at <= 256 tokens.
* ``dense_read``: small dense crops (1-3 tags) from a held-out crop range, the curriculum's first task.
* ``tile_read``: fine read questions on a 448 px native-scale window holding the target (<= 256 tokens): reading
  small glyphs among other tags without enlargement, what a high token budget asks of the model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ...backbones import BackboneAdapter
from ...bench.oracle import ORACLE_TOKENS, oracle_view
from ...config import QZoomConfig
from ...model import QZoomModel
from ...scoring import is_correct
from ...zoomworld import VARIANTS, generate, seed_for
from .answer_data import AnswerDataConfig, dense_example, tile_window

EVAL_SPLIT = "val"
COARSE_OFFSET = 10**6  # coarse scenes use val indices from here on, read scenes from 0
TILE_OFFSET = 2 * 10**6  # and native tiles from here
ORACLE_BUDGET, COARSE_BUDGET = (4, ORACLE_TOKENS), (64, 256)
TILE_SIDE = 448  # px at native scale: 16x16 tokens


@dataclass
class EvalItem:
    """One held-out question: the image the model sees, question, answer, token budget."""

    image: object
    question: str
    answer: str
    budget: tuple[int, int]


def eval_seeds(n: int) -> dict[str, list[int]]:
    """ZoomWorld seeds of the two held-out sets (all inside ``SPLITS["val"]``)."""
    return {"oracle_read": [seed_for(EVAL_SPLIT, k) for k in range(n)],
            "coarse": [seed_for(EVAL_SPLIT, COARSE_OFFSET + k) for k in range(n)],
            "tile_read": [seed_for(EVAL_SPLIT, TILE_OFFSET + k) for k in range(n)]}


def eval_sets(cfg: AnswerDataConfig, alphabet: str, n: int) -> dict[str, list[EvalItem]]:
    """The held-out sets, ``n`` items each, variants alternating hr/doc."""
    seeds = eval_seeds(n)
    sets: dict[str, list[EvalItem]] = {"oracle_read": [], "coarse": [], "tile_read": [], "dense_read": []}
    for k, seed in enumerate(seeds["oracle_read"]):
        s = generate(VARIANTS[k % 2], seed, alphabet=alphabet, mix={"read": 1.0}, size_range=cfg.size_range)
        crop = oracle_view(s.image, tuple(s.target_box))
        sets["oracle_read"].append(EvalItem(crop, s.question, s.answer, ORACLE_BUDGET))
    for k, seed in enumerate(seeds["coarse"]):
        s = generate(VARIANTS[k % 2], seed, alphabet=alphabet, mix={"color": 1.0, "shape": 1.0},
                     size_range=cfg.size_range)
        sets["coarse"].append(EvalItem(s.image, s.question, s.answer, COARSE_BUDGET))
    for k, seed in enumerate(seeds["tile_read"]):
        s = generate(VARIANTS[k % 2], seed, alphabet=alphabet, mix={"read": 1.0}, size_range=cfg.tile_size_range)
        window = tile_window(random.Random(seed), s.image.size, tuple(s.target_box), (TILE_SIDE, TILE_SIDE))
        sets["tile_read"].append(EvalItem(s.image.crop(window), s.question, s.answer, (4, 256)))
    for k in range(n):
        ex = dense_example(random.Random(f"dense-eval/{k}"), cfg, alphabet, k, split="eval")
        sets["dense_read"].append(EvalItem(ex.image, ex.question, ex.answer, ex.budget))
    return sets


def inference_model(adapter: BackboneAdapter) -> QZoomModel:
    """A head-less `QZoomModel` around ``adapter``'s (in-memory) model: the same code path as a loaded export."""
    return QZoomModel(adapter, None, QZoomConfig.for_backbone(adapter.num_layers, adapter.min_branch_layer))


def evaluate_answers(qz: QZoomModel, sets: dict[str, list[EvalItem]], max_new_tokens: int = 8) -> dict[str, float]:
    """Exact normalised-match accuracy per set: ``{f"{name}_acc": acc}``; the model is left in its prior mode."""
    model = qz.adapter.model
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    try:
        for name, items in sets.items():
            hits = sum(is_correct(qz.answer(it.image, it.question, mode="never", budget=it.budget,
                                            max_new_tokens=max_new_tokens).text, it.answer) for it in items)
            out[f"{name}_acc"] = hits / max(1, len(items))
    finally:
        model.train(was_training)
    return out
