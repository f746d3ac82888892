"""This project's rules from a per-visual-token relevance map to crop boxes in source pixels (pure functions).

The map is thresholded (or its peak taken) into cell ranges of the token grid; :mod:`qzoom_agent.boxes` holds the
geometry that turns cells into source-pixel boxes and back (its docstring defines ``grid``, ``resized_size`` and
``source_size``). The rules are options for adapters trained here: ``enclosing`` (one box, zero-padded blur, masked
again after it, minimum side in tokens, rounded outward), ``components`` and ``peak``. Released checkpoints use
:mod:`qzoom_agent.roi_official`, which reproduces the released post-processing exactly.
"""

from __future__ import annotations

import math
import numbers
from collections import deque
from dataclasses import dataclass
from typing import get_args

import torch
import torch.nn.functional as F

from .boxes import Box, Cells, Pair, cells_to_box, check_int, check_min_side_tokens, check_pair
from .config import RoiMode

OWN_MODES = tuple(m for m in get_args(RoiMode) if m != "official")  # this project's rules, run here


@dataclass(frozen=True)
class RoiConfig:
    """Settings of the relevance-map-to-box pipeline.

    Attributes:
        threshold: Foreground threshold on (blurred) sigmoid probabilities, in (0, 1).
        sink_min_tokens: ``qwen_sink_mask`` masks the corner strip only when ``gh * gw`` exceeds this.
        blur: Apply a 3x3 Gaussian (sigma 1) to the probabilities before thresholding.
        min_side_tokens: Minimum box side, in tokens, converted to source pixels per axis.
        mode: ``"enclosing"`` (Qwen: one box around everything that fired), ``"components"`` (LLaVA: one box per
            8-connected component) or ``"peak"`` (one box around the highest-scoring cell's neighbourhood: the cells
            8-connected to it whose probability is at least ``peak_ratio`` of its own; for a twig that ranks the
            asked target first but also scores other candidates above the threshold).
        max_boxes: Components mode: when more boxes than this remain, the map is too diffuse and we do not zoom.
        max_component_area: Components mode: components with more cells than this are dropped (too large to be a
            useful zoom target).
        peak_ratio: Peak mode: share of the peak probability a connected cell needs to join the box, in (0, 1].
    """

    threshold: float = 0.15
    sink_min_tokens: int = 256
    blur: bool = True
    min_side_tokens: float = 1.0
    mode: RoiMode = "enclosing"
    max_boxes: int = 2
    max_component_area: int = 225
    peak_ratio: float = 0.3

    def __post_init__(self) -> None:
        if not isinstance(self.threshold, numbers.Real) or not 0.0 < float(self.threshold) < 1.0:
            raise ValueError(f"threshold must be a probability strictly between 0 and 1, got {self.threshold!r}")
        check_int("sink_min_tokens", self.sink_min_tokens, minimum=0)
        if not isinstance(self.blur, bool):
            raise ValueError(f"blur must be True or False, got {self.blur!r}")
        check_min_side_tokens(self.min_side_tokens)
        if self.mode not in OWN_MODES:
            raise ValueError(f"mode must be 'enclosing', 'components' or 'peak' (the released rule is "
                             f"roi_official's), got {self.mode!r}")
        if not isinstance(self.peak_ratio, numbers.Real) or not 0.0 < float(self.peak_ratio) <= 1.0:
            raise ValueError(f"peak_ratio must be in (0, 1], got {self.peak_ratio!r}")
        check_int("max_boxes", self.max_boxes, minimum=1)
        check_int("max_component_area", self.max_component_area, minimum=1)


