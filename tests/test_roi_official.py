"""Golden tests of the released box rules (`qzoom_agent.roi_official`) and of the RoI positions.

Every expected value is a literal. They were obtained by running the released post-processing itself on these maps,
once, outside this repository: Q-Zoom's ``get_batched_sub_images_v2`` steps (sink strip, sigmoid, blur,
threshold, ``get_foreground_bbox_torch``), ``get_bbox4src`` and ``get_roi_interpolated_pos_ids_single``, and
SD-RPN's ``get_bbox_from_noisy_map`` (scikit-image's ``label``) and its LLaVA ``get_bbox4src``, with torchvision's
``gaussian_blur`` (3x3, sigma 1, reflect padding). Several were checked by hand as well: the comments say which and
how. Maps are ``background`` logits everywhere but at the listed ``(row, col, logit)`` cells; ``sink`` lists Qwen3-VL's
first-token scores (background -3, sigmoid 0.047, kept).
"""

from __future__ import annotations

import pytest
import torch

from qzoom_agent import roi_official as official
from qzoom_agent.backbones.qwen import source_aligned_positions
from qzoom_agent.roi import qwen_sink_mask

Q25, Q3, LL = "qwen2_5_vl", "qwen3_vl", "llava"
PX = {Q25: 28, Q3: 32}


def block(r0: int, r1: int, c0: int, c1: int, value: float) -> list[tuple[int, int, float]]:
    """The cells of rows r0..r1-1 and columns c0..c1-1, all at ``value``."""
    return [(r, c, value) for r in range(r0, r1) for c in range(c0, c1)]


