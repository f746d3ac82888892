"""Stage 1's RoI evaluation: how often the twig's box hits the target on val questions, and where it misses.

A box *hits* when it covers >= 70% of the target within 16x its area. The hit rate is broken down by question family
and by the target's size in global-view tokens, and set beside how often the twig's top token lies on the target:
that separates the twig's ranking from the box rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..boxes import box_to_cells, coverage, iou, roi_hit, sanitize_box
from ..model import QZoomModel
from ..roi import qwen_sink_mask
from ..zoomworld import VARIANTS, generate, seed_for
from ..zoomworld.questions import FINE_FAMILIES
from .stage1_config import Stage1Config

SIZE_EDGES = (0.5, 1.0, 2.0)  # target side, in global-view tokens, where the RoI hit is broken down


def size_bucket(side_tokens: float, edges: tuple[float, ...] = SIZE_EDGES) -> str:
    """The label of the size bucket ``side_tokens`` falls in.

    Examples:
        >>> [size_bucket(x) for x in (0.3, 0.5, 1.2, 7.0)]
        ['<0.5', '0.5-1', '1-2', '>=2']
    """
    for i, edge in enumerate(edges):
        if side_tokens < edge:
            return f"<{edge:g}" if i == 0 else f"{edges[i - 1]:g}-{edge:g}"
    return f">={edges[-1]:g}"


def target_side_tokens(box: Sequence[float], grid: tuple[int, int], source_size: tuple[int, int]) -> float:
    """The larger side of ``box`` (source pixels) in tokens of a view that puts ``source_size`` on ``grid``."""
    (gh, gw), (sw, sh) = grid, source_size
    return max((box[2] - box[0]) * gw / sw, (box[3] - box[1]) * gh / sh)


def peak_on_target(logits: torch.Tensor, target: Sequence[float], grid: tuple[int, int],
                   resized_size: tuple[int, int], source_size: tuple[int, int], sink_min_tokens: int,
                   canvas: tuple[int, int, int, int] | None = None) -> bool:
    """Whether the twig's top-scoring token lies on ``target`` (a cell the box overlaps), with the sink strip
    masked as the box rule masks it.

    This splits a miss in two: a wrong top token is a selection error (the twig ranked another thing first), a
    right one that still misses is the box rule's.

    Args:
        logits: (gh, gw) or (gh * gw,) raw twig scores of the global view.
        target: (x1, y1, x2, y2) in source pixels.
        grid, resized_size, source_size: the view's geometry (see :mod:`qzoom_agent.boxes`).
        sink_min_tokens: as ``QZoomConfig.sink_min_tokens``.
        canvas: the view's square padding, if any (``Perception.canvas``).
    """
    gh, gw = grid
    keep = qwen_sink_mask(gh, gw, sink_min_tokens)
    scores = logits.detach().float().cpu().reshape(gh, gw).masked_fill(~keep, -math.inf)
    row, col = divmod(int(scores.flatten().argmax()), gw)
    box = sanitize_box(*target, source_size)
    if box is None:  # a target off the image: no token lies on it
        return False
    r0, c0, r1, c1 = box_to_cells(box, grid, resized_size, source_size, canvas)
    return r0 <= row < r1 and c0 <= col < c1


def _hit_rates(groups: dict[str, list[bool]], order: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    keys = [k for k in order if k in groups] if order is not None else sorted(groups)
    return {k: {"hit": sum(groups[k]) / len(groups[k]), "n": len(groups[k])} for k in keys}


@torch.inference_mode()
def evaluate_roi(qz: QZoomModel, cfg: Stage1Config, alphabet: str, n: int) -> dict:
    """RoI quality on ``n`` val-split fine questions at the stage's budget (the twig always runs).

    Returns:
        ``roi_hit`` (share whose box covers >= 70% of the target with <= 16x its area), ``roi_coverage`` and
        ``roi_iou`` (means; no box counts 0), ``roi_found`` (share with any box), ``n``, and the hit rate broken
        down by question family (``roi_hit_by_family``) and by the target's larger side in global-view tokens
        (``roi_hit_by_size``, buckets of :data:`SIZE_EDGES`, smallest first), each ``{key: {"hit": rate, "n":
        count}}``. ``roi_top1`` and ``roi_top1_by_family`` (same layout) give the share whose top-scoring token
        lies on the target (:func:`peak_on_target`): where it is well below the hit rate's ceiling, the misses
        are the twig's ranking, not the box rule. On the bundled base a target under half a token is rarely
        found: small things are where the twig is blind.
    """
    cover = ious = found = 0.0
    by_family: dict[str, list[bool]] = {}
    by_size: dict[str, list[bool]] = {}
    top1: dict[str, list[bool]] = {}
    fine = {f: w for f, w in cfg.families.items() if f in FINE_FAMILIES} or dict.fromkeys(FINE_FAMILIES, 1.0)
    for k in range(n):
        s = generate(VARIANTS[k % 2], seed_for("val", k), alphabet=alphabet, mix=fine, size_range=cfg.size_range)
        p = qz.perceive(s.image, s.question, roi="always", budget=cfg.budget)
        box = p.box.to_json() if p.box else None
        target = list(s.target_box)
        hit = roi_hit(box, target)
        by_family.setdefault(s.family, []).append(hit)
        by_size.setdefault(size_bucket(target_side_tokens(target, p.grid, p.image_size)), []).append(hit)
        top1.setdefault(s.family, []).append(peak_on_target(p.roi_logits, target, p.grid, p.resized_size,
                                                            p.image_size, qz.config.sink_min_tokens, p.canvas))
        cover += coverage(box, target) or 0.0
        ious += iou(box, target) or 0.0
        found += box is not None
    hits = sum(sum(v) for v in by_family.values())
    return {"roi_hit": hits / n, "roi_coverage": cover / n, "roi_iou": ious / n, "roi_found": found / n, "n": n,
            "roi_hit_by_family": _hit_rates(by_family),
            "roi_hit_by_size": _hit_rates(by_size, [size_bucket(0.0)] + [size_bucket(e) for e in SIZE_EDGES]),
            "roi_top1": sum(sum(v) for v in top1.values()) / n, "roi_top1_by_family": _hit_rates(top1)}
