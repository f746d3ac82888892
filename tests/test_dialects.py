"""The external-crop dialects (tools.dialects): per dialect, a table of boxes with the exact region in original pixels
or the refusal; properties of located regions on random boxes and garbage; the reference reply texts; the returned
crop sizes; the configs and the registry. Reading call texts: test_dialect_parsing.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from dialect_helpers import BIG, INF, SETTINGS
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from qzoom_agent.tools.crop import ToolCallError, ToolImage, zoom_tool_schema
from qzoom_agent.tools.dialects import (
    DIALECTS,
    Call,
    DeepEyesDialect,
    MiniO3Dialect,
    PixelReasonerDialect,
    Qwen3VLDialect,
    get_dialect,
)

from qzoom_agent.boxes import Box

# The original is 1600x1200, shown to the policy at 448x336 (both axes scaled by 7/25). Crop 1 is its region
# (400, 200)-(1200, 1000), seen at 400x400; crop 2 is (500, 300)-(700, 500), a crop of crop 1, seen at 200x200.
_ORIGINAL = Image.new("RGB", (1600, 1200))
_WIDE = Image.new("RGB", (4000, 300))


def _chain(view: tuple[int, int] = (448, 336)) -> list[ToolImage]:
    return [ToolImage(_ORIGINAL, view, 0, Box(0, 0, 1600, 1200)),
            ToolImage(Image.new("RGB", (400, 400)), (400, 400), 0, Box(400, 200, 1200, 1000)),
            ToolImage(Image.new("RGB", (200, 200)), (200, 200), 0, Box(500, 300, 700, 500))]


IMAGES = {
    "chain": _chain(),
    "fullview": _chain((1600, 1200)),  # the same original, shown at its own size
    "wide": [ToolImage(_WIDE, (2000, 150), 0, Box(0, 0, 4000, 300))],  # for aspect ratios near 100
}

GARBAGE = [  # (id, bbox, message): refused by every dialect
    ("NaN", [0, 0, math.nan, 0.5], "finite"),
    ("inf", [0, 0, math.inf, 0.5], "finite"),
    ("-inf", [-math.inf, 0, 0.5, 0.5], "finite"),
    ("1e999", [0, 0, INF, 0.5], "finite"),
    ("400 digits", [0, 0, BIG, 1], "finite"),
    ("strings", ["0", "0", "0.5", "0.5"], "four numbers"),
    ("one string", [0, 0, "0.5", 0.5], "four numbers"),
    ("a bool", [0, True, 0.5, 0.5], "four numbers"),
    ("all bools", [False, False, True, True], "four numbers"),
    ("3 values", [0, 0, 0.5], "four numbers"),
    ("5 values", [0, 0, 0.5, 0.5, 0.5], "four numbers"),
    ("None", None, "four numbers"),
    ("a dict", {"x1": 0}, "four numbers"),
    ("a JSON string", "[0, 0, 0.5, 0.5]", "four numbers"),
]


def _garbage(**overrides):
    return [(f"garbage: {name}", overrides, "chain", bbox, 0, msg) for name, bbox, msg in GARBAGE]


# (id, config overrides, images, bbox, source, expected Box or error substring)
REF = {"map_from_view": False}  # DeepEyes as the reference runs: the numbers are original pixels
DEEPEYES = [
    ("normal", REF, "chain", [100, 100, 300, 200], 0, (100, 100, 300, 200)),
    ("fractional, rounded out", REF, "chain", [100.5, 100.25, 300.75, 200.5], 0, (100, 100, 301, 201)),
    ("whole image", REF, "chain", [0, 0, 1600, 1200], 0, (0, 0, 1600, 1200)),
    ("31 px wide", REF, "chain", [0, 0, 31, 200], 0, (0, 0, 31, 200)),
    ("30 px wide", REF, "chain", [0, 0, 30, 200], 0, "each side must exceed 30"),
    ("29 px wide", REF, "chain", [0, 0, 29, 200], 0, "each side must exceed 30"),
    ("31 px tall", REF, "chain", [0, 0, 200, 31], 0, (0, 0, 200, 31)),
    ("30 px tall", REF, "chain", [0, 0, 200, 30], 0, "each side must exceed 30"),
    ("29 px tall", REF, "chain", [0, 0, 200, 29], 0, "each side must exceed 30"),
    ("30.2 px wide", REF, "chain", [10, 10, 40.2, 100], 0, (10, 10, 41, 100)),
    ("29.8 px wide, 31 once rounded out", REF, "chain", [10.5, 10, 40.3, 100], 0, "is 29.8x90 px"),
    ("inverted x", REF, "chain", [300, 100, 100, 200], 0, "x1 < x2"),
    ("inverted y", REF, "chain", [100, 200, 300, 100], 0, "x1 < x2"),
    ("zero width", REF, "chain", [100, 100, 100, 200], 0, "x1 < x2"),
    ("outside right", REF, "chain", [1700, 0, 1800, 100], 0, "outside"),
    ("outside below", REF, "chain", [0, 1300, 100, 1400], 0, "outside"),
    ("outside above-left", REF, "chain", [-200, -200, -100, -100], 0, "outside"),
    ("partly outside top-left", REF, "chain", [-50, -50, 100, 100], 0, (0, 0, 100, 100)),
    ("partly outside bottom-right", REF, "chain", [1500, 1100, 1700, 1300], 0, (1500, 1100, 1600, 1200)),
    ("clamped to 31 px", REF, "chain", [1569, 0, 1700, 100], 0, (1569, 0, 1600, 100)),
    ("clamped to 30 px", REF, "chain", [1570, 0, 1700, 100], 0, "each side"),
    ("clamped to 20 px", REF, "chain", [-100, 0, 20, 100], 0, "each side"),
    ("1e300", REF, "chain", [0, 0, 1e300, 1e300], 0, (0, 0, 1600, 1200)),
    ("-1e300", REF, "chain", [-1e300, -1e300, 100, 100], 0, (0, 0, 100, 100)),
    ("a crop as source", REF, "chain", [0, 0, 100, 100], 1, "original image only"),
    ("aspect 99", REF, "wide", [0, 0, 3465, 35], 0, (0, 0, 3465, 35)),
    ("aspect 100", REF, "wide", [0, 0, 3500, 35], 0, (0, 0, 3500, 35)),
    ("aspect 100.5", REF, "wide", [0, 0, 3517.5, 35], 0, "aspect ratio 100.5"),
    ("aspect 101", REF, "wide", [0, 0, 3535, 35], 0, "aspect ratio 101"),
    ("view: mapped", {}, "chain", [100, 100, 200, 200], 0, (357, 357, 715, 715)),
    ("view: not mapped", REF, "chain", [100, 100, 200, 200], 0, (100, 100, 200, 200)),
    ("view: whole view", {}, "chain", [0, 0, 448, 336], 0, (0, 0, 1600, 1200)),
    ("view: 8.4 px is 30 px", {}, "chain", [0, 0, 8.4, 100], 0, "each side must exceed 30"),
    ("view: 8.68 px is 31 px", {}, "chain", [0, 0, 8.68, 100], 0, (0, 0, 31, 358)),
    ("view: 8.12 px is 29 px", {}, "chain", [0, 0, 8.12, 100], 0, "each side"),
    ("view: 9 px is 32.1 px", {}, "chain", [0, 0, 9, 9], 0, (0, 0, 33, 33)),
    ("view: 9 px unmapped", REF, "chain", [0, 0, 9, 9], 0, "each side"),
    ("view: 8 px is 28.6 px", {}, "chain", [0, 0, 8, 8], 0, "each side"),
    ("view: past the view", {}, "chain", [500, 0, 600, 100], 0, "outside"),
    ("view: partly past the view", {}, "chain", [400, 300, 500, 400], 0, (1428, 1071, 1600, 1200)),
    ("view: inverted", {}, "chain", [200, 100, 100, 200], 0, "x1 < x2"),
    ("view: aspect 100", {}, "wide", [0, 0, 1750, 17.5], 0, (0, 0, 3500, 35)),
    ("view: aspect 101", {}, "wide", [0, 0, 1767.5, 17.5], 0, "aspect"),
    ("view: 1e300", {}, "chain", [-1e300, 0, 1e300, 1e300], 0, (0, 0, 1600, 1200)),
    ("view: NaN", {}, "chain", [0, 0, 100, math.nan], 0, "finite"),
    *_garbage(map_from_view=False),
]

QWEN3VL = [
    ("whole image", {}, "chain", [0, 0, 1000, 1000], 0, (0, 0, 1600, 1200)),
    ("middle", {}, "chain", [250, 250, 750, 750], 0, (400, 300, 1200, 900)),
    ("normal", {}, "chain", [100, 200, 500, 600], 0, (160, 240, 800, 720)),
    ("fractional, rounded out", {}, "chain", [123.4, 0, 456.7, 500], 0, (197, 0, 731, 600)),
    ("31 px wide", {}, "chain", [0, 0, 19.375, 100], 0, (0, 0, 31, 120)),
    ("30 px wide", {}, "chain", [0, 0, 18.75, 100], 0, "each side must exceed 30"),
    ("29 px wide", {}, "chain", [0, 0, 18.125, 100], 0, "each side must exceed 30"),
    ("31.2 px tall", {}, "chain", [0, 0, 100, 26], 0, (0, 0, 160, 32)),
    ("30 px tall", {}, "chain", [0, 0, 100, 25], 0, "each side"),
    ("28.8 px tall", {}, "chain", [0, 0, 100, 24], 0, "each side"),
    ("30.2 px wide", {}, "chain", [0, 0, 18.875, 100], 0, (0, 0, 31, 120)),
    ("29.8 px wide, 31 once rounded out", {}, "chain", [10.3125, 0, 28.9375, 100], 0, "is 29.8x120 px"),
    ("inverted", {}, "chain", [500, 0, 100, 100], 0, "x1 < x2"),
    ("zero height", {}, "chain", [0, 100, 100, 100], 0, "x1 < x2"),
    ("outside right", {}, "chain", [1001, 0, 1100, 100], 0, "outside"),
    ("outside above-left", {}, "chain", [-100, -100, -1, -1], 0, "outside"),
    ("partly outside top-left", {}, "chain", [-100, -100, 500, 500], 0, (0, 0, 800, 600)),
    ("partly outside bottom-right", {}, "chain", [900, 900, 1200, 1200], 0, (1440, 1080, 1600, 1200)),
    ("pixels of the view are not its frame", {}, "chain", [0, 0, 448, 336], 0, (0, 0, 717, 404)),
    ("the view size does not matter", {}, "fullview", [100, 200, 500, 600], 0, (160, 240, 800, 720)),
    ("crop 1: top-left quarter", {}, "chain", [0, 0, 500, 500], 1, (400, 200, 800, 600)),
    ("crop 1: bottom-right quarter", {}, "chain", [500, 500, 1000, 1000], 1, (800, 600, 1200, 1000)),
    ("crop 1: 31 px", {}, "chain", [0, 0, 38.75, 500], 1, (400, 200, 431, 600)),
    ("crop 1: 30 px", {}, "chain", [0, 0, 37.5, 500], 1, "each side"),
    ("crop 2: whole", {}, "chain", [0, 0, 1000, 1000], 2, (500, 300, 700, 500)),
    ("crop 2: left half", {}, "chain", [0, 0, 500, 1000], 2, (500, 300, 600, 500)),
    ("crop 2: 30 px of the original", {}, "chain", [0, 0, 150, 1000], 2, "each side must exceed 30"),
    ("crop 2: 31 px of the original", {}, "chain", [0, 0, 155, 1000], 2, (500, 300, 531, 500)),
    ("crop 2: clamped to it", {}, "chain", [-500, -500, 1500, 1500], 2, (500, 300, 700, 500)),
    ("img_idx past the last", {}, "chain", [0, 0, 500, 500], 3, "img_idx 3 does not exist"),
    ("negative img_idx", {}, "chain", [0, 0, 500, 500], -1, "does not exist"),
    ("bool img_idx", {}, "chain", [0, 0, 500, 500], True, "does not exist"),
    ("float img_idx", {}, "chain", [0, 0, 500, 500], 1.5, "does not exist"),
    ("aspect 99", {}, "wide", [0, 0, 891, 120], 0, (0, 0, 3564, 36)),
    ("aspect 100", {}, "wide", [0, 0, 900, 120], 0, (0, 0, 3600, 36)),
    ("aspect 101", {}, "wide", [0, 0, 909, 120], 0, "aspect ratio 101"),
    ("1e300", {}, "chain", [-1e300, -1e300, 1e300, 1e300], 0, (0, 0, 1600, 1200)),
    *_garbage(),
]

MINIO3 = [
    ("whole image", {}, "chain", [0, 0, 1, 1], 0, (0, 0, 1600, 1200)),
    ("middle", {}, "chain", [0.25, 0.25, 0.75, 0.75], 0, (400, 300, 1200, 900)),
    ("normal", {}, "chain", [0.1, 0.2, 0.5, 0.6], 0, (160, 240, 800, 720)),
    ("fractional, rounded out", {}, "chain", [0.1234, 0.5678, 0.4321, 0.8765], 0, (197, 681, 692, 1052)),
    ("keeps the last row and column", {}, "chain", [0.5, 0.5, 1, 1], 0, (800, 600, 1600, 1200)),
    ("1 px wide", {}, "chain", [0.5, 0.5, 0.500625, 0.6], 0, (800, 600, 801, 720)),
    ("0.9 px wide", {}, "chain", [0.5, 0.5, 0.5005625, 0.6], 0, "each side must be at least 1"),
    ("0 px wide", {}, "chain", [0.5, 0.5, 0.5, 0.6], 0, "x1 < x2"),
    ("last column, 1 px", {}, "chain", [0.999375, 0, 1, 0.1], 0, (1599, 0, 1600, 120)),
    ("last column, 0.8 px", {}, "chain", [0.9995, 0, 1, 1], 0, "at least 1"),
    ("1 px tall (crop 2)", {}, "chain", [0, 0.5, 0.5, 0.505], 2, (500, 400, 600, 401)),
    ("0.9 px tall (crop 2)", {}, "chain", [0, 0.5, 0.5, 0.5045], 2, "at least 1"),
    ("aspect 199", {}, "chain", [0, 0.5, 0.373125, 0.5025], 0, (0, 600, 597, 603)),
    ("aspect 200", {}, "chain", [0, 0.5, 0.375, 0.5025], 0, "aspect ratio 200 must be below 200"),
    ("aspect 201", {}, "chain", [0, 0.5, 0.376875, 0.5025], 0, "aspect ratio 201"),
    ("tall aspect 199", {}, "chain", [0, 0, 0.00375, 0.995], 0, (0, 0, 6, 1194)),
    ("tall aspect 200", {}, "chain", [0, 0, 0.00375, 1], 0, "below 200"),
    ("inverted", {}, "chain", [0.6, 0.2, 0.4, 0.6], 0, "x1 < x2"),
    ("inverted y", {}, "chain", [0.2, 0.6, 0.4, 0.2], 0, "x1 < x2"),
    ("outside right", {}, "chain", [1.5, 0, 2, 1], 0, "outside"),
    ("outside above", {}, "chain", [0, -1, 1, -0.5], 0, "outside"),
    ("pixels are outside a 0-1 frame", {}, "chain", [100, 100, 200, 200], 0, "outside"),
    ("partly outside top-left", {}, "chain", [-0.5, -0.5, 0.5, 0.5], 0, (0, 0, 800, 600)),
    ("partly outside bottom-right", {}, "chain", [0.9, 0.9, 1.5, 1.5], 0, (1440, 1080, 1600, 1200)),
    ("the view size does not matter", {}, "fullview", [0.1, 0.2, 0.5, 0.6], 0, (160, 240, 800, 720)),
    ("observation 1", {}, "chain", [0, 0, 0.5, 0.5], 1, (400, 200, 800, 600)),
    ("observation 1: 1 px", {}, "chain", [0, 0, 0.00125, 0.1], 1, (400, 200, 401, 280)),
    ("1 px by 1200 is aspect 1200", {}, "chain", [0.999375, 0, 1, 1], 0, "aspect ratio 1200"),
    ("observation 2", {}, "chain", [0.5, 0.5, 1, 1], 2, (600, 400, 700, 500)),
    ("observation 2: clamped to it", {}, "chain", [-1, -1, 2, 2], 2, (500, 300, 700, 500)),
    ("observation 1: keeps its last column", {}, "chain", [0.5, 0.5, 1, 1], 1, (800, 600, 1200, 1000)),
    ("observation 1: fractional", {}, "chain", [0.1234, 0.1, 0.2, 0.3], 1, (498, 280, 560, 440)),
    ("observation 2: 1 px of the original", {}, "chain", [0, 0, 0.005, 0.5], 2, (500, 300, 501, 400)),
    ("observation 2: 0.5 px", {}, "chain", [0, 0, 0.0025, 0.5], 2, "at least 1"),
    ("observation 2: aspect 200", {}, "chain", [0, 0, 0.005, 1], 2, "below 200"),
    ("observation 3 does not exist", {}, "chain", [0, 0, 0.5, 0.5], 3, "observation 3 does not exist"),
    ("negative observation", {}, "chain", [0, 0, 0.5, 0.5], -1, "does not exist"),
    ("1e300", {}, "chain", [-1e300, -1e300, 1e300, 1e300], 0, (0, 0, 1600, 1200)),
    ("aspect 133, over DeepEyes' 100", {}, "wide", [0, 0, 0.5, 0.05], 0, (0, 0, 2000, 15)),
    *_garbage(),
]

PIXELREASONER = [
    ("normal, padded by 0.1", {}, "chain", [0.2, 0.2, 0.6, 0.6], 0, (160, 120, 1120, 840)),
    ("padded past the edges", {}, "chain", [0, 0, 0.99, 0.99], 0, (0, 0, 1600, 1200)),
    ("a point", {}, "chain", [0.5, 0.5, 0.5, 0.5], 0, (640, 480, 960, 720)),
    ("negative values stay normalized", {}, "chain", [-0.5, -0.5, 0.3, 0.3], 0, (0, 0, 640, 480)),
    ("near the corner", {}, "chain", [0.1, 0.1, 0.2, 0.2], 0, (0, 0, 480, 360)),
    ("fractional, rounded out", {}, "chain", [0.123, 0.456, 0.789, 0.9], 0, (36, 427, 1423, 1200)),
    ("inverted x", {}, "chain", [0.6, 0.2, 0.4, 0.6], 0, "not inverted"),
    ("inverted y", {}, "chain", [0.2, 0.6, 0.4, 0.2], 0, "not inverted"),
    ("slightly inverted", {}, "chain", [0.55, 0.2, 0.45, 0.6], 0, "not inverted"),
    ("pixels of the view", {}, "chain", [100, 100, 200, 200], 0, (197, 237, 875, 835)),
    ("a 1 makes them pixels", {}, "chain", [0.2, 0.2, 1, 0.6], 0, (0, 0, 164, 123)),
    ("pixels: the whole view", {}, "chain", [0, 0, 448, 336], 0, (0, 0, 1600, 1200)),
    ("pixels: another view size", {}, "fullview", [100, 100, 200, 200], 0, (0, 0, 360, 320)),
    ("pixels: 1e300", {}, "chain", [0, 0, 1e300, 1e300], 0, (0, 0, 1600, 1200)),
    ("pixels: -1e300", {}, "chain", [-1e300, -1e300, 100, 100], 0, (0, 0, 518, 478)),
    ("pixels: outside", {}, "chain", [2000, 2000, 3000, 3000], 0, "is 0x0 px"),
    ("pixels: partly past the view", {}, "chain", [400, 300, 500, 400], 0, (1268, 951, 1600, 1200)),
    ("pixels: negative", {}, "chain", [-50, -50, 50, 50], 0, (0, 0, 339, 299)),
    ("a point at 0.999", {}, "chain", [0.999, 0.999, 0.999, 0.999], 0, (1438, 1078, 1600, 1200)),
    ("crop 1: quarter", {}, "chain", [0, 0, 0.5, 0.5], 1, (400, 200, 880, 680)),
    ("crop 1: pixels of its 400x400 view", {}, "chain", [100, 100, 200, 200], 1, (520, 320, 880, 680)),
    ("crop 1: middle", {}, "chain", [0.25, 0.25, 0.75, 0.75], 1, (520, 320, 1080, 880)),
    ("crop 1: pixels, its whole view", {}, "chain", [0, 0, 400, 400], 1, (400, 200, 1200, 1000)),
    ("crop 2: a point", {}, "chain", [0.5, 0.5, 0.5, 0.5], 2, (580, 380, 620, 420)),
    ("crop 2: a corner point is 20 px", {}, "chain", [0, 0, 0, 0], 2, "each side must exceed 28"),
    ("crop 2: 28 px wide", {}, "chain", [0, 0, 0.04, 0.5], 2, "is 28x120 px"),
    ("crop 2: 29 px wide", {}, "chain", [0, 0, 0.045, 0.5], 2, (500, 300, 529, 420)),
    ("crop 2: 28.1 px wide", {}, "chain", [0, 0, 0.0405, 0.5], 2, (500, 300, 529, 420)),
    ("crop 2: 29 px tall in pixels", {}, "chain", [0, 0, 100, 9], 2, (500, 300, 620, 329)),
    ("crop 2: 28 px tall", {}, "chain", [0, 0, 0.5, 0.04], 2, "is 120x28 px"),
    ("crop 2: 29 px tall", {}, "chain", [0, 0, 0.5, 0.045], 2, (500, 300, 620, 329)),
    ("crop 2: 28 px in pixels", {}, "chain", [0, 0, 8, 100], 2, "each side must exceed 28"),
    ("crop 2: 29 px in pixels", {}, "chain", [0, 0, 9, 100], 2, (500, 300, 529, 420)),
    ("crop 2: clamped to it", {}, "chain", [-1, -1, 0.99, 0.99], 2, (500, 300, 700, 500)),
    ("target_image 4", {}, "chain", [0, 0, 0.5, 0.5], 3, "target_image 4 does not exist"),
    ("target_image 0", {}, "chain", [0, 0, 0.5, 0.5], -1, "target_image 0 does not exist"),
    ("a bool target", {}, "chain", [0, 0, 0.5, 0.5], True, "does not exist"),
    *_garbage(),
]

TABLES = {"deepeyes": DEEPEYES, "qwen3vl": QWEN3VL, "minio3": MINIO3, "pixelreasoner": PIXELREASONER}
CASES = [(name, *case) for name, table in TABLES.items() for case in table]


def test_every_table_has_at_least_50_boxes():
    assert {name: len(table) >= 50 for name, table in TABLES.items()} == dict.fromkeys(TABLES, True)


@pytest.mark.parametrize("dialect, what, overrides, images, bbox, source, expected", CASES,
                         ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_locate_table(dialect, what, overrides, images, bbox, source, expected):
    d = get_dialect(dialect, **overrides)
    call = Call(bbox, None, source)
    if isinstance(expected, str):
        with pytest.raises(ToolCallError, match=expected.replace("(", r"\(").replace(".", r"\.")) as err:
            d.locate(call, IMAGES[images])
        assert "\n" not in str(err.value) and len(str(err.value)) < 200
    else:
        assert d.locate(call, IMAGES[images]).as_tuple() == expected


# ---- properties of located regions ----

def _expected_region(name, bbox, parent):
    """The region in original pixels, in plain floats: an independent statement of each dialect's mapping."""
    b = parent.box
    if name == "pixelreasoner":
        scale = (1, 1) if max(bbox) < 1 else parent.view_size
        unit = [min(max(v / s + d, 0.0), 1.0) for v, s, d in zip(bbox, scale * 2, (-0.1, -0.1, 0.1, 0.1), strict=True)]
    else:
        extent = {"deepeyes": parent.view_size, "qwen3vl": (1000, 1000), "minio3": (1, 1)}[name]
        unit = [min(max(v, 0.0), e) / e for v, e in zip(bbox, extent * 2, strict=True)]
    return [b.x1 + unit[0] * b.width, b.y1 + unit[1] * b.height, b.x1 + unit[2] * b.width, b.y1 + unit[3] * b.height]