def qwen_sink_mask(gh: int, gw: int, min_tokens: int = 256) -> torch.Tensor:
    """Keep-mask that removes Qwen's attention-sink corner strip.

    Large Qwen maps light up along the top of the first column and the start of the first row regardless of the
    query (attention sinks), which would stretch an enclosing box to the image corner.

    Args:
        gh, gw: Grid rows and columns.
        min_tokens: Mask only when ``gh * gw > min_tokens``; small maps have no reliable sink.

    Returns:
        (gh, gw) bool, True = keep. When masking, ``[:max(1, gh // 4), 0]`` and ``[0, :max(1, gw // 4)]`` are False.
    """
    check_pair("grid", (gh, gw), 0)
    keep = torch.ones(gh, gw, dtype=torch.bool)
    if gh * gw > min_tokens:
        keep[: max(1, gh // 4), 0] = False
        keep[0, : max(1, gw // 4)] = False
    return keep


def gaussian_blur3(prob: torch.Tensor) -> torch.Tensor:
    """3x3 Gaussian blur (sigma 1, kernel normalised to sum 1) with zero padding.

    Zero padding damps the border: a constant map ``p`` becomes about ``0.73 p`` on edges and ``0.53 p`` in corners.
    That is intended, as the border of the image is rarely the answer and should need stronger evidence.

    Args:
        prob: (gh, gw) float map.

    Returns:
        (gh, gw) blurred map, same dtype and device.
    """
    if prob.dim() != 2:
        raise ValueError(f"gaussian_blur3 expects a (gh, gw) map, got shape {tuple(prob.shape)}")
    if prob.numel() == 0:
        return prob.clone()
    taps = torch.exp(-0.5 * torch.tensor([1.0, 0.0, 1.0], dtype=prob.dtype, device=prob.device))
    kernel = torch.outer(taps, taps)
    kernel = (kernel / kernel.sum()).view(1, 1, 3, 3)
    return F.conv2d(prob[None, None], kernel, padding=1)[0, 0]


def _kept_probabilities(logits: torch.Tensor, sink_mask: torch.Tensor | None, caller: str
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes, then ``(sigmoid(logits) * keep, keep)``, both (gh, gw), ``keep`` all True without a sink mask.

    NaN counts as -inf (probability 0); the sigmoid runs in float32 even for bf16 inputs, as bf16 sigmoids near a
    threshold are too coarse to compare reliably.
    """
    if logits.dim() != 2:
        raise ValueError(f"{caller} expects (gh, gw) logits, got shape {tuple(logits.shape)}")
    if sink_mask is not None and tuple(sink_mask.shape) != tuple(logits.shape):
        raise ValueError(f"sink_mask shape {tuple(sink_mask.shape)} does not match logits {tuple(logits.shape)}")
    x = logits.detach().to(torch.float32)
    prob = torch.sigmoid(torch.where(torch.isnan(x), torch.full_like(x, -math.inf), x))
    keep = torch.ones_like(prob, dtype=torch.bool) if sink_mask is None else sink_mask.to(prob.device, torch.bool)
    return prob * keep, keep


def flood(cells: set[tuple[int, int]], start: tuple[int, int]) -> tuple[set[tuple[int, int]], Cells]:
    """The 8-connected component of ``start`` within ``cells`` (diagonal neighbours count) and its cell range."""
    seen, queue = {start}, deque([start])
    r0, c0, r1, c1 = start[0], start[1], start[0] + 1, start[1] + 1
    while queue:
        r, c = queue.popleft()
        r0, c0, r1, c1 = min(r0, r), min(c0, c), max(r1, r + 1), max(c1, c + 1)
        for nb in [(r + dr, c + dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)]:
            if nb in cells and nb not in seen:
                seen.add(nb)
                queue.append(nb)
    return seen, (r0, c0, r1, c1)


def foreground(logits: torch.Tensor, cfg: RoiConfig, sink_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Threshold a relevance map into a foreground mask.

    Pipeline: sigmoid -> multiply by ``sink_mask`` -> blur (if ``cfg.blur``) -> ``> cfg.threshold`` -> AND with
    ``sink_mask``. The mask is applied before the blur so the sink's mass does not spread, and again at the end so
    blurred neighbours cannot switch a masked cell back on.

    Non-finite logits: NaN is treated as -inf ("not fired"), so an all-NaN map gives an empty mask; +inf is a genuine
    saturated score (sigmoid 1) and fires; -inf never fires.

    Args:
        logits: Raw scores of shape (gh, gw), any float dtype or device.
        cfg: Pipeline settings.
        sink_mask: Optional bool keep-mask of shape (gh, gw), e.g. from ``qwen_sink_mask``.

    Returns:
        Bool tensor of shape (gh, gw), on the device of ``logits``.
    """
    prob, keep = _kept_probabilities(logits, sink_mask, "foreground")
    if cfg.blur:
        prob = gaussian_blur3(prob)
    return (prob > float(cfg.threshold)) & keep


def enclosing_cells(mask: torch.Tensor) -> Cells | None:
    """Smallest cell range around every True cell of a (gh, gw) bool mask.

    Returns:
        ``(r0, c0, r1, c1)`` with ``r1``/``c1`` exclusive, or None when no cell is True.
    """
    if mask.dim() != 2:
        raise ValueError(f"enclosing_cells expects a (gh, gw) mask, got shape {tuple(mask.shape)}")
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    if rows.numel() == 0:
        return None
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def component_cells(mask: torch.Tensor, cfg: RoiConfig) -> list[Cells]:
    """One cell range per 8-connected component (the LLaVA variant).

    Components of one cell are noise and dropped; components of 2-3 cells are too small to crop usefully and grow to
    the 3x3 range centred on their bounding box (clamped to the grid); components with more than
    ``cfg.max_component_area`` cells are dropped. If none or more than ``cfg.max_boxes`` remain, the map is not
    trusted and ``[]`` is returned.

    Args:
        mask: Bool tensor of shape (gh, gw).
        cfg: Pipeline settings.

    Returns:
        Ranges ``(r0, c0, r1, c1)`` (exclusive ends), sorted by descending range area, ties by position.
    """
    if mask.dim() != 2:
        raise ValueError(f"component_cells expects a (gh, gw) mask, got shape {tuple(mask.shape)}")
    gh, gw = mask.shape
    todo = {(int(r), int(c)) for r, c in torch.nonzero(mask).tolist()}
    ranges: list[Cells] = []
    while todo:
        component, (r0, c0, r1, c1) = flood(todo, min(todo))  # min() keeps the traversal order deterministic
        todo -= component
        area = len(component)
        if area == 1 or area > cfg.max_component_area:
            continue
        if area < 4:
            cr, cc = (r0 + r1 - 1) // 2, (c0 + c1 - 1) // 2
            r0, c0, r1, c1 = max(0, cr - 1), max(0, cc - 1), min(gh, cr + 2), min(gw, cc + 2)
        ranges.append((r0, c0, r1, c1))
    if not ranges or len(ranges) > cfg.max_boxes:
        return []
    return sorted(ranges, key=lambda b: (-(b[2] - b[0]) * (b[3] - b[1]), b))


def peak_cells(logits: torch.Tensor, cfg: RoiConfig, sink_mask: torch.Tensor | None = None) -> Cells | None:
    """Cell range of the peak's neighbourhood (peak mode): the highest-probability cell and every cell 8-connected
    to it through cells of at least ``cfg.peak_ratio`` times its probability.

    No blur: a small target covers one or two tokens, and blurring would widen the neighbourhood and can move the
    peak. The sink mask applies as in :func:`foreground`.

    Args:
        logits: Raw scores of shape (gh, gw).
        cfg: Pipeline settings (``threshold``, ``peak_ratio``).
        sink_mask: Optional bool keep-mask of shape (gh, gw).

    Returns:
        ``(r0, c0, r1, c1)`` (exclusive ends), or None when no kept cell's probability exceeds ``cfg.threshold``.
    """
    prob, _ = _kept_probabilities(logits, sink_mask, "peak_cells")
    if prob.numel() == 0:
        return None
    peak = int(prob.flatten().argmax())
    top = float(prob.flatten()[peak])
    if not top > float(cfg.threshold):
        return None
    member = {(int(r), int(c)) for r, c in torch.nonzero(prob >= float(cfg.peak_ratio) * top).tolist()}
    return flood(member, divmod(peak, prob.shape[1]))[1]


def propose_boxes(
    logits: torch.Tensor,
    *,
    grid: Pair,
    resized_size: Pair,
    source_size: Pair,
    cfg: RoiConfig,
    sink_mask: torch.Tensor | None = None,
) -> list[Box]:
    """Relevance map -> zoom boxes in source pixels; ``[]`` means "do not zoom".

    Args:
        logits: Raw scores, shape (gh * gw,) in raster order or (gh, gw).
        grid, resized_size, source_size: Geometry, see the module docstring; a grid with zero cells gives ``[]``.
        cfg: Pipeline settings; ``cfg.mode`` picks one enclosing box or up to ``cfg.max_boxes`` component boxes.
        sink_mask: Optional (gh, gw) bool keep-mask, e.g. ``qwen_sink_mask(gh, gw, cfg.sink_min_tokens)``.

    Returns:
        Enclosing and peak modes: ``[]`` or ``[box]``. Components mode: 0 to ``cfg.max_boxes`` boxes, largest first.

    Raises:
        ValueError: When ``logits.numel() != gh * gw`` or a size is not positive. NaN, infinite, constant or empty
            maps never raise.
    """
    gh, gw = check_pair("grid", grid, 0)
    check_pair("source_size", source_size, 1)
    if logits.numel() != gh * gw:
        raise ValueError(f"logits has {logits.numel()} values but grid {grid} needs {gh * gw}")
    if gh * gw == 0:
        return []
    check_pair("resized_size", resized_size, 1)
    if cfg.mode == "peak":
        cells = peak_cells(logits.reshape(gh, gw), cfg, sink_mask)
        return [] if cells is None else [cells_to_box(cells, (gh, gw), resized_size, source_size, cfg.min_side_tokens)]
    mask = foreground(logits.reshape(gh, gw), cfg, sink_mask)
    if cfg.mode == "enclosing":
        cells = enclosing_cells(mask)
        ranges = [] if cells is None else [cells]
    else:
        ranges = component_cells(mask, cfg)
    return [cells_to_box(c, (gh, gw), resized_size, source_size, cfg.min_side_tokens) for c in ranges]
