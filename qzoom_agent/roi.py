"""Turn a per-visual-token relevance map into crop boxes in source-image pixels (pure functions, no model code).

Geometry arguments used throughout: ``grid = (gh, gw)`` merged visual tokens tile the ``resized_size = (rw, rh)``
image the model saw, and ``source_size = (W, H)`` is the original image. Cell ``(r, c)`` covers resized pixels
``x in [c * rw / gw, (c + 1) * rw / gw)`` (y likewise), scaled to source pixels by ``W / rw`` and ``H / rh``; the axes
scale independently because extreme aspect ratios are stretched. This covers Qwen-VL (``rw = gw * 28`` or ``gw * 32``)
and LLaVA (fixed 336 px square, 24 x 24 grid) alike. Coordinates are computed with exact fractions so that rounding
is always outward and never off by one.
"""

from __future__ import annotations

import math
import numbers
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import torch
import torch.nn.functional as F
from PIL import Image

Cells = tuple[int, int, int, int]  # (r0, c0, r1, c1), r1/c1 exclusive
Pair = tuple[int, int]  # (gh, gw) grids, (width, height) sizes


@dataclass(frozen=True)
class Box:
    """Axis-aligned box in source pixels, ``x2``/``y2`` exclusive.

    Construction checks ``0 <= x1 < x2`` and ``0 <= y1 < y2``; boxes produced by this module also satisfy
    ``x2 <= W`` and ``y2 <= H`` (the image size is not known to the Box itself).
    """

    x1: int
    y1: int
    x2: int
    y2: int

    def __post_init__(self) -> None:
        for name in ("x1", "y1", "x2", "y2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"Box.{name} must be an int, got {value!r}; round coordinates before building a Box")
            # Normalise numpy/torch integers to plain ints so the box is hashable and JSON-friendly.
            object.__setattr__(self, name, int(value))
        if not (0 <= self.x1 < self.x2 and 0 <= self.y1 < self.y2):
            raise ValueError(f"invalid Box {self.as_tuple()}: need 0 <= x1 < x2, 0 <= y1 < y2; try sanitize_box()")

    @property
    def width(self) -> int:
        return self.x2 - self.x1

    @property
    def height(self) -> int:
        return self.y2 - self.y1

    @property
    def area(self) -> int:
        return self.width * self.height

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.x1, self.y1, self.x2, self.y2)

    def to_json(self) -> list[int]:
        return [self.x1, self.y1, self.x2, self.y2]


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
    mode: Literal["enclosing", "components", "peak"] = "enclosing"
    max_boxes: int = 2
    max_component_area: int = 225
    peak_ratio: float = 0.3

    def __post_init__(self) -> None:
        if not isinstance(self.threshold, numbers.Real) or not 0.0 < float(self.threshold) < 1.0:
            raise ValueError(f"threshold must be a probability strictly between 0 and 1, got {self.threshold!r}")
        _check_int("sink_min_tokens", self.sink_min_tokens, minimum=0)
        if not isinstance(self.blur, bool):
            raise ValueError(f"blur must be True or False, got {self.blur!r}")
        _check_min_side_tokens(self.min_side_tokens)
        if self.mode not in ("enclosing", "components", "peak"):
            raise ValueError(f"mode must be 'enclosing' (Qwen), 'components' (LLaVA) or 'peak', got {self.mode!r}")
        if not isinstance(self.peak_ratio, numbers.Real) or not 0.0 < float(self.peak_ratio) <= 1.0:
            raise ValueError(f"peak_ratio must be in (0, 1], got {self.peak_ratio!r}")
        _check_int("max_boxes", self.max_boxes, minimum=1)
        _check_int("max_component_area", self.max_component_area, minimum=1)


def _check_min_side_tokens(value: object) -> None:
    if not isinstance(value, numbers.Real) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"min_side_tokens must be a finite number >= 0, got {value!r}")


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_pair(name: str, pair: Pair, minimum: int) -> tuple[int, int]:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"{name} must be a pair of ints, got {pair!r}")
    for value in pair:
        _check_int(name, value, minimum)
    return int(pair[0]), int(pair[1])


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
    _check_pair("grid", (gh, gw), 0)
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


def _flood(cells: set[tuple[int, int]], start: tuple[int, int]) -> tuple[set[tuple[int, int]], Cells]:
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
        component, (r0, c0, r1, c1) = _flood(todo, min(todo))  # min() keeps the traversal order deterministic
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
    return _flood(member, divmod(peak, prob.shape[1]))[1]


def _fit_min_side(lo: int, hi: int, min_len: int, limit: int) -> tuple[int, int]:
    """Grow ``[lo, hi)`` to ``min_len`` (capped to ``limit``) around its centre, then fit it into ``[0, limit]``."""
    min_len = max(1, min(min_len, limit))
    if hi - lo < min_len:
        lo -= (min_len - (hi - lo)) // 2
        hi = lo + min_len
    # Shift rather than clamp first, so a box at the border keeps its minimum size.
    if lo < 0:
        hi, lo = hi - lo, 0
    if hi > limit:
        lo, hi = lo - (hi - limit), limit
    return max(0, lo), min(limit, hi)


def _geometry(grid: Pair, resized_size: Pair, source_size: Pair) -> tuple[int, int, int, int, Fraction, Fraction]:
    gh, gw = _check_pair("grid", grid, 1)
    rw, rh = _check_pair("resized_size", resized_size, 1)
    sw, sh = _check_pair("source_size", source_size, 1)
    # Source pixels per cell along each axis: (resized px per cell) * (source px per resized px).
    return gh, gw, sw, sh, Fraction(rw, gw) * Fraction(sw, rw), Fraction(rh, gh) * Fraction(sh, rh)