# (name, family, grid (gh, gw), source (W, H), threshold, background logit, hot [(r, c, logit)], sink [(r, c, score)])
CASES = [
    # ---- Qwen2.5-VL: corner-strip sinks on maps of more than 256 tokens, 28 px per token
    ("q25-single-peak", Q25, (18, 32), (1920, 1080), 0.15, -6.0, [(9, 16, 4.0)], []),
    ("q25-single-peak-low-thr", Q25, (18, 32), (1920, 1080), 0.03, -6.0, [(9, 16, 4.0)], []),
    ("q25-double-peak", Q25, (37, 20), (1000, 1850), 0.15, -6.0, [(5, 3, 3.0), (30, 15, 3.0)], []),
    ("q25-peak-beside-sink", Q25, (18, 32), (1920, 1080), 0.15, -6.0, [(1, 1, 5.0)], []),
    ("q25-peak-in-sink-strip", Q25, (18, 32), (1920, 1080), 0.15, -6.0, [(0, 3, 5.0)], []),
    ("q25-sink-and-target", Q25, (18, 32), (1920, 1080), 0.15, -6.0, [(0, 2, 5.0), (2, 0, 5.0), (10, 20, 3.0)], []),
    ("q25-right-border-strip", Q25, (18, 32), (1920, 1080), 0.15, -6.0, block(0, 18, 30, 32, -1.5163), []),
    ("q25-bottom-border-strip", Q25, (37, 20), (1000, 1850), 0.15, -6.0, block(35, 37, 0, 20, -1.5163), []),
    ("q25-uniform-above", Q25, (8, 65), (2600, 320), 0.15, -1.3863, [], []),
    ("q25-uniform-below", Q25, (8, 65), (2600, 320), 0.15, -3.0, [], []),
    ("q25-uniform-below-hr-thr", Q25, (8, 65), (2600, 320), 0.04, -3.0, [], []),
    ("q25-all-below-vstar-thr", Q25, (61, 9), (252, 1708), 0.03, -5.0, [], []),
    ("q25-tall-bottom-peak", Q25, (61, 9), (252, 1708), 0.15, -6.0, [(60, 4, 4.0)], []),
    ("q25-tall-corner-peak-min-size", Q25, (61, 9), (90, 610), 0.15, -6.0, [(60, 8, 4.0)], []),
    ("q25-256-no-sink", Q25, (16, 16), (448, 448), 0.15, -6.0, [(0, 0, 5.0)], []),
    ("q25-272-sink", Q25, (17, 16), (448, 476), 0.15, -6.0, [(0, 0, 5.0)], []),
    ("q25-272-sink-plus-target", Q25, (17, 16), (448, 476), 0.15, -6.0, [(0, 0, 5.0), (8, 8, 2.0)], []),
    ("q25-big-photo", Q25, (18, 27), (8064, 5241), 0.04, -6.0, [(4, 20, 3.0), (5, 21, 2.0)], []),
    ("q25-small-source-min-size", Q25, (8, 6), (60, 80), 0.15, -6.0, [(3, 2, 4.0)], []),
    ("q25-odd-source", Q25, (18, 32), (333, 187), 0.125, -6.0, [(2, 30, 3.0), (3, 30, 3.0)], []),
    ("q25-blob-near-threshold", Q25, (18, 32), (1280, 720), 0.15, -6.0, block(6, 9, 10, 14, -1.0), []),
    ("q25-37x20-hr-thr-weak", Q25, (37, 20), (2000, 3700), 0.04, -6.0, [(18, 10, -2.0)], []),
    # ---- Qwen3-VL: the sink mask comes from the first token's query (sigmoid < 0.75 kept), 32 px per token
    ("q3-single-peak", Q3, (18, 32), (1920, 1080), 0.15, -6.0, [(9, 16, 4.0)], []),
    ("q3-peak-on-sink", Q3, (18, 32), (1920, 1080), 0.15, -6.0, [(9, 16, 4.0)], [(9, 16, 3.0)]),
    ("q3-sink-elsewhere", Q3, (18, 32), (1920, 1080), 0.15, -6.0, [(9, 16, 4.0), (2, 28, 5.0)], [(2, 28, 2.0)]),
    ("q3-corner-kept", Q3, (18, 32), (1920, 1080), 0.15, -6.0, [(0, 0, 5.0)], []),
    ("q3-sink-beside-peak", Q3, (37, 20), (1000, 1850), 0.10, -6.0, [(20, 10, 5.0), (20, 11, 5.0)], [(20, 11, 1.5)]),
    ("q3-sink-at-threshold", Q3, (37, 20), (1000, 1850), 0.10, -6.0, [(20, 10, 5.0)], [(20, 10, 1.0986)]),
    ("q3-8x65", Q3, (8, 65), (2600, 320), 0.10, -6.0, [(4, 60, 3.0), (4, 61, 3.0)], [(0, 0, 4.0)]),
    ("q3-61x9", Q3, (61, 9), (252, 1708), 0.10, -6.0, [(0, 0, 3.0), (59, 7, 3.0)], [(0, 0, 2.0)]),
    ("q3-all-sinks", Q3, (8, 8), (256, 256), 0.10, -6.0, [(4, 4, 4.0)], block(0, 8, 0, 8, 2.0)),
    ("q3-uniform-above", Q3, (18, 32), (1920, 1080), 0.15, -1.3863, [], []),
    ("q3-below", Q3, (18, 32), (1920, 1080), 0.15, -4.0, [], []),
    ("q3-small-source", Q3, (6, 8), (40, 30), 0.10, -6.0, [(5, 7, 4.0)], []),
    # ---- LLaVA-1.5 (SD-RPN): components on the 24x24 grid of a square-padded 336 px input
    ("ll-isolated-cell-dropped", LL, (24, 24), (640, 480), 0.15, -6.0, [(10, 10, 4.0)], []),
    ("ll-isolated-cell-low-thr", LL, (24, 24), (640, 480), 0.05, -6.0, [(10, 10, 4.0)], []),
    ("ll-two-cells-grow", LL, (24, 24), (640, 480), 0.15, -6.0, [(10, 10, 4.0), (10, 11, 4.0)], []),
    ("ll-three-cells-grow", LL, (24, 24), (480, 640), 0.15, -6.0, [(12, 5, 4.0), (13, 5, 4.0), (13, 6, 1.0)], []),
    ("ll-blob", LL, (24, 24), (1000, 1000), 0.15, -6.0, block(4, 9, 14, 18, 3.0), []),
    ("ll-two-blobs", LL, (24, 24), (1024, 768), 0.15, -6.0, block(3, 6, 3, 6, 3.0) + block(15, 18, 17, 21, 3.0), []),
    (
        "ll-three-blobs-no-zoom",
        LL,
        (24, 24),
        (1024, 768),
        0.15,
        -6.0,
        block(2, 4, 2, 4, 3.0) + block(10, 12, 10, 12, 3.0) + block(19, 21, 19, 21, 3.0),
        [],
    ),
    ("ll-huge-blob-dropped", LL, (24, 24), (800, 600), 0.15, -6.0, block(4, 20, 4, 20, 3.0), []),
    (
        "ll-huge-and-small",
        LL,
        (24, 24),
        (800, 600),
        0.15,
        -6.0,
        block(0, 16, 0, 16, 3.0) + block(20, 22, 20, 22, 3.0),
        [],
    ),
    ("ll-corner-grow-clamped", LL, (24, 24), (336, 336), 0.15, -6.0, [(23, 22, 4.0), (23, 23, 4.0)], []),
    ("ll-wide-source-padding", LL, (24, 24), (1000, 500), 0.15, -6.0, block(10, 13, 2, 6, 3.0), []),
    ("ll-tall-source", LL, (24, 24), (300, 900), 0.15, -6.0, block(16, 19, 11, 13, 3.0), []),
    ("ll-all-below", LL, (24, 24), (640, 480), 0.15, -3.0, [], []),
    (
        "ll-diagonal-connected",
        LL,
        (24, 24),
        (640, 640),
        0.15,
        -6.0,
        [(5, 5, 4.0), (6, 6, 4.0), (7, 7, 4.0), (8, 8, 4.0)],
        [],
    ),
]

