"""Tests for qzoom_agent.roi, the map-to-mask stage: degenerate maps, the sink mask, LLaVA's components."""

from __future__ import annotations

import math

import pytest
import torch

from qzoom_agent.roi import (
    RoiConfig,
    component_cells,
    enclosing_cells,
    foreground,
    gaussian_blur3,
    propose_boxes,
    qwen_sink_mask,
)

HOT, COLD = 30.0, -30.0
SHARP = RoiConfig(threshold=0.5, blur=False)


# ---------------------------------------------------------------------------------------------------------------------
# Degenerate maps
# ---------------------------------------------------------------------------------------------------------------------

QWEN = {"grid": (17, 16), "resized_size": (16 * 28, 17 * 28), "source_size": (640, 480)}


@pytest.mark.parametrize("mode", ["enclosing", "components"])
@pytest.mark.parametrize("value", [math.nan, -math.inf, -5.0, -1e30])
def test_no_zoom_maps(value, mode):
    cfg = RoiConfig(mode=mode)
    logits = torch.full((17, 16), value)
    assert propose_boxes(logits, cfg=cfg, **QWEN) == []
    assert propose_boxes(logits, cfg=cfg, sink_mask=qwen_sink_mask(17, 16), **QWEN) == []
    assert not foreground(logits, cfg).any()


@pytest.mark.parametrize("empty", [torch.empty(0), torch.empty(0, 0)])
def test_empty_map_gives_no_zoom(empty):
    assert propose_boxes(empty, grid=(0, 0), resized_size=(0, 0), source_size=(10, 10), cfg=RoiConfig()) == []
    assert foreground(torch.empty(0, 0), RoiConfig()).shape == (0, 0)
    assert enclosing_cells(torch.zeros(0, 0, dtype=torch.bool)) is None


def test_nan_cells_never_fire_but_pos_inf_does():
    logits = torch.full((4, 4), math.nan)
    logits[1, 2] = math.inf
    mask = foreground(logits, SHARP)
    assert mask.sum() == 1 and mask[1, 2]


def test_nan_does_not_poison_blurred_neighbours():
    # NaN counts as "not fired" (probability 0) before the blur, so it cannot spread NaN over its neighbours.
    logits = torch.full((5, 5), COLD)
    logits[2, 2] = HOT
    logits[2, 3] = math.nan
    mask = foreground(logits, RoiConfig())
    assert mask[2, 2] and mask.sum() == 1


@pytest.mark.parametrize("use_sink", [False, True])
def test_all_pos_inf_covers_whole_image(use_sink):
    sink = qwen_sink_mask(17, 16) if use_sink else None
    logits = torch.full((17, 16), math.inf)
    boxes = propose_boxes(logits, cfg=RoiConfig(), sink_mask=sink, **QWEN)
    assert [b.as_tuple() for b in boxes] == [(0, 0, 640, 480)]
    mask = foreground(logits, RoiConfig(), sink)
    if use_sink:
        # Documented choice: masked sink cells never fire, even when blurred neighbours would lift them.
        assert torch.equal(mask, sink)
    else:
        assert mask.all()


def test_constant_map_above_threshold_zero_padding_damps_corners():
    # sigmoid(0) = 0.5; blurred corner ~0.26 and edge ~0.36, interior 0.5.
    mask = foreground(torch.zeros(5, 5), RoiConfig(threshold=0.3))
    assert mask[1:, 1:-1].all() and not mask[0, 0] and not mask[-1, -1] and mask[0, 2]


def test_gaussian_blur3_kernel():
    impulse = torch.zeros(5, 5)
    impulse[2, 2] = 1.0
    out = gaussian_blur3(impulse)
    assert out.sum().item() == pytest.approx(1.0)
    assert out[2, 2].item() == pytest.approx(1 / (1 + 2 * math.exp(-0.5)) ** 2)
    assert out[1, 2].item() == pytest.approx(out[2, 1].item())
    assert out[2, 2] > out[1, 2] > out[1, 1] > 0 and out[0, 0] == 0
    # Zero padding: a constant map is damped at the border, untouched inside.
    const = gaussian_blur3(torch.ones(4, 4))
    assert const[1, 1].item() == pytest.approx(1.0) and const[0, 0].item() < 0.6


# ---------------------------------------------------------------------------------------------------------------------
# Sink mask
# ---------------------------------------------------------------------------------------------------------------------


def test_qwen_sink_mask_threshold_and_strip():
    assert qwen_sink_mask(16, 16).all()
    keep = qwen_sink_mask(17, 16)
    expected = torch.ones(17, 16, dtype=torch.bool)
    expected[:4, 0] = False
    expected[0, :4] = False
    assert torch.equal(keep, expected)
    assert (~keep).sum() == 7


