"""Tests for qzoom_agent.roi: relevance map -> crop boxes (foreground, components, peak, sink mask, propose_boxes)."""

from __future__ import annotations

import math

import pytest
import torch
from geometry_helpers import assert_valid, cell_extent, contains, geometries, min_side
from hypothesis import given, settings
from hypothesis import strategies as st

from qzoom_agent.boxes import Box, box_to_cells, cells_to_box
from qzoom_agent.roi import RoiConfig, component_cells, foreground, peak_cells, propose_boxes, qwen_sink_mask

HOT, COLD = 30.0, -30.0
SHARP = RoiConfig(threshold=0.5, blur=False)


def _one_hot(grid, r: int, c: int) -> torch.Tensor:
    logits = torch.full(grid, COLD)
    logits[r, c] = HOT
    return logits


# ---------------------------------------------------------------------------------------------------------------------
# Hypothesis strategies
# ---------------------------------------------------------------------------------------------------------------------


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
    min_w, min_h = min_side(grid, source, cfg.min_side_tokens)
    for box in boxes:
        assert_valid(box, source)
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
            assert contains(box_to_cells(box, grid, resized, source), cells)
            r0, c0, r1, c1 = cells
            # A kept range always comes from cells that fired (expansion may add cells that did not).
            assert mask[r0:r1, c0:c1].any()


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
    assert_valid(box, source)
    ex1, ey1, ex2, ey2 = cell_extent(*cell, grid, source)
    min_w, min_h = min_side(grid, source, 1.0)
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
    assert_valid(box, source)
    ex1, ey1, ex2, ey2 = cell_extent(*cell, grid, source)
    min_w, min_h = min_side(grid, source, 3.0)
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
        ex1, ey1, ex2, ey2 = cell_extent(*cell, grid, source)
        assert box.x1 <= ex1 and box.y1 <= ey1 and box.x2 >= ex2 and box.y2 >= ey2


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
