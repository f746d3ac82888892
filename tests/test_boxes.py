"""Tests for qzoom_agent.boxes: cell <-> source-pixel box mapping, Box, crop, sanitize_box, coverage and iou."""

from __future__ import annotations

import math

import pytest
import torch
from geometry_helpers import SIDES, assert_valid, contains, geometries, min_side
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from qzoom_agent.boxes import Box, box_to_cells, cells_to_box, coverage, crop, iou, sanitize_box

# ---------------------------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------------------------


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
    assert_valid(box, source)
    r0, c0, r1, c1 = cells
    # Resized-pixel extent of the range, mapped to source pixels axis by axis.
    x1, x2 = c0 * rw / gw * sw / rw, c1 * rw / gw * sw / rw
    y1, y2 = r0 * rh / gh * sh / rh, r1 * rh / gh * sh / rh
    eps = 1e-6
    assert box.x1 <= x1 + eps and box.x2 >= x2 - eps
    assert box.y1 <= y1 + eps and box.y2 >= y2 - eps
    min_w, min_h = min_side(grid, source, tokens)
    assert box.width >= min_w * (1 - 1e-9) and box.height >= min_h * (1 - 1e-9)
    # Without a minimum side, rounding outward adds less than one pixel per end.
    if tokens == 0.0:
        assert box.width < x2 - x1 + 2 and box.height < y2 - y1 + 2
    assert contains(box_to_cells(box, grid, resized, source), cells)


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
        assert_valid(box, size)
        assert box.width >= min(max(1, min_side), size[0]) and box.height >= min(max(1, min_side), size[1])


def test_coverage_and_iou_known_values():
    a, b = Box(0, 0, 10, 10), Box(5, 0, 15, 10)
    assert coverage(a, b) == 0.5 and coverage(b, a) == 0.5
    assert iou(a, b) == pytest.approx(50 / 150)
    assert coverage(Box(0, 0, 100, 100), Box(10, 10, 20, 20)) == 1.0
    assert coverage(Box(10, 10, 20, 20), Box(0, 0, 100, 100)) == pytest.approx(0.01)
    assert iou(a, a) == 1.0
    assert iou(a, Box(20, 20, 30, 30)) == 0.0 and coverage(a, Box(10, 0, 20, 10)) == 0.0