@st.composite
def framed(draw, name):
    source = 0 if name == "deepeyes" else draw(st.integers(0, 2))
    parent = IMAGES["chain"][source]
    extent = {"deepeyes": parent.view_size, "qwen3vl": (1000, 1000)}.get(name, (1, 1))
    if name == "pixelreasoner" and draw(st.booleans()):
        extent = parent.view_size  # pixel mode
    xs = sorted(draw(st.floats(-0.2, 1.2)) for _ in range(2))
    ys = sorted(draw(st.floats(-0.2, 1.2)) for _ in range(2))
    return [xs[0] * extent[0], ys[0] * extent[1], xs[1] * extent[0], ys[1] * extent[1]], source


@pytest.mark.parametrize("name", list(DIALECTS))
@SETTINGS
@given(data=st.data())
def test_located_regions_lie_inside_and_cover_what_was_pointed_at(name, data):
    bbox, source = data.draw(framed(name))
    parent = IMAGES["chain"][source]
    try:
        box = get_dialect(name).locate(Call(tuple(bbox), None, source), IMAGES["chain"])
    except ToolCallError:
        return
    region = _expected_region(name, bbox, parent)
    p = parent.box
    assert p.x1 <= box.x1 < box.x2 <= p.x2 and p.y1 <= box.y1 < box.y2 <= p.y2  # inside the parent, so the original
    eps = 1e-6
    assert box.x1 <= region[0] + eps and box.y1 <= region[1] + eps  # covers it ...
    assert box.x2 >= region[2] - eps and box.y2 >= region[3] - eps
    assert box.x1 >= region[0] - 1 - eps and box.y1 >= region[1] - 1 - eps  # ... within rounding
    assert box.x2 <= region[2] + 1 + eps and box.y2 <= region[3] + 1 + eps