# name -> [((r0, c0, r1, c1) cells, (x1, y1, x2, y2) box), ...]; [] is "no zoom"
EXPECTED = {
    "q25-single-peak": [((9, 16, 10, 17), (960, 540, 1019, 600))],
    "q25-single-peak-low-thr": [((8, 15, 11, 18), (900, 480, 1080, 660))],
    "q25-double-peak": [((5, 3, 31, 16), (150, 250, 800, 1550))],
    "q25-peak-beside-sink": [((0, 0, 3, 3), (0, 0, 180, 180))],
    "q25-peak-in-sink-strip": [],
    "q25-sink-and-target": [((10, 20, 11, 21), (1200, 600, 1260, 660))],
    "q25-right-border-strip": [((0, 31, 18, 32), (1860, 0, 1920, 1080))],
    "q25-bottom-border-strip": [((36, 0, 37, 20), (0, 1800, 1000, 1850))],
    "q25-uniform-above": [((0, 0, 8, 65), (0, 0, 2600, 320))],
    "q25-uniform-below": [],
    "q25-uniform-below-hr-thr": [((0, 0, 8, 65), (0, 0, 2600, 320))],
    "q25-all-below-vstar-thr": [],
    "q25-tall-bottom-peak": [((60, 4, 61, 5), (112, 1680, 140, 1708))],
    "q25-tall-corner-peak-min-size": [((60, 8, 61, 9), (62, 582, 90, 610))],
    "q25-256-no-sink": [((0, 0, 1, 1), (0, 0, 28, 28))],
    "q25-272-sink": [],
    "q25-272-sink-plus-target": [((8, 8, 9, 9), (224, 224, 252, 252))],
    "q25-big-photo": [((3, 19, 7, 23), (5674, 873, 6869, 2038))],
    "q25-small-source-min-size": [((3, 2, 4, 3), (11, 21, 39, 49))],
    "q25-odd-source": [((1, 29, 5, 32), (301, 10, 333, 51))],
    "q25-blob-near-threshold": [((6, 10, 9, 14), (400, 240, 560, 360))],
    "q25-37x20-hr-thr-weak": [],
    "q3-single-peak": [((9, 16, 10, 17), (960, 540, 1020, 600))],
    "q3-peak-on-sink": [],
    "q3-sink-elsewhere": [((9, 16, 10, 17), (960, 540, 1020, 600))],
    "q3-corner-kept": [((0, 0, 1, 1), (0, 0, 60, 60))],
    "q3-sink-beside-peak": [((19, 9, 22, 12), (450, 950, 600, 1100))],
    "q3-sink-at-threshold": [((19, 9, 22, 12), (450, 950, 600, 1100))],
    "q3-8x65": [((3, 59, 6, 63), (2360, 120, 2520, 240))],
    "q3-61x9": [((58, 6, 61, 9), (168, 1624, 252, 1708))],
    "q3-all-sinks": [],
    "q3-uniform-above": [((0, 0, 18, 32), (0, 0, 1920, 1080))],
    "q3-below": [],
    "q3-small-source": [((4, 6, 6, 8), (12, 2, 40, 30))],
    "ll-isolated-cell-dropped": [],
    "ll-isolated-cell-low-thr": [((9, 9, 12, 12), (240, 160, 320, 240))],
    "ll-two-cells-grow": [((9, 10, 12, 12), (266, 160, 320, 240))],
    "ll-three-cells-grow": [((12, 4, 15, 7), (26, 320, 106, 400))],
    "ll-blob": [((3, 13, 10, 19), (541, 125, 791, 416))],
    "ll-two-blobs": [((2, 2, 7, 7), (85, 0, 298, 170)), ((14, 16, 19, 22), (682, 469, 938, 682))],
    "ll-three-blobs-no-zoom": [],
    "ll-huge-blob-dropped": [],
    "ll-huge-and-small": [((19, 19, 23, 23), (633, 533, 766, 600))],
    "ll-corner-grow-clamped": [((22, 22, 24, 24), (308, 308, 336, 336))],
    "ll-wide-source-padding": [((9, 1, 14, 7), (41, 125, 291, 333))],
    "ll-tall-source": [((15, 10, 20, 14), (75, 562, 225, 750))],
    "ll-all-below": [],
    "ll-diagonal-connected": [((5, 5, 9, 9), (133, 133, 240, 240))],
}


