"""Pixel-level drawing for ZoomWorld: a 5x7 dot-matrix font, the colour palette, backgrounds and clutter.

Everything here is deterministic: glyphs are filled rectangles on an integer grid (no font files, no hinting, no
anti-aliasing), and randomness only comes from the generators passed in. The same Pillow and numpy versions give
byte-identical images on every machine.
"""

from __future__ import annotations

import colorsys
import functools
import math
import random

import numpy as np
from PIL import Image, ImageChops, ImageDraw

Box = tuple[int, int, int, int]
RGB = tuple[int, int, int]

# Saturated colours that stay distinct after a 4-8x downscale; clutter never uses saturation above 0.35.
PALETTE: dict[str, RGB] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 220, 20),
    "green": (30, 170, 50),
    "cyan": (0, 200, 220),
    "blue": (30, 70, 230),
    "purple": (120, 40, 180),
    "magenta": (235, 20, 200),
}

# Rows of a 5x7 cell grid, '#' lit; every glyph spans all 7 rows so its tight box height equals the font size.
_FONT_ROWS: dict[str, str] = {
    "A": ".###. #...# #...# ##### #...# #...# #...#",
    "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.",
    "D": "###.. #..#. #...# #...# #...# #..#. ###..",
    "E": "##### #.... #.... ####. #.... #.... #####",
    "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####",
    "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#",
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.",
    "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
    "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",
    "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
}
FONT_CHARS = frozenset(_FONT_ROWS)


def text_colour(fill: RGB) -> RGB:
    """Black or white, whichever contrasts more with ``fill`` (Rec. 601 luma)."""
    luma = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    return (0, 0, 0) if luma >= 140 else (255, 255, 255)


def advance(size: int) -> int:
    """Horizontal distance in pixels between the origins of two consecutive glyphs of height ``size``."""
    return round(6 * size / 7)


def text_width(text: str, size: int) -> int:
    """Width in pixels of ``text`` at glyph height ``size``: the last glyph's right edge, no trailing gap."""
    return 0 if not text else (len(text) - 1) * advance(size) + round(5 * size / 7)


@functools.lru_cache(maxsize=4096)
def _glyph(char: str, size: int) -> tuple[np.ndarray, Box]:
    """(size, advance) uint8 mask of one glyph (255 = ink) and its tight box relative to the glyph origin."""
    adv = advance(size)
    mask = np.zeros((size, adv), dtype=np.uint8)
    if char == " ":
        return mask, (0, 0, 0, 0)
    rows = _FONT_ROWS[char].split()
    edges = [round(i * size / 7) for i in range(8)]  # cell edges on the integer grid keep glyphs gap-free
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            if cell == "#":
                mask[edges[r]:edges[r + 1], edges[c]:edges[c + 1]] = 255
    ys, xs = np.nonzero(mask)
    return mask, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def layout_glyphs(origin: tuple[int, int], text: str, size: int) -> list[tuple[str, Box]]:
    """Tight box of every non-space glyph of ``text`` drawn at ``origin`` (top-left) with glyph height ``size``.

    Args:
        origin: (x, y) of the first glyph's cell, in image pixels.
        text: characters from the font (A-Z, 0-9) and spaces.
        size: glyph height in pixels.

    Returns:
        (char, (x1, y1, x2, y2)) per drawn glyph, x2/y2 exclusive.
    """
    adv = advance(size)
    out = []
    for i, char in enumerate(text):
        if char != " ":
            bx1, by1, bx2, by2 = _glyph(char, size)[1]
            x, y = origin[0] + i * adv, origin[1]
            out.append((char, (x + bx1, y + by1, x + bx2, y + by2)))
    return out


def draw_text(image: Image.Image, origin: tuple[int, int], text: str, size: int, fill: RGB) -> None:
    """Stamp ``text`` onto ``image`` in one paste (one mask per string keeps dense pages fast)."""
    if not text:
        return
    mask = np.concatenate([_glyph(char, size)[0] for char in text], axis=1)[:, : text_width(text, size)]
    image.paste(fill, (origin[0], origin[1]), Image.fromarray(mask, "L"))


def muted_colour(rng: random.Random, max_saturation: float = 0.35) -> RGB:
    """A dull colour that cannot be mistaken for a palette colour."""
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, max_saturation), rng.uniform(0.25, 0.92))
    return round(r * 255), round(g * 255), round(b * 255)