json_like = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                         lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=3), inner,
                                                                                     max_size=3), max_leaves=12)
numbers = st.integers(-(10**30), 10**30) | st.floats() | st.just(BIG) | st.just(-BIG)


@pytest.mark.parametrize("name", list(DIALECTS))
@SETTINGS
@given(bbox=json_like | st.lists(numbers, min_size=4, max_size=4), source=json_like | st.integers(-3, 5),
       images=st.sampled_from(["chain", "fullview", "wide", "none"]))
def test_locate_raises_only_tool_call_errors_on_garbage(name, bbox, source, images):
    try:
        box = get_dialect(name).locate(Call(bbox, None, source), [] if images == "none" else IMAGES[images])
    except ToolCallError as err:
        assert str(err) and "\n" not in str(err)
        return
    assert isinstance(box, Box) and box.x2 <= 4000 and box.y2 <= 1200


# ---- replies and prompts ----

DEEPEYES_PROMPT = ("\nThink first, call **image_zoom_in_tool** if needed, then answer. Format strictly as:  "
                   "<think>...</think>  <tool_call>...</tool_call> (if tools needed)  <answer>...</answer> ")
MINIO3_CONTINUE = (".\nContinue your reasoning process inside <think> and </think>. If needed, you can continue to "
                   "zoom in on the original image or any of the observations, by outputting <grounding> and "
                   "</grounding> as before. If the final answer is confirmed, put your final answer inside <answer> "
                   "and </answer>.")
