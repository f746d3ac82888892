"""Shared geometry helpers and hypothesis strategies for tests/test_roi.py and tests/test_boxes.py."""

from __future__ import annotations

from hypothesis import strategies as st

from qzoom_agent.boxes import Box


def cell_extent(r: int, c: int, grid, source) -> tuple[float, float, float, float]:
    """Exact source-pixel extent (x1, y1, x2, y2) of cell (r, c), computed independently of the module."""
    (gh, gw), (sw, sh) = grid, source
    return c * sw / gw, r * sh / gh, (c + 1) * sw / gw, (r + 1) * sh / gh


def min_side(grid, source, tokens: float) -> tuple[float, float]:
    """Expected minimum width/height: tokens * source px per token, at least 1 px, at most the image side."""
    (gh, gw), (sw, sh) = grid, source
    return min(sw, max(1.0, tokens * sw / gw)), min(sh, max(1.0, tokens * sh / gh))


def assert_valid(box: Box, source) -> None:
    sw, sh = source
    assert 0 <= box.x1 < box.x2 <= sw
    assert 0 <= box.y1 < box.y2 <= sh
    assert box.area > 0


def contains(outer, inner) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]


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