def cells_to_box(
    cells: Cells,
    grid: Pair,
    resized_size: Pair,
    source_size: Pair,
    min_side_tokens: float = 1.0,
) -> Box:
    """Map a cell range to a box in source pixels that fully covers every cell in it.

    Starts are floored and ends ceiled. Each side is then at least ``min_side_tokens`` tokens in source pixels for
    that axis (at least 1 px, at most the image side): the box grows symmetrically, is shifted back inside the image
    and clamped.

    Args:
        cells: ``(r0, c0, r1, c1)``, exclusive ends, with ``0 <= r0 < r1 <= gh`` and ``0 <= c0 < c1 <= gw``.
        grid, resized_size, source_size: Geometry, see the module docstring.
        min_side_tokens: Minimum side in tokens.

    Returns:
        A Box with ``0 <= x1 < x2 <= W`` and ``0 <= y1 < y2 <= H``.
    """
    gh, gw, sw, sh, cell_w, cell_h = _geometry(grid, resized_size, source_size)
    r0, c0, r1, c1 = cells
    if not (0 <= r0 < r1 <= gh and 0 <= c0 < c1 <= gw):
        raise ValueError(f"cells {cells} must satisfy 0 <= r0 < r1 <= {gh} and 0 <= c0 < c1 <= {gw}")
    _check_min_side_tokens(min_side_tokens)
    tokens = Fraction(min_side_tokens)
    x1, x2 = _fit_min_side(math.floor(c0 * cell_w), math.ceil(c1 * cell_w), math.ceil(tokens * cell_w), sw)
    y1, y2 = _fit_min_side(math.floor(r0 * cell_h), math.ceil(r1 * cell_h), math.ceil(tokens * cell_h), sh)
    return Box(x1, y1, x2, y2)


def box_to_cells(box: Box, grid: Pair, resized_size: Pair, source_size: Pair) -> Cells:
    """Cell range of every cell that the box overlaps with positive area.

    Args:
        box: Box in source pixels.
        grid, resized_size, source_size: Geometry, see the module docstring.

    Returns:
        ``(r0, c0, r1, c1)`` with exclusive ends, clamped to the grid.
    """
    gh, gw, _, _, cell_w, cell_h = _geometry(grid, resized_size, source_size)
    # Cell c spans [c * cell, (c + 1) * cell); it overlaps [x1, x2) iff (c + 1) * cell > x1 and c * cell < x2.
    c0, c1 = math.floor(box.x1 / cell_w), math.ceil(box.x2 / cell_w)
    r0, r1 = math.floor(box.y1 / cell_h), math.ceil(box.y2 / cell_h)
    return min(r0, gh), min(c0, gw), min(r1, gh), min(c1, gw)


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
    gh, gw = _check_pair("grid", grid, 0)
    _check_pair("source_size", source_size, 1)
    if logits.numel() != gh * gw:
        raise ValueError(f"logits has {logits.numel()} values but grid {grid} needs {gh * gw}")
    if gh * gw == 0:
        return []
    _check_pair("resized_size", resized_size, 1)
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


def crop(image: Image.Image, box: Box) -> Image.Image:
    """Crop of the original image; ValueError when ``box`` does not lie inside it."""
    w, h = image.size
    if box.x2 > w or box.y2 > h:
        raise ValueError(f"box {box.as_tuple()} lies outside the {w}x{h} image; use sanitize_box() first")
    return image.crop(box.as_tuple())


def _sanitize_axis(lo: float, hi: float, limit: int, min_side: int) -> Pair | None:
    lo, hi = min(lo, hi), max(lo, hi)
    lo_i, hi_i = math.floor(lo), math.ceil(hi)
    if lo_i == hi_i:
        # A degenerate (zero-length) coordinate is a point; accept it when it is on the image, borders included.
        if not 0 <= lo_i <= limit:
            return None
    elif hi_i <= 0 or lo_i >= limit:
        return None
    return _fit_min_side(max(0, lo_i), min(limit, hi_i), min_side, limit)


def sanitize_box(x1: float, y1: float, x2: float, y2: float, source_size: Pair, min_side: int = 1) -> Box | None:
    """Make a valid Box from untrusted coordinates (tool calls, users).

    Inverted corners are swapped, coordinates are rounded outward and clamped to the image, and each side is grown to
    ``min_side`` px (capped to the image side) like ``cells_to_box`` does.

    Args:
        x1, y1, x2, y2: Corners in source pixels, in any order.
        source_size: ``(W, H)`` of the original image.
        min_side: Minimum side in pixels.

    Returns:
        The Box, or None for non-finite coordinates or a box entirely outside the image.
    """
    sw, sh = _check_pair("source_size", source_size, 1)
    _check_int("min_side", min_side, 0)
    coords = (x1, y1, x2, y2)
    # Integers are always finite (and math.isfinite overflows on huge ones), so only non-integral reals are checked.
    if not all(isinstance(v, numbers.Integral) or (isinstance(v, numbers.Real) and math.isfinite(v)) for v in coords):
        return None
    xs, ys = _sanitize_axis(x1, x2, sw, min_side), _sanitize_axis(y1, y2, sh, min_side)
    return None if xs is None or ys is None else Box(xs[0], ys[0], xs[1], ys[1])


def box_intersection(a: Sequence[float], b: Sequence[float]) -> float:
    """Area shared by two ``(x1, y1, x2, y2)`` boxes (exclusive ends); 0 when they do not overlap."""
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def coverage(pred: Box, target: Box) -> float:
    """Fraction of ``target``'s area inside ``pred``, in [0, 1]."""
    return box_intersection(pred.as_tuple(), target.as_tuple()) / target.area


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes, in [0, 1]."""
    inter = box_intersection(a.as_tuple(), b.as_tuple())
    return inter / (a.area + b.area - inter)