IMAGE = {"type": "image"}


def _t(text):
    return {"type": "text", "text": text}


def test_replies_render_the_reference_texts():
    assert DeepEyesDialect().reply(True) == [_t("<tool_response>"), IMAGE, _t(DEEPEYES_PROMPT), _t("</tool_response>")]
    assert DeepEyesDialect().reply(False, error="ZOOM IN ARGUMENTS ARE INVALID") == [
        _t("Error: ZOOM IN ARGUMENTS ARE INVALID")]
    assert Qwen3VLDialect().reply(True) == [IMAGE] and Qwen3VLDialect.reply_role == "tool"
    assert MiniO3Dialect().reply(True, observation=1) == [
        _t("After the above Action 0, here is the the zoom-in image (Observation 1):\n"), IMAGE, _t(MINIO3_CONTINUE)]
    assert MiniO3Dialect().reply(True, observation=3)[0]["text"].startswith("After the above Action 2, ")
    assert MiniO3Dialect().reply(False, error="bad box") == [_t(
        "ERROR occurs during grounding. Error Information: bad box.\nPlease analyze the error information obtained "
        "from the function tool and adjust your response. Countinue your reasoning process inside <think> and "
        "</think>.")]
    assert PixelReasonerDialect().reply(True, size=(640, 480)) == [
        _t("\nHere is the cropped image (Image Size: 640x480):"), IMAGE]
    assert PixelReasonerDialect().reply(False, error="too small") == [_t("\nExecution error:\ntoo small\n")]