def _map(grid, background, cells):
    m = torch.full(grid, background, dtype=torch.float32)
    for r, c, v in cells:
        m[r, c] = v
    return m


def _regions(family, grid, source, threshold, background, hot, sink):
    logits = _map(grid, background, hot)
    if family == LL:
        return official.llava_regions(logits, threshold=threshold, grid=grid, image_side=336, source_size=source)
    keep = qwen_sink_mask(*grid) if family == Q25 else official.qwen3_sink_keep(_map(grid, -3.0, sink))
    resized = (grid[1] * PX[family], grid[0] * PX[family])
    return official.qwen_regions(
        logits, threshold=threshold, keep=keep, grid=grid, resized_size=resized, source_size=source
    )


def test_the_table_covers_what_it_should():
    assert len(CASES) >= 40 and set(EXPECTED) == {c[0] for c in CASES}
    families = {c[1] for c in CASES}
    grids = {c[2] for c in CASES}
    assert families == {Q25, Q3, LL} and {(18, 32), (37, 20), (8, 65), (61, 9)} <= grids
    assert {c[4] for c in CASES if c[1] == Q25} >= {0.15, 0.04, 0.03}  # the paper's doc and high-res thresholds
    assert any(not v for v in EXPECTED.values()) and any(len(v) == 2 for v in EXPECTED.values())


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_released_rule(case):
    name, family, grid, source, threshold, background, hot, sink = case
    got = [(cells, box.as_tuple()) for box, cells in _regions(family, grid, source, threshold, background, hot, sink)]
    assert got == EXPECTED[name]


def test_hand_checked_cases():
    # q25-single-peak: one hot cell (9, 16) at p=0.98 on 18x32; the blur keeps only it above 0.15 (its neighbours get
    # 0.98 * 0.1238 = 0.121). Cell 16 of 32 across 1920 px spans [960, 1020) and row 9 of 18 across 1080 px [540, 600),
    # but in float32 476 * float32(1920 / 896) = 1019.99994, which the released code truncates to 1019.
    assert EXPECTED["q25-single-peak"] == [((9, 16, 10, 17), (960, 540, 1019, 600))]
    # q25-256-no-sink: 16x16 = 256 tokens is not more than 256, so the corner cell is not masked; 448 px / 16 = 28 px
    assert EXPECTED["q25-256-no-sink"] == [((0, 0, 1, 1), (0, 0, 28, 28))]
    # q25-272-sink: 17x16 = 272 > 256: the corner strip is zeroed before the blur and the map is empty
    assert EXPECTED["q25-272-sink"] == []
    # q25-small-source-min-size: a 10x10 px cell grows by 18 px around its centre to 28 px: [11, 39) x [21, 49)
    assert EXPECTED["q25-small-source-min-size"] == [((3, 2, 4, 3), (11, 21, 39, 49))]
    # ll-two-blobs: two components, kept in raster order of their first cell; 1024x768 scales by 336 / 1024 with
    # (336 - 252) / 2 = 42 px of padding on top: rows 2..7 map to (28 - 42) / 0.328 -> 0 and (98 - 42) / 0.328 = 170
    assert EXPECTED["ll-two-blobs"][0] == ((2, 2, 7, 7), (85, 0, 298, 170))


def test_reflect_blur_keeps_the_border_and_zero_padding_would_not():
    # a 2-column strip of p=0.18 on the right edge, threshold 0.15: reflection keeps the edge column at 0.18
    strip = _map((18, 32), -6.0, block(0, 18, 30, 32, -1.5163))
    blurred = official.torchvision_blur3(torch.sigmoid(strip))
    assert blurred[5, 31] == pytest.approx(0.18, abs=1e-4) and blurred[5, 30] < 0.15
    # uniform maps stay uniform, corners included (zero padding would damp the outer ring)
    flat = official.torchvision_blur3(torch.full((8, 65), 0.2))
    assert torch.allclose(flat, torch.full((8, 65), 0.2), atol=1e-6)
    # a single row or column is blurred along its length only (torchvision itself cannot reflect one cell)
    row = official.torchvision_blur3(torch.tensor([[0.0, 1.0, 0.0]]))
    assert row[0, 1] == pytest.approx(0.4519, abs=1e-4)