def test_qwen_sink_mask_thin_grid_and_custom_threshold():
    keep = qwen_sink_mask(1, 300)
    assert torch.equal(~keep[0], torch.arange(300) < 75)
    assert qwen_sink_mask(3, 3, min_tokens=100).all()
    assert (~qwen_sink_mask(3, 3, min_tokens=0)).sum() == 1  # max(1, 3 // 4) = 1 cell per strip, both at (0, 0)


def test_sink_mask_removes_sink_from_enclosing_box():
    grid = (32, 32)
    logits = torch.full(grid, COLD)
    logits[0, 0] = logits[1, 0] = HOT  # sink
    logits[20:22, 20:23] = HOT  # real target
    kw = {"grid": grid, "resized_size": (896, 896), "source_size": (896, 896), "cfg": SHARP}
    (with_sink,) = propose_boxes(logits, **kw)
    (without_sink,) = propose_boxes(logits, sink_mask=qwen_sink_mask(*grid), **kw)
    assert with_sink.as_tuple() == (0, 0, 23 * 28, 22 * 28)
    assert without_sink.as_tuple() == (20 * 28, 20 * 28, 23 * 28, 22 * 28)


# ---------------------------------------------------------------------------------------------------------------------
# Connected components (LLaVA)
# ---------------------------------------------------------------------------------------------------------------------

COMP = RoiConfig(mode="components")


def _mask(grid, *cells):
    mask = torch.zeros(grid, dtype=torch.bool)
    for r, c in cells:
        mask[r, c] = True
    return mask


def test_components_two_blobs():
    mask = torch.zeros(24, 24, dtype=torch.bool)
    mask[2:5, 3:7] = True  # 12 cells
    mask[15:17, 15:17] = True  # 4 cells
    assert component_cells(mask, COMP) == [(2, 3, 5, 7), (15, 15, 17, 17)]


def test_components_three_blobs_is_no_zoom():
    mask = torch.zeros(24, 24, dtype=torch.bool)
    mask[0:2, 0:2] = mask[10:12, 10:12] = mask[20:22, 20:22] = True
    assert component_cells(mask, COMP) == []
    assert len(component_cells(mask, RoiConfig(mode="components", max_boxes=3))) == 3


def test_components_isolated_cell_dropped():
    mask = _mask((24, 24), (5, 5))
    mask[10:12, 10:12] = True
    assert component_cells(mask, COMP) == [(10, 10, 12, 12)]
    assert component_cells(_mask((24, 24), (5, 5), (9, 9)), COMP) == []


def test_components_small_blob_expands_to_3x3():
    assert component_cells(_mask((24, 24), (7, 8), (7, 9)), COMP) == [(6, 7, 9, 10)]
    assert component_cells(_mask((24, 24), (7, 8), (8, 8), (9, 8)), COMP) == [(7, 7, 10, 10)]
    # At the border the 3x3 range is clamped to the grid but still covers the blob.
    assert component_cells(_mask((24, 24), (0, 0), (0, 1)), COMP) == [(0, 0, 2, 2)]


def test_components_huge_blob_dropped():
    mask = torch.zeros(24, 24, dtype=torch.bool)
    mask[0:16, 0:15] = True  # 240 cells > 225
    mask[20:22, 20:22] = True
    assert component_cells(mask, COMP) == [(20, 20, 22, 22)]
    mask[0, 0] = False  # 239 cells, still too large
    assert component_cells(mask, COMP) == [(20, 20, 22, 22)]
    mask[:, :] = False
    mask[0:15, 0:15] = True  # exactly 225 cells is kept
    assert component_cells(mask, COMP) == [(0, 0, 15, 15)]


def test_components_diagonal_neighbours_connected():
    mask = _mask((24, 24), (3, 3), (4, 4), (5, 5), (6, 6))
    assert component_cells(mask, COMP) == [(3, 3, 7, 7)]
    anti = _mask((24, 24), (10, 20), (11, 19), (12, 18), (13, 17))
    assert component_cells(anti, COMP) == [(10, 17, 14, 21)]


def test_components_mode_end_to_end():
    grid, resized, source = (24, 24), (336, 336), (1200, 960)
    logits = torch.full(grid, COLD)
    logits[2:5, 3:7] = HOT
    logits[15:17, 15:17] = HOT
    boxes = propose_boxes(
        logits,
        grid=grid,
        resized_size=resized,
        source_size=source,
        cfg=RoiConfig(mode="components", blur=False, threshold=0.5),
    )
    assert [b.as_tuple() for b in boxes] == [(150, 80, 350, 200), (750, 600, 850, 680)]