@pytest.mark.parametrize("name", list(DIALECTS))
def test_reply_text_off_returns_the_image_alone_and_errors_stay_text(name):
    d = get_dialect(name, reply_text=False)
    assert d.reply(True) == [IMAGE]
    (error,) = d.reply(False, error="multi\nline")
    assert error["type"] == "text" and "multi line" in error["text"]
    with pytest.raises(ValueError, match="exactly when ok is False"):
        d.reply(True, error="x")
    with pytest.raises(ValueError, match="exactly when ok is False"):
        d.reply(False)


def test_replies_that_need_a_number_say_so():
    with pytest.raises(ValueError, match="observation"):
        MiniO3Dialect().reply(True)
    with pytest.raises(ValueError, match="size"):
        PixelReasonerDialect().reply(True, size=None)


def test_prompts_and_schemas():
    de = DeepEyesDialect()
    assert de.schema() == zoom_tool_schema("deepeyes") and de.instruction() == DEEPEYES_PROMPT
    system = de.system_prompt()
    assert system.startswith("You are a helpful assistant.\n\n# Tools\n") and json.dumps(
        de.schema(), separators=(",", ":")) in system and "**Example**:  \n<tool_call>  \n" in system
    assert Qwen3VLDialect().schema() == zoom_tool_schema("qwen3vl") and Qwen3VLDialect().system_prompt() is None
    assert MiniO3Dialect().schema() is None
    assert "'source' refers to the image that you zoom in and could be either 'original_image' or 'observation_i'" in (
        MiniO3Dialect().system_prompt())
    pr = PixelReasonerDialect().schema()["function"]
    assert pr["name"] == "crop_image_normalized" and pr["parameters"]["required"] == ["bbox_2d", "target_image"]
    assert PixelReasonerDialect().instruction().startswith("\n\n\n\nGuidelines: ")
    assert PixelReasonerDialect().instruction().endswith("put your final answer within \\boxed{}.")


