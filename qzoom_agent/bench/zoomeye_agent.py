"""ZoomEye (EMNLP 2025): a training-free best-first search over an image tree, driven by Yes/No probes of the model.

The root is the whole image; a node splits into 4 sub-patches (2x2; 1x4 or 4x1 for patches at least twice as tall as
wide or the reverse, as the reference's ``split_4subpatches``) until its longer side is below the encoder's input side
at the view's budget (`vicrop_agent.encoder_side`) or ``max_depth`` is reached. Each probe is one forward pass on one
node's view whose next-token logits give ``conf = 2 * softmax(logit_yes, logit_no)[0] - 1`` in [-1, 1], as the
reference's ``_cal_confidence``. A node's priority is ``w(d) * existence + (1 - w(d)) * latent`` with
``w(d) = bias + (1 - bias) * d**2 / D**2`` (D the tree's depth). Popping the best node asks the answering probe;
the search stops when it reaches the threshold; every time the pop limit is hit the threshold drops by the next step
and the best popped node above it, if any, is taken (`best_first_search`, the reference's ``zoom_eye_search_type1``).

Choices for this project, each documented where coded:
- the local variant (the reference's ``ZoomModelLocal``): a probe sees one image, the node's patch grown to at least
  the encoder's input side around its centre (slid inside the image; the reference clips it at the border), encoded at
  the view's budget; the root's view is the global view;
- the visual cue ``{o}`` comes from a rule (`visual_cue`: the noun phrase after "the"), not from the model with
  in-context examples (a ``cue`` callable may replace it); one cue, so only the type-1 search runs (the reference's
  post-order search of "all X" cues is not implemented);
- Yes/No are the first token of each word (a character tokenizer has no single-token "Yes");
- the answer reads the best node's patch alone (the local variant), enlarged ``zoom`` times like the oracle view (the
  bundled ``zoomworld-tiny`` only reads enlarged glyphs), or the global view when the search ends at the root or finds
  nothing; any failure inside the search also answers from the global view (`last_error` says why).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..backbones import ImageInputs
from ..boxes import Box, check_int
from ..config import budget_for
from ..images import load_image
from .agents import AgentResult, Ledger
from .oracle import ORACLE_ZOOM
from .vicrop_agent import (
    chat_ids,
    check_zoom,
    encoder_side,
    generate_answer,
    next_token_logits,
    zoom_view,
)

if TYPE_CHECKING:
    from ..model import QZoomModel

logger = logging.getLogger(__name__)

PROMPTS = {  # the reference's "global" prompts (the answering one without its doubled "the")
    "existence": "Is there a {} in the image? Answer Yes or No.",
    "latent": "According to your common sense knowledge and the content of image, is it possible to find a {} by "
              "further zooming in the image? Answer Yes or No and tell the reason.",
    "answering": "Question: {}\nCould you answer the question based on the available visual information? "
                 "Answer Yes or No.",
}
THRESHOLD_STEPS = (0.1, 0.1, 0.2)  # perform_zoom_eye.py: threshold_descrease
# the answering threshold per family: 0.95 for Qwen-VL, 0.6 otherwise (LLaVA; the released eval script's value)
ANSWER_THRESHOLDS = {"qwen2_5_vl": 0.95, "qwen3_vl": 0.95}
DEFAULT_ANSWER_THRESHOLD = 0.6
_STOP = {"to", "above", "below", "or", "and", "of", "in", "on", "at", "with", "is", "are", "that", "which", "from"}


@dataclass(eq=False)
class Node:
    """A patch of the image tree: ``box`` (x1, y1, x2, y2) in source pixels, exclusive ends."""

    box: tuple[int, int, int, int]
    depth: int
    children: list[Node] = field(default_factory=list)
    priority: float | None = None
    answering: float | None = None


def split_box(box: tuple[int, int, int, int], split: int = 4) -> list[tuple[int, int, int, int]]:
    """``box`` cut into ``split`` (a square number) patches, row by row: k x k, or 1 x split / split x 1 for a patch
    at least twice as tall as wide / as wide as tall. Strides are floored; the last row and column take the rest."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    k = math.isqrt(split)
    cols, rows = (1, split) if h / w >= 2 else (split, 1) if h / w <= 0.5 else (k, k)
    xs = [x1 + i * (w // cols) for i in range(cols)] + [x2]
    ys = [y1 + j * (h // rows) for j in range(rows)] + [y2]
    return [(xs[i], ys[j], xs[i + 1], ys[j + 1]) for j in range(rows) for i in range(cols)]


def build_tree(size: tuple[int, int], patch_size: float, split: int = 4, max_depth: int = 5) -> tuple[Node, int]:
    """The image tree of an image of ``size`` (width, height): a node whose longer side is below ``patch_size``,
    or at ``max_depth``, or too small to cut, is a leaf. Returns the root and the tree's depth."""
    root = Node((0, 0, *size), 0)
    depth, stack = 0, [root]
    while stack:
        node = stack.pop()
        depth = max(depth, node.depth)
        x1, y1, x2, y2 = node.box
        if max(x2 - x1, y2 - y1) < patch_size or node.depth >= max_depth or min(x2 - x1, y2 - y1) < split:
            continue
        node.children = [Node(b, node.depth + 1) for b in split_box(node.box, split)]
        stack.extend(node.children)
    return root, depth


@dataclass
class SearchResult:
    """The node to answer from (None: none passed), every node popped in order, and the final threshold."""

    best: Node | None
    popped: list[Node]
    threshold: float


def best_first_search(root: Node, depth: int, confidence: Callable[[Node, str], float], *, threshold: float,
                      lower: float = 0.0, steps: tuple[float, ...] = THRESHOLD_STEPS, pop_limit: int | None = None,
                      interval: int = 2, bias: float = 0.2) -> SearchResult:
    """ZoomEye's type-1 search.

    Args:
        root: the tree's root; depth: the tree's depth (D in the weight).
        confidence: ``confidence(node, kind)`` in [-1, 1] for kind "existence", "latent" or "answering".
        threshold: the answering confidence that ends the search; lowered by ``steps`` (the last one repeats) each
            time the number of pops reaches the limit, which then grows by ``interval``.
        lower: the search gives up once the threshold falls below it.
        pop_limit: the first pop limit; default ``3 * depth`` (the reference's ``pop_limit_func``).
        bias: the existence weight at depth 0.
    """
    limit = 3 * depth if pop_limit is None else pop_limit
    steps_left = list(steps)

    def priority(node: Node) -> float:
        if node.priority is None:
            w = bias + (1 - bias) * node.depth**2 / max(depth, 1) ** 2
            node.priority = w * confidence(node, "existence") + (1 - w) * confidence(node, "latent")
        return node.priority

    queue, popped = [root], []
    while queue:
        node = queue.pop(0)
        popped.append(node)
        node.answering = confidence(node, "answering")
        if node.answering >= threshold:
            return SearchResult(node, popped, threshold)
        if len(popped) >= limit:
            threshold -= steps_left[0]
            if len(steps_left) > 1:
                steps_left.pop(0)
            limit += interval
            passed = [n for n in popped if n.answering >= threshold]
            if passed:
                return SearchResult(max(passed, key=lambda n: n.answering), popped, threshold)
            if threshold < lower:
                break
        queue.extend(node.children)
        queue.sort(key=priority, reverse=True)  # stable: equal priorities keep their order
    return SearchResult(None, popped, threshold)


def visual_cue(question: str) -> str:
    """The object a question is about, by rule: the words after the first "the", up to punctuation or a preposition
    or conjunction; else what "how many" counts; else the question's first line.

    Examples:
        >>> visual_cue("What is written on the green tag?"), visual_cue("Is the red tag above or below the blue tag?")
        ('green tag', 'red tag')
        >>> visual_cue("How many red dots are there?"), visual_cue("What shape is the large red object?")
        ('red dots', 'large red object')
    """
    line = question.strip().splitlines()[0] if question.strip() else ""
    for pattern in (r"\bthe\s+([^?.,;:!\n]+)", r"\bhow many\s+([^?.,;:!\n]+)"):
        m = re.search(pattern, line, re.IGNORECASE)
        if m:
            words = []
            for word in m.group(1).split():
                if word.lower() in _STOP:
                    break
                words.append(word)
            if words:
                return " ".join(words)
    return line.rstrip("?. ") or question


def grow_box(box: tuple[int, int, int, int], side: float, size: tuple[int, int]) -> Box:
    """``box`` grown to at least ``side`` px a side around its centre, slid inside an image of ``size``."""
    out = []
    for lo, hi, limit in ((box[0], box[2], size[0]), (box[1], box[3], size[1])):
        length = min(limit, max(hi - lo, math.ceil(side)))
        start = min(max(0, (lo + hi) // 2 - length // 2), limit - length)
        out += [start, start + length]
    return Box(out[0], out[2], out[1], out[3])


class ZoomEyeAgent:
    """ZoomEye's tree search around a plain VLM (its Q-Zoom heads, if any, are not used).

    Costs: every probe is one forward pass through all layers that encodes its one image (no cache is shared between
    the probes of a node: the stock forward takes pixels); the answer is one ``generate``. ``zooms`` counts the
    distinct sub-image patches the search looked at (the answer's crop is one of them).

    Args:
        model: the loaded model.
        tokens: max visual tokens of the global view and of each probe's view (min ``min(256, tokens)``).
        name: the agent's name in results.
        split: sub-patches per node (a square number; 4 as the reference).
        max_depth: the tree's depth limit (5 as the reference).
        answer_threshold: the answering confidence in [-1, 1] that ends the search; default by family as the
            reference: 0.95 for Qwen-VL (P(Yes) >= 0.975), 0.6 for others (LLaVA; P(Yes) >= 0.8).
        max_pops: the first pop limit (default 3 x the tree's depth); each time it is reached the threshold drops by
            `THRESHOLD_STEPS` and the limit grows by 2, down to ``lower_threshold``.
        max_new_tokens: decoding budget of the answer.
        lower_threshold: the threshold below which the search gives up (0, as the reference).
        bias: the existence weight at the root (0.2, the reference's local models).
        patch_size: the leaf size in source pixels; default the encoder's input side at ``tokens``.
        zoom: enlargement of the answer's crop (1: native resolution, as the reference).
        answer_tokens: max visual tokens of the answer's crop; default ``tokens``.
        cue: a function from question to visual cue; default `visual_cue`.

    Raises:
        ValueError: a budget, depth, threshold or zoom out of range, or a tokenizer without distinct Yes/No tokens.
    """

    def __init__(self, model: QZoomModel, tokens: int, name: str, *, split: int = 4, max_depth: int = 5,
                 answer_threshold: float | None = None, max_pops: int | None = None, max_new_tokens: int = 8,
                 lower_threshold: float = 0.0, bias: float = 0.2, patch_size: int | None = None,
                 zoom: float = ORACLE_ZOOM, answer_tokens: int | None = None,
                 cue: Callable[[str], str] | None = None) -> None:
        self.model = model
        self.budget = budget_for(check_int("tokens", tokens, 1))
        self.name = name
        if check_int("split", split, 4) != math.isqrt(split) ** 2:
            raise ValueError(f"split must be a square number >= 4 (4 as ZoomEye), got {split}")
        self.split = split
        self.max_depth = check_int("max_depth", max_depth, 0)
        if answer_threshold is None:
            answer_threshold = ANSWER_THRESHOLDS.get(model.adapter.family, DEFAULT_ANSWER_THRESHOLD)
        for label, value in (("answer_threshold", answer_threshold), ("lower_threshold", lower_threshold)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1 <= value <= 1:
                raise ValueError(f"{label} must be a confidence in [-1, 1], got {value!r}")
        if lower_threshold > answer_threshold:
            raise ValueError(f"lower_threshold ({lower_threshold}) must not exceed answer_threshold "
                             f"({answer_threshold})")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not 0 <= bias <= 1:
            raise ValueError(f"bias must be in [0, 1], got {bias!r}")
        self.answer_threshold, self.lower_threshold, self.bias = float(answer_threshold), float(lower_threshold), bias
        self.max_pops = None if max_pops is None else check_int("max_pops", max_pops, 1)
        self.max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
        self.patch_size = None if patch_size is None else check_int("patch_size", patch_size, 1)
        self.zoom = check_zoom(zoom)
        self.answer_tokens = tokens if answer_tokens is None else check_int("answer_tokens", answer_tokens, 1)
        if cue is not None and not callable(cue):
            raise ValueError(f"cue must be a function from question to cue, got {cue!r}")
        self.cue = cue or visual_cue
        tok = model.adapter.tokenizer
        # the first token of each word: the word itself for BPE vocabularies, its first character for zoomworld-tiny
        firsts = [tok(word, add_special_tokens=False)["input_ids"][:1] for word in ("Yes", "No")]
        if not all(firsts) or firsts[0] == firsts[1]:
            raise ValueError(f"the tokenizer has no distinct first tokens for 'Yes' and 'No' (got {firsts})")
        self.yes_no = [firsts[0][0], firsts[1][0]]
        self.last_error: str | None = None  # why the last question fell back to the global view, if it did

    def _prober(self, source: Any, view: ImageInputs, question: str, cue: str, side: float, ledger: Ledger,
                views: dict[int, ImageInputs]) -> Callable[[Node, str], float]:
        """``confidence(node, kind)`` over the model: one forward pass per call, each counted in ``ledger``;
        ``views`` collects each probed node's view (resized pixels only: the tower still runs on every probe)."""
        a = self.model.adapter

        def confidence(node: Node, kind: str) -> float:
            if id(node) not in views:
                box = grow_box(node.box, side, source.size)
                views[id(node)] = view if node.depth == 0 else a.prepare_image(
                    source.crop(box.as_tuple()), min_tokens=self.budget[0], max_tokens=self.budget[1])
            text = PROMPTS[kind].format(question if kind == "answering" else cue)
            image = views[id(node)]
            logits = next_token_logits(a, chat_ids(a, [image], text), [image], ledger)
            return 2 * float(torch.softmax(logits[self.yes_no], 0)[0]) - 1

        return confidence

    def search(self, source: Any, view: ImageInputs, question: str, ledger: Ledger,
               views: dict[int, ImageInputs]) -> tuple[SearchResult, float]:
        """Build the tree of ``source`` and search it; returns the result and the patch side used. ``views`` collects
        the views of the nodes probed (keyed by node id; the root's is ``view``)."""
        side = float(self.patch_size or encoder_side(view))
        root, depth = build_tree(source.size, side, self.split, self.max_depth)
        probe = self._prober(source, view, question, self.cue(question), side, ledger, views)
        found = best_first_search(root, depth, probe, threshold=self.answer_threshold, lower=self.lower_threshold,
                                  pop_limit=self.max_pops, bias=self.bias)
        return found, side

    def run(self, image: Any, question: str) -> AgentResult:
        """Answer ``question`` about ``image`` from the patch ZoomEye's search settles on (or the global view)."""
        t0 = time.perf_counter()
        a, ledger = self.model.adapter, Ledger()
        source = load_image(image)
        view = a.prepare_image(source, min_tokens=self.budget[0], max_tokens=self.budget[1])
        self.last_error = None
        images, box, views = [view], None, {}
        try:
            found, side = self.search(source, view, question, ledger, views)
            if found.best is not None and found.best.depth > 0:
                box = grow_box(found.best.box, side, source.size)
                images = [zoom_view(a, source, box, self.zoom, self.answer_tokens)]
        except Exception as err:  # noqa: BLE001 - any failure of the search answers from the global view
            logger.warning("%s: search failed (%s); answering from the global view", self.name, err)
            self.last_error = f"{type(err).__name__}: {err}"
            images, box = [view], None
        text = generate_answer(a, chat_ids(a, images, question), images, self.max_new_tokens, ledger)
        zooms = sum(1 for v in views.values() if v is not view)  # the sub-image patches probed
        return ledger.result(text, t0, zooms=zooms, bbox=box)