def shape_polygon(shape: str, box: Box) -> list[tuple[int, int]]:
    """Integer vertices of a polygonal shape inscribed in ``box`` (x2/y2 exclusive); circles are drawn apart."""
    x1, y1, x2, y2 = box
    w, h = x2 - 1 - x1, y2 - 1 - y1
    cx, cy = x1 + w / 2, y1 + h / 2
    if shape in ("square", "rectangle"):
        pts = [(x1, y1), (x1 + w, y1), (x1 + w, y1 + h), (x1, y1 + h)]
    elif shape == "triangle":
        pts = [(cx, y1), (x1 + w, y1 + h), (x1, y1 + h)]
    elif shape == "diamond":
        pts = [(cx, y1), (x1 + w, cy), (cx, y1 + h), (x1, cy)]
    elif shape == "hexagon":
        corners = ((0.25, 0), (0.75, 0), (1, 0.5), (0.75, 1), (0.25, 1), (0, 0.5))
        pts = [(x1 + w * fx, y1 + h * fy) for fx, fy in corners]
    elif shape == "star":
        pts = []
        for k in range(10):
            radius = 0.5 if k % 2 == 0 else 0.2
            angle = -math.pi / 2 + k * math.pi / 5
            pts.append((0.5 + radius * math.cos(angle), 0.5 + radius * math.sin(angle)))
        lo_x, hi_x = min(p[0] for p in pts), max(p[0] for p in pts)
        lo_y, hi_y = min(p[1] for p in pts), max(p[1] for p in pts)
        # stretch the star to fill its box so the recorded box is tight
        pts = [(x1 + w * (px - lo_x) / (hi_x - lo_x), y1 + h * (py - lo_y) / (hi_y - lo_y)) for px, py in pts]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [(round(px), round(py)) for px, py in pts]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Box, fill: RGB, outline: RGB | None = None,
               width: int = 0) -> None:
    """Fill ``shape`` inside ``box`` (x2/y2 exclusive), optionally outlined."""
    rect = (box[0], box[1], box[2] - 1, box[3] - 1)
    if shape == "circle":
        draw.ellipse(rect, fill=fill, outline=outline, width=width)
    else:
        draw.polygon(shape_polygon(shape, box), fill=fill, outline=outline, width=width)


def _grain(rng: np.random.Generator, width: int, height: int, amplitude: int) -> Image.Image:
    """Grey per-pixel noise in [0, 2*amplitude], tiled from one 256 px block (per-pixel draws are too slow)."""
    tile = Image.fromarray(rng.integers(0, 2 * amplitude + 1, size=(256, 256), dtype=np.uint8), "L")
    noise = Image.new("L", (width, height))
    for y in range(0, height, 256):
        for x in range(0, width, 256):
            noise.paste(tile, (x, y))
    return noise.convert("RGB")


def add_grain(image: Image.Image, rng: np.random.Generator, amplitude: int) -> Image.Image:
    """``image`` plus zero-mean grain of +-``amplitude`` grey levels."""
    if amplitude <= 0:
        return image
    return ImageChops.add(image, _grain(rng, *image.size, amplitude), scale=1.0, offset=-amplitude)


def cloudy_background(rng: np.random.Generator, width: int, height: int, colours: list[RGB]) -> Image.Image:
    """A photo-like backdrop: a two-colour gradient plus low-frequency blotches, upsampled from a small field.

    The field is built at 1/32 scale and upsampled once, so a 4096 px backdrop costs a single resize.
    """
    gw, gh = max(2, width // 32 + 2), max(2, height // 32 + 2)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float64)
    t = (np.cos(angle) * xx / gw + np.sin(angle) * yy / gh)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    c0, c1 = np.array(colours[0], dtype=np.float64), np.array(colours[1], dtype=np.float64)
    field = c0 + t[..., None] * (c1 - c0)
    blotches = rng.normal(0.0, 15.0, size=(max(2, gh // 4), max(2, gw // 4), 3))
    blotch_img = Image.fromarray(np.clip(blotches + 128, 0, 255).astype(np.uint8), "RGB").resize((gw, gh),
                                                                                                Image.BILINEAR)
    field += np.asarray(blotch_img, dtype=np.float64) - 128.0
    small = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8), "RGB")
    return small.resize((width, height), Image.BILINEAR)


def draw_clutter(image: Image.Image, rng: random.Random, count: int, max_size: int) -> None:
    """Scatter ``count`` muted distractors: ellipses, boxes, polygons, lines and arcs, some translucent."""
    width, height = image.size
    draw = ImageDraw.Draw(image, "RGBA")
    for _ in range(count):
        size = int(min(max_size, 12 + rng.paretovariate(1.3) * 14))  # many small things, a few big ones
        x, y = rng.randrange(-size // 2, width), rng.randrange(-size // 2, height)
        w, h = size, max(4, int(size * rng.uniform(0.3, 1.7)))
        fill = (*muted_colour(rng), rng.choice((255, 255, 160, 90)))
        kind = rng.random()
        if kind < 0.3:
            draw.ellipse((x, y, x + w, y + h), fill=fill)
        elif kind < 0.5:
            draw.rectangle((x, y, x + w, y + h), fill=fill)
        elif kind < 0.65:
            pts = [(x + rng.randrange(w + 1), y + rng.randrange(h + 1)) for _ in range(rng.randint(3, 6))]
            draw.polygon(pts, fill=fill)
        elif kind < 0.9:
            end = (x + rng.randint(-4 * size, 4 * size), y + rng.randint(-4 * size, 4 * size))
            draw.line((x, y, *end), fill=fill, width=rng.randint(1, 6))
        else:
            draw.arc((x, y, x + w, y + h), rng.randrange(360), rng.randrange(360), fill=fill,
                     width=rng.randint(1, 5))