def test_dialect_attributes():
    got = {n: (c.name, c.stop_strings, c().max_turns, c.frame) for n, c in DIALECTS.items()}
    assert got == {"deepeyes": ("deepeyes", ("</tool_call>",), 5, "absolute"),
                   "qwen3vl": ("qwen3vl", ("</tool_call>",), 5, "norm1000"),
                   "minio3": ("minio3", ("</grounding>",), 12, "norm1"),
                   "pixelreasoner": ("pixelreasoner", ("</tool_call>",), 5, "norm1")}


# ---- returned crops ----

def _noise(w: int, h: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))


BOUNDS = {"deepeyes": (28, 4 * 28 * 28, 16384 * 28 * 28), "qwen3vl": (32, 65536, 16777216),
          "pixelreasoner": (28, 4 * 28 * 28, 1000 * 28 * 28)}
REGIONS = [(_ORIGINAL, (0, 0, 31, 31)), (_ORIGINAL, (10, 20, 110, 70)), (_ORIGINAL, (0, 0, 300, 200)),
           (_ORIGINAL, (0, 0, 1600, 1200)), (_ORIGINAL, (100, 0, 135, 300)), (_WIDE, (5, 5, 1605, 45)),
           (_WIDE, (0, 0, 4000, 300))]


@pytest.mark.parametrize("name", list(DIALECTS))
@pytest.mark.parametrize("original, region", REGIONS, ids=[str(r[1]) for r in REGIONS])
def test_view_sizes_obey_each_dialects_pixel_bounds(name, original, region):
    box = Box(*region)
    w, h = get_dialect(name).view(original, box).size
    if name == "minio3":  # int() truncation: at most a few pixels short of the minimum
        assert w * h <= 2_000_000 and (w + 1) * (h + 1) > 40_000 and min(w, h) >= 28
        if 40_000 <= box.area <= 2_000_000:
            assert (w, h) == (box.width, box.height)  # within the bounds: returned as cut
    else:
        factor, lo, hi = BOUNDS[name]
        assert w % factor == 0 and h % factor == 0 and lo <= w * h <= hi
        assert abs(math.log((w / h) / (box.width / box.height))) < 0.5  # about the region's shape


