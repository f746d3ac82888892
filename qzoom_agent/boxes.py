"""Boxes in source-image pixels and their geometry against a grid of merged visual tokens (pure functions).

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
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from PIL import Image

Cells = tuple[int, int, int, int]  # (r0, c0, r1, c1), r1/c1 exclusive
Pair = tuple[int, int]  # (gh, gw) grids, (width, height) sizes
# An RoI "hits" its target when it covers >= 70% of it within 16x its area (the SD-RPN bar of this project).
ROI_COVERAGE, ROI_MAX_AREA = 0.7, 16.0


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


BoxLike = Box | Sequence[float]  # a Box or (x1, y1, x2, y2) in source pixels


def check_min_side_tokens(value: object) -> None:
    if not isinstance(value, numbers.Real) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"min_side_tokens must be a finite number >= 0, got {value!r}")


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as an int if it is an integer (not a bool) >= ``minimum``, else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_pair(name: str, pair: Pair, minimum: int) -> tuple[int, int]:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"{name} must be a pair of ints, got {pair!r}")
    for value in pair:
        check_int(name, value, minimum)
    return int(pair[0]), int(pair[1])


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
    gh, gw = check_pair("grid", grid, 1)
    rw, rh = check_pair("resized_size", resized_size, 1)
    sw, sh = check_pair("source_size", source_size, 1)
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
    check_min_side_tokens(min_side_tokens)
    tokens = Fraction(min_side_tokens)
    x1, x2 = _fit_min_side(math.floor(c0 * cell_w), math.ceil(c1 * cell_w), math.ceil(tokens * cell_w), sw)
    y1, y2 = _fit_min_side(math.floor(r0 * cell_h), math.ceil(r1 * cell_h), math.ceil(tokens * cell_h), sh)
    return Box(x1, y1, x2, y2)


def box_to_cells(box: Box, grid: Pair, resized_size: Pair, source_size: Pair,
                 canvas: tuple[int, int, int, int] | None = None) -> Cells:
    """Cell range of every cell that the box overlaps with positive area.

    Args:
        box: Box in source pixels.
        grid, resized_size, source_size: Geometry, see the module docstring.
        canvas: for a view padded to a square (LLaVA): ``(ox, oy, cw, ch)``, the source pasted at ``(ox, oy)`` on a
            ``cw x ch`` canvas, which is what was resized; None for an unpadded view.

    Returns:
        ``(r0, c0, r1, c1)`` with exclusive ends, clamped to the grid.
    """
    if canvas is not None:
        ox, oy, cw, ch = canvas
        box, source_size = Box(box.x1 + ox, box.y1 + oy, box.x2 + ox, box.y2 + oy), (cw, ch)
    gh, gw, _, _, cell_w, cell_h = _geometry(grid, resized_size, source_size)
    # Cell c spans [c * cell, (c + 1) * cell); it overlaps [x1, x2) iff (c + 1) * cell > x1 and c * cell < x2.
    c0, c1 = math.floor(box.x1 / cell_w), math.ceil(box.x2 / cell_w)
    r0, r1 = math.floor(box.y1 / cell_h), math.ceil(box.y2 / cell_h)
    return min(r0, gh), min(c0, gw), min(r1, gh), min(c1, gw)


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
    sw, sh = check_pair("source_size", source_size, 1)
    check_int("min_side", min_side, 0)
    coords = (x1, y1, x2, y2)
    # Integers are always finite (and math.isfinite overflows on huge ones), so only non-integral reals are checked.
    if not all(isinstance(v, numbers.Integral) or (isinstance(v, numbers.Real) and math.isfinite(v)) for v in coords):
        return None
    xs, ys = _sanitize_axis(x1, x2, sw, min_side), _sanitize_axis(y1, y2, sh, min_side)
    return None if xs is None or ys is None else Box(xs[0], ys[0], xs[1], ys[1])


def box_intersection(a: Sequence[float], b: Sequence[float]) -> float:
    """Area shared by two ``(x1, y1, x2, y2)`` boxes (exclusive ends); 0 when they do not overlap."""
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def _xyxy(box: BoxLike) -> Sequence[float]:
    return box.as_tuple() if isinstance(box, Box) else box


def _area(box: Sequence[float]) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def iou(a: BoxLike | None, b: BoxLike | None) -> float | None:
    """Intersection over union of two boxes (:class:`Box` or ``(x1, y1, x2, y2)``); None when either is missing or
    both are empty.

    Examples:
        >>> iou((0, 0, 10, 10), (5, 0, 15, 10))
        0.3333333333333333
        >>> iou(Box(0, 0, 10, 10), (20, 20, 30, 30)), iou(None, (0, 0, 1, 1))
        (0.0, None)
    """
    if a is None or b is None:
        return None
    a, b = _xyxy(a), _xyxy(b)
    inter = box_intersection(a, b)
    union = _area(a) + _area(b) - inter
    return inter / union if union > 0 else None


def coverage(pred: BoxLike | None, target: BoxLike | None) -> float | None:
    """Fraction of ``target``'s area inside ``pred``, in [0, 1]; None when either is missing or the target is empty.

    Examples:
        >>> coverage((0, 0, 100, 100), (10, 10, 20, 20)), coverage(Box(0, 0, 15, 100), Box(10, 10, 20, 20))
        (1.0, 0.5)
    """
    if pred is None or target is None or _area(_xyxy(target)) <= 0:
        return None
    pred, target = _xyxy(pred), _xyxy(target)
    return box_intersection(pred, target) / _area(target)


def roi_hit(box: BoxLike | None, target: BoxLike | None, min_coverage: float = ROI_COVERAGE,
            max_area: float = ROI_MAX_AREA) -> bool:
    """Whether ``box`` covers at least ``min_coverage`` of ``target`` with at most ``max_area`` times its area: the
    bar an RoI is held to everywhere (stage 1's labels and evaluation, ``compare``'s ``roi_hit`` columns).

    Examples:
        >>> roi_hit((0, 0, 40, 40), (10, 10, 30, 30)), roi_hit((0, 0, 100, 100), (10, 10, 20, 20))
        (True, False)
    """
    c = coverage(box, target)
    return c is not None and c >= min_coverage and _area(_xyxy(box)) <= max_area * _area(_xyxy(target))
