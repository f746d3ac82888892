"""Tests for qzoom_agent.roi (relevance map -> crop boxes) and qzoom_agent.boxes (their source-pixel geometry)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from qzoom_agent.boxes import Box, box_to_cells, cells_to_box, coverage, crop, iou, sanitize_box
from qzoom_agent.roi import RoiConfig, component_cells, foreground, peak_cells, propose_boxes, qwen_sink_mask

HOT, COLD = 30.0, -30.0
SHARP = RoiConfig(threshold=0.5, blur=False)


def _cell_extent(r: int, c: int, grid, source) -> tuple[float, float, float, float]:
    """Exact source-pixel extent (x1, y1, x2, y2) of cell (r, c), computed independently of the module."""
    (gh, gw), (sw, sh) = grid, source
    return c * sw / gw, r * sh / gh, (c + 1) * sw / gw, (r + 1) * sh / gh


def _min_side(grid, source, tokens: float) -> tuple[float, float]:
    """Expected minimum width/height: tokens * source px per token, at least 1 px, at most the image side."""
    (gh, gw), (sw, sh) = grid, source
    return min(sw, max(1.0, tokens * sw / gw)), min(sh, max(1.0, tokens * sh / gh))


def _assert_valid(box: Box, source) -> None:
    sw, sh = source
    assert 0 <= box.x1 < box.x2 <= sw
    assert 0 <= box.y1 < box.y2 <= sh
    assert box.area > 0


def _contains(outer, inner) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]


def _one_hot(grid, r: int, c: int) -> torch.Tensor:
    logits = torch.full(grid, COLD)
    logits[r, c] = HOT
    return logits


# ---------------------------------------------------------------------------------------------------------------------
# Hypothesis strategies
# ---------------------------------------------------------------------------------------------------------------------

SIDES = st.one_of(st.integers(1, 20000), st.sampled_from([1, 2, 3, 5000, 19999, 20000]))


@st.composite
def geometries(draw):
    """(grid, resized_size, source_size): Qwen-style (rw = gw * p) or LLaVA-style fixed square input."""
    gh, gw = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    if draw(st.booleans()):
        p = draw(st.sampled_from([28, 32]))
        resized = (gw * p, gh * p)
    else:
        side = draw(st.sampled_from([224, 336, 384, 448]))
        resized = (side, side)
    return (gh, gw), resized, (draw(SIDES), draw(SIDES))


@st.composite
def logit_maps(draw, grid):
    """Random maps with controllable scale/offset and sprinkled NaN/+inf/-inf, built from a hypothesis-drawn seed."""
    gh, gw = grid
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([0.0, 0.1, 1.0, 5.0, 50.0]))
    offset = draw(st.floats(-10, 10))
    logits = torch.randn(gh, gw, generator=gen) * scale + offset
    for value in (math.nan, math.inf, -math.inf):
        frac = draw(st.sampled_from([0.0, 0.0, 0.05, 0.5, 1.0]))
        logits[torch.rand(gh, gw, generator=gen) < frac] = value
    return logits


@st.composite
def configs(draw, grid):
    cfg = RoiConfig(
        threshold=draw(st.floats(1e-6, 1 - 1e-6)),
        blur=draw(st.booleans()),
        min_side_tokens=draw(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.7, 100.0])),
        mode=draw(st.sampled_from(["enclosing", "components"])),
        max_boxes=draw(st.integers(1, 3)),
        max_component_area=draw(st.integers(1, 400)),
    )
    sink = qwen_sink_mask(*grid, min_tokens=draw(st.sampled_from([0, 256]))) if draw(st.booleans()) else None
    return cfg, sink


# ---------------------------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------------------------


@settings(max_examples=250, deadline=None)
@given(data=st.data())
def test_propose_boxes_properties(data):
    grid, resized, source = data.draw(geometries())
    logits = data.draw(logit_maps(grid))
    cfg, sink = data.draw(configs(grid))
    flat = data.draw(st.booleans())

    boxes = propose_boxes(
        logits.flatten() if flat else logits,
        grid=grid,
        resized_size=resized,
        source_size=source,
        cfg=cfg,
        sink_mask=sink,
    )

    mask = foreground(logits, cfg, sink)
    min_w, min_h = _min_side(grid, source, cfg.min_side_tokens)
    for box in boxes:
        _assert_valid(box, source)
        assert box.width >= min_w * (1 - 1e-9)
        assert box.height >= min_h * (1 - 1e-9)
    if cfg.mode == "enclosing":
        assert len(boxes) == int(bool(mask.any()))
        if boxes:
            r0, c0, r1, c1 = box_to_cells(boxes[0], grid, resized, source)
            fired = torch.zeros_like(mask)
            fired[r0:r1, c0:c1] = True
            assert not (mask & ~fired).any(), "a fired cell lies outside the box"
    else:
        ranges = component_cells(mask, cfg)
        assert len(boxes) == len(ranges) <= cfg.max_boxes
        assert boxes == [cells_to_box(c, grid, resized, source, cfg.min_side_tokens) for c in ranges]
        for box, cells in zip(boxes, ranges, strict=True):
            assert _contains(box_to_cells(box, grid, resized, source), cells)
            r0, c0, r1, c1 = cells
            # A kept range always comes from cells that fired (expansion may add cells that did not).
            assert mask[r0:r1, c0:c1].any()


@st.composite
def cell_ranges(draw):
    grid, resized, source = draw(geometries())
    gh, gw = grid
    r0, c0 = draw(st.integers(0, gh - 1)), draw(st.integers(0, gw - 1))
    r1, c1 = draw(st.integers(r0 + 1, gh)), draw(st.integers(c0 + 1, gw))
    return (r0, c0, r1, c1), grid, resized, source


@settings(max_examples=300, deadline=None)
@given(case=cell_ranges(), tokens=st.sampled_from([0.0, 1.0, 2.5, 7.0]))
def test_cells_to_box_covers_cells(case, tokens):
    cells, grid, resized, source = case
    (gh, gw), (rw, rh), (sw, sh) = grid, resized, source
    box = cells_to_box(cells, grid, resized, source, min_side_tokens=tokens)
    _assert_valid(box, source)
    r0, c0, r1, c1 = cells
    # Resized-pixel extent of the range, mapped to source pixels axis by axis.
    x1, x2 = c0 * rw / gw * sw / rw, c1 * rw / gw * sw / rw
    y1, y2 = r0 * rh / gh * sh / rh, r1 * rh / gh * sh / rh
    eps = 1e-6
    assert box.x1 <= x1 + eps and box.x2 >= x2 - eps
    assert box.y1 <= y1 + eps and box.y2 >= y2 - eps
    min_w, min_h = _min_side(grid, source, tokens)
    assert box.width >= min_w * (1 - 1e-9) and box.height >= min_h * (1 - 1e-9)
    # Without a minimum side, rounding outward adds less than one pixel per end.
    if tokens == 0.0:
        assert box.width < x2 - x1 + 2 and box.height < y2 - y1 + 2
    assert _contains(box_to_cells(box, grid, resized, source), cells)


# ---------------------------------------------------------------------------------------------------------------------
# Single hot token
# ---------------------------------------------------------------------------------------------------------------------

HOT_CASES = [
    # grid (gh, gw), resized (rw, rh), source (W, H), cell (r, c)
    ((27, 35), (35 * 28, 27 * 28), (1001, 777), (13, 17)),
    ((27, 35), (35 * 28, 27 * 28), (1001, 777), (26, 34)),
    ((107, 31), (31 * 28, 107 * 28), (999, 3001), (50, 0)),
    ((24, 24), (336, 336), (1001, 777), (5, 19)),
    ((24, 24), (336, 336), (999, 3001), (0, 0)),
    ((200, 1), (28, 5600), (1, 5000), (123, 0)),
    ((1, 200), (5600, 28), (5000, 1), (0, 199)),
    ((16, 16), (512, 512), (7, 7), (3, 3)),  # cells smaller than a pixel
]


@pytest.mark.parametrize(("grid", "resized", "source", "cell"), HOT_CASES)
def test_single_hot_token_maps_to_its_cell(grid, resized, source, cell):
    boxes = propose_boxes(_one_hot(grid, *cell), grid=grid, resized_size=resized, source_size=source, cfg=SHARP)
    assert len(boxes) == 1
    box = boxes[0]
    _assert_valid(box, source)
    ex1, ey1, ex2, ey2 = _cell_extent(*cell, grid, source)
    min_w, min_h = _min_side(grid, source, 1.0)
    if ex2 - ex1 >= 1:
        assert abs(box.x1 - ex1) <= 1 and abs(box.x2 - ex2) <= 1
    else:  # sub-pixel cell: exactly one pixel that contains it
        assert box.width == 1 and box.x1 <= ex1 and box.x2 >= ex2
    if ey2 - ey1 >= 1:
        assert abs(box.y1 - ey1) <= 1 and abs(box.y2 - ey2) <= 1
    else:
        assert box.height == 1 and box.y1 <= ey1 and box.y2 >= ey2
    assert box.width >= min_w and box.height >= min_h


@pytest.mark.parametrize(("grid", "resized", "source", "cell"), HOT_CASES)
def test_single_hot_token_min_side_expansion(grid, resized, source, cell):
    cfg = RoiConfig(threshold=0.5, blur=False, min_side_tokens=3.0)
    (box,) = propose_boxes(_one_hot(grid, *cell), grid=grid, resized_size=resized, source_size=source, cfg=cfg)
    _assert_valid(box, source)
    ex1, ey1, ex2, ey2 = _cell_extent(*cell, grid, source)
    min_w, min_h = _min_side(grid, source, 3.0)
    assert box.x1 <= ex1 and box.x2 >= ex2 and box.y1 <= ey1 and box.y2 >= ey2
    # The box is exactly the minimum size (up to rounding up) ...
    assert min_w <= box.width <= math.ceil(min_w) + 1 and min_h <= box.height <= math.ceil(min_h) + 1
    # ... and centred on the cell unless it had to be shifted away from the image border.
    for lo, hi, elo, ehi, side in ((box.x1, box.x2, ex1, ex2, source[0]), (box.y1, box.y2, ey1, ey2, source[1])):
        if lo > 0 and hi < side:
            assert abs((lo + hi) / 2 - (elo + ehi) / 2) <= 1


def test_single_hot_token_with_blur_contains_cell():
    grid, resized, source = (27, 35), (35 * 28, 27 * 28), (1001, 777)
    for cell in [(0, 0), (13, 17), (26, 34), (0, 34)]:
        (box,) = propose_boxes(
            _one_hot(grid, *cell), grid=grid, resized_size=resized, source_size=source, cfg=RoiConfig()
        )
        r0, c0, r1, c1 = box_to_cells(box, grid, resized, source)
        assert r0 <= cell[0] < r1 and c0 <= cell[1] < c1
        ex1, ey1, ex2, ey2 = _cell_extent(*cell, grid, source)
        assert box.x1 <= ex1 and box.y1 <= ey1 and box.x2 >= ex2 and box.y2 >= ey2


# ---------------------------------------------------------------------------------------------------------------------
# Mapping helpers, validation
# ---------------------------------------------------------------------------------------------------------------------


def test_cells_to_box_and_back_exact_grid():
    grid, resized, source = (10, 20), (560, 280), (560, 280)
    box = cells_to_box((2, 3, 5, 9), grid, resized, source)
    assert box.as_tuple() == (84, 56, 252, 140)
    assert box_to_cells(box, grid, resized, source) == (2, 3, 5, 9)
    # Stretched axes: x scales by 2, y by 0.5.
    box = cells_to_box((2, 3, 5, 9), grid, resized, (1120, 140))
    assert box.as_tuple() == (168, 28, 504, 70)


def test_cells_to_box_min_side_shifts_inside_image():
    box = cells_to_box((0, 0, 1, 1), (10, 10), (280, 280), (1000, 1000), min_side_tokens=3)
    assert box.as_tuple() == (0, 0, 300, 300)
    box = cells_to_box((9, 9, 10, 10), (10, 10), (280, 280), (1000, 1000), min_side_tokens=3)
    assert box.as_tuple() == (700, 700, 1000, 1000)
    box = cells_to_box((4, 4, 5, 5), (10, 10), (280, 280), (1000, 1000), min_side_tokens=50)
    assert box.as_tuple() == (0, 0, 1000, 1000)


def test_box_to_cells_partial_overlap():
    grid, resized, source = (10, 20), (560, 280), (560, 280)  # 28 px cells
    assert box_to_cells(Box(83, 0, 85, 28), grid, resized, source) == (0, 2, 1, 4)  # 1 px into cells 2 and 3
    assert box_to_cells(Box(84, 0, 112, 29), grid, resized, source) == (0, 3, 2, 4)  # edges exactly on boundaries
    assert box_to_cells(Box(0, 0, 560, 280), grid, resized, source) == (0, 0, 10, 20)


@st.composite
def boxes_in_geometry(draw):
    grid, resized, source = draw(geometries())
    sw, sh = source
    x1, y1 = draw(st.integers(0, sw - 1)), draw(st.integers(0, sh - 1))
    return Box(x1, y1, draw(st.integers(x1 + 1, sw)), draw(st.integers(y1 + 1, sh))), grid, resized, source


@settings(max_examples=200, deadline=None)
@given(case=boxes_in_geometry())
def test_box_to_cells_matches_brute_force(case):
    box, (gh, gw), resized, (sw, sh) = case
    # Cell c overlaps [x1, x2) with positive area iff c * W / gw < x2 and (c + 1) * W / gw > x1 (exact integers).
    cols = [c for c in range(gw) if c * sw < box.x2 * gw and (c + 1) * sw > box.x1 * gw]
    rows = [r for r in range(gh) if r * sh < box.y2 * gh and (r + 1) * sh > box.y1 * gh]
    expected = (rows[0], cols[0], rows[-1] + 1, cols[-1] + 1)
    assert box_to_cells(box, (gh, gw), resized, (sw, sh)) == expected


@pytest.mark.parametrize(
    "cells", [(0, 0, 0, 1), (0, 0, 1, 0), (-1, 0, 1, 1), (0, 0, 11, 1), (0, 0, 1, 21), (2, 0, 1, 1)]
)
def test_cells_to_box_rejects_bad_ranges(cells):
    with pytest.raises(ValueError, match="cells"):
        cells_to_box(cells, (10, 20), (560, 280), (560, 280))


def test_propose_boxes_validation():
    cfg = RoiConfig()
    with pytest.raises(ValueError, match="needs 12"):
        propose_boxes(torch.zeros(11), grid=(3, 4), resized_size=(112, 84), source_size=(10, 10), cfg=cfg)
    with pytest.raises(ValueError, match="source_size"):
        propose_boxes(torch.zeros(12), grid=(3, 4), resized_size=(112, 84), source_size=(0, 10), cfg=cfg)
    with pytest.raises(ValueError, match="resized_size"):
        propose_boxes(torch.zeros(12), grid=(3, 4), resized_size=(112, -84), source_size=(10, 10), cfg=cfg)
    with pytest.raises(ValueError, match="grid"):
        propose_boxes(torch.zeros(12), grid=(-3, -4), resized_size=(112, 84), source_size=(10, 10), cfg=cfg)
    with pytest.raises(ValueError, match="sink_mask"):
        propose_boxes(
            torch.zeros(12),
            grid=(3, 4),
            resized_size=(112, 84),
            source_size=(10, 10),
            cfg=cfg,
            sink_mask=torch.ones(4, 3, dtype=torch.bool),
        )


def test_flat_and_2d_logits_agree_and_bf16_works():
    grid = (6, 9)
    logits = torch.randn(grid, generator=torch.Generator().manual_seed(0)) * 3
    kw = {"grid": grid, "resized_size": (9 * 28, 6 * 28), "source_size": (333, 222), "cfg": RoiConfig(threshold=0.3)}
    assert propose_boxes(logits, **kw) == propose_boxes(logits.flatten(), **kw)
    assert propose_boxes(logits.to(torch.bfloat16), **kw)  # not empty


@pytest.mark.parametrize(
    "kwargs",
    [
        {"threshold": 0.0},
        {"threshold": 1.0},
        {"threshold": math.nan},
        {"sink_min_tokens": -1},
        {"blur": 1},
        {"min_side_tokens": -0.5},
        {"min_side_tokens": math.inf},
        {"mode": "boxes"},
        {"max_boxes": 0},
        {"max_boxes": True},
        {"max_component_area": 0},
        {"peak_ratio": 0.0},
        {"peak_ratio": 1.5},
    ],
)
def test_roi_config_validation(kwargs):
    with pytest.raises(ValueError):
        RoiConfig(**kwargs)


def test_box_basics_and_validation():
    box = Box(1, 2, 4, 8)
    assert (box.width, box.height, box.area) == (3, 6, 18)
    assert box.as_tuple() == (1, 2, 4, 8) and box.to_json() == [1, 2, 4, 8]
    assert type(Box(torch.tensor(1).item(), 0, 2, 1).x1) is int
    for bad in [(0, 0, 0, 1), (0, 0, 1, 0), (2, 0, 1, 1), (-1, 0, 1, 1), (0.0, 0, 1, 1)]:
        with pytest.raises(ValueError):
            Box(*bad)


def test_crop():
    image = Image.new("RGB", (40, 30))
    image.putpixel((10, 5), (255, 0, 0))
    out = crop(image, Box(10, 5, 20, 25))
    assert out.size == (10, 20) and out.getpixel((0, 0)) == (255, 0, 0)
    with pytest.raises(ValueError, match="outside"):
        crop(image, Box(0, 0, 41, 30))


# ---------------------------------------------------------------------------------------------------------------------
# sanitize_box, coverage, iou
# ---------------------------------------------------------------------------------------------------------------------


def test_sanitize_box_cases():
    size = (100, 50)
    assert sanitize_box(10, 20, 30, 40, size) == Box(10, 20, 30, 40)
    assert sanitize_box(30, 40, 10, 20, size) == Box(10, 20, 30, 40)  # inverted corners
    assert sanitize_box(10.5, 20.2, 29.1, 39.9, size) == Box(10, 20, 30, 40)  # rounded outward
    assert sanitize_box(-20, -5, 150, 70, size) == Box(0, 0, 100, 50)  # clamped
    assert sanitize_box(90, 45, 130, 80, size) == Box(90, 45, 100, 50)
    assert sanitize_box(200, 10, 300, 20, size) is None  # entirely outside
    assert sanitize_box(-30, 10, 0, 20, size) is None  # touches the left edge only
    assert sanitize_box(10, 50, 20, 60, size) is None  # touches the bottom edge only
    for bad in (math.nan, math.inf, -math.inf):
        assert sanitize_box(bad, 0, 10, 10, size) is None
        assert sanitize_box(0, 0, 10, bad, size) is None
    assert sanitize_box(5, 5, 5, 5, size) == Box(5, 5, 6, 6)  # zero area -> 1 px
    assert sanitize_box(50, 25, 50, 25, size, min_side=10) == Box(45, 20, 55, 30)
    assert sanitize_box(100, 50, 100, 50, size, min_side=10) == Box(90, 40, 100, 50)  # corner point, shifted in
    assert sanitize_box(0, 0, 2, 2, size, min_side=1000) == Box(0, 0, 100, 50)  # capped to the image
    assert sanitize_box(1e300, 0, -1e300, 10, size) == Box(0, 0, 100, 10)
    assert sanitize_box(10**400, 0, -(10**400), 10, size) == Box(0, 0, 100, 10)


@settings(max_examples=200, deadline=None)
@given(
    coords=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=4, max_size=4),
    size=st.tuples(SIDES, SIDES),
    min_side=st.integers(0, 30000),
)
def test_sanitize_box_property(coords, size, min_side):
    box = sanitize_box(*coords, size, min_side=min_side)
    if any(not math.isfinite(v) for v in coords):
        assert box is None
    if box is not None:
        _assert_valid(box, size)
        assert box.width >= min(max(1, min_side), size[0]) and box.height >= min(max(1, min_side), size[1])


def test_coverage_and_iou_known_values():
    a, b = Box(0, 0, 10, 10), Box(5, 0, 15, 10)
    assert coverage(a, b) == 0.5 and coverage(b, a) == 0.5
    assert iou(a, b) == pytest.approx(50 / 150)
    assert coverage(Box(0, 0, 100, 100), Box(10, 10, 20, 20)) == 1.0
    assert coverage(Box(10, 10, 20, 20), Box(0, 0, 100, 100)) == pytest.approx(0.01)
    assert iou(a, a) == 1.0
    assert iou(a, Box(20, 20, 30, 30)) == 0.0 and coverage(a, Box(10, 0, 20, 10)) == 0.0


def test_peak_mode_keeps_only_the_peaks_neighbourhood():
    logits = torch.full((10, 10), COLD)
    logits[2, 2], logits[2, 3] = 4.0, 2.0  # the peak and a connected neighbour above 30% of its probability
    logits[3, 4] = -1.5  # connected through (2, 3) but under 30% of the peak (0.18 against 0.98)
    logits[8, 8] = 3.0  # a second candidate far away: enclosing mode would box both
    cfg = RoiConfig(mode="peak", peak_ratio=0.3)
    assert peak_cells(logits, cfg) == (2, 2, 3, 4)
    enclosing = propose_boxes(logits, grid=(10, 10), resized_size=(280, 280), source_size=(1000, 1000),
                              cfg=RoiConfig())
    peak = propose_boxes(logits, grid=(10, 10), resized_size=(280, 280), source_size=(1000, 1000), cfg=cfg)
    assert len(peak) == 1 and peak[0] == Box(200, 200, 400, 300)
    assert enclosing[0].area > 10 * peak[0].area
    assert peak_cells(logits, RoiConfig(mode="peak", peak_ratio=1.0)) == (2, 2, 3, 3)


def test_peak_mode_threshold_nan_and_sink():
    cold = torch.full((6, 6), -5.0)  # sigmoid 0.007 everywhere: nothing fired
    assert peak_cells(cold, RoiConfig(mode="peak")) is None
    assert peak_cells(torch.full((6, 6), math.nan), RoiConfig(mode="peak")) is None
    logits = torch.full((6, 6), COLD)
    logits[0, 0], logits[4, 4] = HOT, 3.0
    keep = torch.ones(6, 6, dtype=torch.bool)
    keep[0, 0] = False  # the sink corner
    assert peak_cells(logits, RoiConfig(mode="peak"), keep) == (4, 4, 5, 5)
    with pytest.raises(ValueError, match="sink_mask shape"):
        peak_cells(logits, RoiConfig(mode="peak"), keep[:5])