def test_views_are_the_original_pixels_and_zoom_overrides_the_sizing():
    original = _noise(1600, 1200)
    box = MiniO3Dialect().locate(Call((0.1, 0.1, 0.3, 0.25)), _chain())
    assert box.as_tuple() == (160, 120, 480, 300)
    assert np.array_equal(np.asarray(MiniO3Dialect().view(original, box)), np.asarray(original.crop((160, 120, 480,
                                                                                                      300))))
    assert DeepEyesDialect().view(original, Box(0, 0, 28, 28)).size == (56, 56)  # tiny: upscaled to 4 tokens
    assert DeepEyesDialect().view(original, Box(0, 0, 280, 140)).size == (280, 140)  # native size
    assert PixelReasonerDialect().view(original, Box(0, 0, 1600, 1200)).size == (1008, 756)  # 1000 tokens at most
    zoomed = get_dialect("pixelreasoner", zoom=3.0).view(original, Box(0, 0, 100, 50))
    assert zoomed.size == (300, 150)
    capped = get_dialect("deepeyes", zoom=4.0, max_pixels=100_000).view(original, Box(0, 0, 400, 200))
    assert capped.width * capped.height <= 100_000 * 1.01 and abs(capped.width - 2 * capped.height) <= 1
    with pytest.raises(ValueError, match="outside"):
        DeepEyesDialect().view(original, Box(0, 0, 1700, 100))