def test_sink_mask_is_not_applied_after_the_blur():
    # a strong peak beside the corner strip: its blurred neighbours inside the strip stay in the box
    assert EXPECTED["q25-peak-beside-sink"] == [((0, 0, 3, 3), (0, 0, 180, 180))]


def test_qwen3_sink_keep_threshold():
    scores = torch.tensor([[1.0, 1.2], [-5.0, float("nan")]])  # sigmoid 0.731, 0.769, 0.007, NaN as -inf
    assert official.qwen3_sink_keep(scores).tolist() == [[True, False], [True, True]]


def _std_positions(t0, gh, gw, after=5):
    """First-pass M-RoPE positions of ``t0`` text tokens, a (gh, gw) image and ``after`` text tokens."""
    text = torch.arange(t0)
    rows = t0 + torch.arange(gh).repeat_interleave(gw)
    cols = t0 + torch.arange(gw).repeat(gh)
    tail = t0 + max(gh, gw) + torch.arange(after)
    t = torch.cat([text, torch.full((gh * gw,), t0), tail])
    return torch.stack([t, torch.cat([text, rows, tail]), torch.cat([text, cols, tail])])[:, None, :]


# (t0, source grid, cells, RoI grid) -> (t of the RoI frame, RoI rows' h, RoI columns' w), from
# get_roi_interpolated_pos_ids_single; by hand: rows run linspace(t0 + r0, t0 + r1 - 1), t = t0 + max(gh, gw) + 2
POSITIONS = [
    (
        (15, (18, 32), (3, 5, 7, 9), (6, 8)),
        (
            49.0,
            [18.0, 18.6, 19.2, 19.8, 20.4, 21.0],
            [20.0, 20.4286, 20.8571, 21.2857, 21.7143, 22.1429, 22.5714, 23.0],
        ),
    ),
    (
        (12, (8, 65), (3, 59, 6, 63), (5, 7)),
        (79.0, [15.0, 15.5, 16.0, 16.5, 17.0], [71.0, 71.5, 72.0, 72.5, 73.0, 73.5, 74.0]),
    ),
    (
        (15, (61, 9), (58, 6, 61, 9), (9, 9)),
        (
            78.0,
            [73.0, 73.25, 73.5, 73.75, 74.0, 74.25, 74.5, 74.75, 75.0],
            [21.0, 21.25, 21.5, 21.75, 22.0, 22.25, 22.5, 22.75, 23.0],
        ),
    ),
    ((15, (18, 32), (9, 16, 10, 17), (2, 2)), (49.0, [24.0, 24.0], [31.0, 31.0])),
]


@pytest.mark.parametrize(("setup", "expected"), POSITIONS)
def test_source_aligned_positions(setup, expected):
    t0, (sh, sw), cells, (gh, gw) = setup
    positions = _std_positions(t0, sh, sw)
    start, end = t0, t0 + sh * sw
    pos = source_aligned_positions(positions, start, end, (sh, sw), (gh, gw), cells)[:, 0]
    t, rows, cols = expected
    roi = pos[:, end + 2 : end + 2 + gh * gw]
    assert torch.all(roi[0] == t)
    assert roi[1].view(gh, gw)[:, 0].tolist() == pytest.approx(rows, abs=1e-4)
    assert roi[2].view(gh, gw)[0].tolist() == pytest.approx(cols, abs=1e-4)
    # the released arithmetic exactly: float32 linspace between the source positions of the corner cells
    r0, c0, r1, c1 = cells
    assert torch.equal(roi[1].view(gh, gw)[:, 0], torch.linspace(float(t0 + r0), float(t0 + r1 - 1), gh))
    assert torch.equal(roi[2].view(gh, gw)[0], torch.linspace(float(t0 + c0), float(t0 + c1 - 1), gw))
    e = t0 + max(sh, sw)  # the source <|vision_end|>
    assert (
        pos[:, end + 1].tolist() == [e + 1.0] * 3 and pos[:, end + 2 + gh * gw].tolist() == [e + max(gh, gw) + 2.0] * 3
    )
    assert torch.equal(pos[:, end + 3 + gh * gw :], positions[:, 0, end + 1 :].float() + max(gh, gw) + 2)