# ---- configs and the registry ----

@pytest.mark.parametrize("name, overrides, match", [
    ("deepeyes", {"zoom": 0}, "zoom"), ("deepeyes", {"zoom": math.nan}, "zoom"), ("minio3", {"zoom": True}, "zoom"),
    ("qwen3vl", {"max_turns": 0}, "max_turns"), ("pixelreasoner", {"max_turns": 2.5}, "max_turns"),
    ("minio3", {"min_pixels": 10, "max_pixels": 5}, "must not exceed"), ("qwen3vl", {"max_pixels": -1}, "max_pixels"),
    ("deepeyes", {"map_from_view": "yes"}, "map_from_view"), ("minio3", {"reply_text": 1}, "reply_text"),
    ("minio3", {"map_from_view": False}, "no option map_from_view"), ("mini-o3", {}, "deepeyes, qwen3vl, minio3"),
])
def test_bad_configs_are_clear_value_errors(name, overrides, match):
    with pytest.raises(ValueError, match=match):
        get_dialect(name, **overrides)


def test_get_dialect_applies_overrides():
    d = get_dialect("pixelreasoner", min_pixels=256 * 28 * 28, max_pixels=5120 * 28 * 28, zoom=2)
    assert isinstance(d, PixelReasonerDialect) and d.max_pixels == 5120 * 28 * 28 and d.zoom == 2
    assert get_dialect("deepeyes", map_from_view=False) == DeepEyesDialect(map_from_view=False)
    assert set(DIALECTS) == {"deepeyes", "qwen3vl", "minio3", "pixelreasoner"}
