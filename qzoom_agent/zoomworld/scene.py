"""ZoomWorld scene layout and rendering: where every object, tag, dot and text field goes, then the pixels.

Layout happens first and records every box, so questions can be chosen (and a scene rejected) before any pixel is
drawn. Rendering then draws from those records plus unrecorded clutter, with its own seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from .render import (
    PALETTE,
    RGB,
    Box,
    add_grain,
    advance,
    cloudy_background,
    draw_clutter,
    draw_shape,
    draw_text,
    layout_glyphs,
    muted_colour,
    text_colour,
    text_width,
)

HR_SHAPES = ("circle", "square", "triangle", "diamond", "hexagon", "star")
DOC_SHAPES = ("rectangle", "circle", "square", "triangle")
PANEL_SIDE = (32, 96)
DOT_SIDE = (8, 14)
_GAP = 12  # free pixels kept around tags, dots and objects so no two records touch


@dataclass
class Scene:
    """Recorded layout of one image; boxes are [x1, y1, x2, y2] in pixels, x2/y2 exclusive."""

    variant: str
    width: int
    height: int
    render_seed: int
    objects: list[dict] = field(default_factory=list)
    panels: list[dict] = field(default_factory=list)
    glyphs: list[dict] = field(default_factory=list)
    dots: list[dict] = field(default_factory=list)
    texts: list[dict] = field(default_factory=list)
    text_fills: list[RGB | None] = field(default_factory=list)  # render-only: background of each text field
    rules: list[int] = field(default_factory=list)  # render-only: y of horizontal rules on doc pages


class _Layout:
    """Boxes taken so far; new boxes are placed by rejection sampling against them."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.boxes: list[Box] = []

    def free(self, box: Box, gap: int) -> bool:
        return all(box[0] >= b[2] + gap or b[0] >= box[2] + gap or box[1] >= b[3] + gap or b[1] >= box[3] + gap
                   for b in self.boxes)

    def place(self, rng: random.Random, w: int, h: int, gap: int = _GAP, region: Box | None = None,
              tries: int = 150) -> Box | None:
        x1, y1, x2, y2 = region or (gap, gap, self.width - gap, self.height - gap)
        if x2 - x1 < w or y2 - y1 < h:
            return None
        for _ in range(tries):
            x, y = rng.randint(x1, x2 - w), rng.randint(y1, y2 - h)
            box = (x, y, x + w, y + h)
            if self.free(box, gap):
                self.boxes.append(box)
                return box
        return None


def canvas_size(rng: random.Random, size_range: tuple[int, int], aspect: tuple[float, float]) -> tuple[int, int]:
    """(width, height): long side uniform in ``size_range``, aspect w/h log-uniform in ``aspect``.

    The short side is clamped up to the range's minimum, which only moves the aspect towards 1, so it stays within
    ``aspect`` whenever that range contains 1 or the clamp does not trigger.
    """
    ratio = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
    long_side = rng.randint(*size_range)
    short_side = max(size_range[0], round(long_side * min(ratio, 1 / ratio)))
    return (long_side, short_side) if ratio >= 1 else (short_side, long_side)


def random_text(rng: random.Random, alphabet: str, n: int) -> str:
    """``n`` characters drawn from ``alphabet``."""
    return "".join(rng.choice(alphabet) for _ in range(n))


def _panel_shape(rng: random.Random, n_chars: int, height_cap: int) -> tuple[int, int, int, int]:
    """(width, height, glyph size, horizontal padding) of a tag: aspect 1-2, glyphs 30-50% of its height."""
    while True:
        h = rng.randint(PANEL_SIDE[0], height_cap)
        w_max = min(PANEL_SIDE[1], 2 * h)
        w = rng.randint(h, w_max)
        lo, hi = math.ceil(0.3 * h), math.floor(0.5 * h)
        size = min(max(round(rng.uniform(0.3, 0.5) * h), lo), hi)
        while size > lo and text_width("X" * n_chars, size) + 2 * max(3, round(0.3 * size)) > w:
            size -= 1  # shrink the glyphs before widening the tag
        pad = max(3, round(0.3 * size))
        w = max(w, text_width("X" * n_chars, size) + 2 * pad)
        if w <= w_max:
            return w, h, size, pad


def panel_height_cap(width: int, height: int) -> int:
    """Tallest tag allowed in a ``width`` x ``height`` image.

    sqrt(area)/32 px: in a 256-token view (a ~448 px square) a tag is then <= 14 px tall, half a 28 px token, so
    its colour shows but its glyphs (<= 7 px) cannot be read. Never below the 32 px floor nor above 96 px.
    """
    return max(PANEL_SIDE[0], min(PANEL_SIDE[1], int(math.sqrt(width * height) / 32)))


def add_panels(scene: Scene, layout: _Layout, rng: random.Random, alphabet: str, count: int) -> None:
    """Place up to ``count`` tags in distinct palette colours, each holding 1-3 glyphs, and record the glyphs."""
    height_cap = panel_height_cap(scene.width, scene.height)
    for colour in rng.sample(sorted(PALETTE), count):
        text = random_text(rng, alphabet, rng.randint(1, 3))
        w, h, size, pad = _panel_shape(rng, len(text), height_cap)
        box = layout.place(rng, w, h, gap=_GAP + 4)
        if box is None:
            continue
        slack_x = w - 2 * pad - text_width(text, size)
        slack_y = h - size
        jitter_y = rng.randint(-slack_y // 6, slack_y // 6)
        origin = (box[0] + pad + rng.randint(0, slack_x), box[1] + slack_y // 2 + jitter_y)
        index = len(scene.panels)
        scene.panels.append({"box": list(box), "colour": colour, "text": text, "origin": list(origin), "size": size})
        for char, gbox in layout_glyphs(origin, text, size):
            scene.glyphs.append({"box": list(gbox), "char": char, "panel": index})


def add_dot_group(scene: Scene, layout: _Layout, rng: random.Random, colours: list[str]) -> bool:
    """Scatter 1-5 small dots per colour in one cluster, well apart so they can be counted; False if no room."""
    counts = [rng.randint(1, 5) for _ in colours]
    d = rng.randint(*DOT_SIDE)
    total = sum(counts)
    for grow in (2.5, 3.5, 5.0):
        side = int(d * (grow * math.sqrt(total) + 2))
        region = layout.place(rng, side, side)
        if region is None:
            continue
        centres: list[tuple[int, int]] = []
        for _ in range(400):
            if len(centres) == total:
                break
            c = (rng.randint(region[0], region[2] - d), rng.randint(region[1], region[3] - d))
            if all(max(abs(c[0] - o[0]), abs(c[1] - o[1])) >= 2 * d for o in centres):
                centres.append(c)
        if len(centres) == total:
            order = [colour for colour, k in zip(colours, counts, strict=True) for _ in range(k)]
            for (x, y), colour in zip(centres, order, strict=True):
                scene.dots.append({"box": [x, y, x + d, y + d], "colour": colour})
            return True
        layout.boxes.remove(region)
    return False


def add_dots(scene: Scene, layout: _Layout, rng: random.Random, required: bool) -> bool:
    """Zero to two dot clusters (at least one when ``required``), each colour used by one cluster only."""
    groups = 1 if required else int(rng.random() < 0.5)
    groups += int(rng.random() < 0.3)
    pool = rng.sample(sorted(PALETTE), 4)
    placed = 0
    for g in range(groups):
        colours = pool[2 * g : 2 * g + rng.randint(1, 2)]  # a second colour makes counting colour-selective
        placed += add_dot_group(scene, layout, rng, colours)
    return placed > 0 or not required


def _add_objects(scene: Scene, layout: _Layout, rng: random.Random, shapes: list[str], frac: tuple[float, float],
                 minimum: int) -> bool:
    """Large palette-coloured shapes, distinct in shape and colour; False if fewer than ``minimum`` fit."""
    short = min(scene.width, scene.height)
    colours = rng.sample(sorted(PALETTE), len(shapes))
    for shape, colour in zip(shapes, colours, strict=True):
        side = round(rng.uniform(*frac) * short)
        box = None
        while box is None and side >= round(frac[0] * short):
            w, h = (side, side) if shape != "hexagon" else (side, round(side * 0.87))
            box = layout.place(rng, w, h, gap=_GAP * 2, tries=60)
            side = int(side * 0.85)
        if box is not None:
            scene.objects.append({"box": list(box), "colour": colour, "shape": shape})
    return len(scene.objects) >= minimum


def _add_banner(scene: Scene, layout: _Layout, rng: random.Random, margin: int) -> None:
    """A wide coloured header block near the top of a page (the doc variant's large rectangle)."""
    short = min(scene.width, scene.height)
    bw = round(rng.uniform(0.6, 0.95) * (scene.width - 2 * margin))
    bh = min(round(rng.uniform(0.12, 0.25) * short), bw // 3)
    region = (margin, margin, scene.width - margin, margin + bh + round(0.1 * scene.height))
    box = layout.place(rng, bw, bh, gap=_GAP, region=region)
    if box is not None:
        scene.objects.append({"box": list(box), "colour": "", "shape": "rectangle"})


def layout_hr(rng: random.Random, width: int, height: int, alphabet: str, want_dots: bool) -> Scene | None:
    """Photo-like scene: 2-5 large shapes, 3-8 tags, dot clusters, grey decoy tags; None if it did not fit."""
    scene = Scene("hr", width, height, render_seed=rng.getrandbits(64))
    layout = _Layout(width, height)
    if want_dots and not add_dots(scene, layout, rng, required=True):  # what the question needs goes in first
        return None
    shapes = rng.sample(HR_SHAPES, rng.randint(2, 5))
    if not _add_objects(scene, layout, rng, shapes, (0.15, 0.4), minimum=2):
        return None
    add_panels(scene, layout, rng, alphabet, rng.randint(3, 8))
    if not scene.panels:
        return None
    if not want_dots:
        add_dots(scene, layout, rng, required=False)
    for _ in range(rng.randint(2, 6)):
        _add_decoy(scene, layout, rng, alphabet)
    return scene


def _add_decoy(scene: Scene, layout: _Layout, rng: random.Random, alphabet: str) -> None:
    """A tag in a dull grey/beige: same look as a real tag but never a palette colour, so never asked about."""
    text = random_text(rng, alphabet, rng.randint(1, 3))
    w, h, size, pad = _panel_shape(rng, len(text), panel_height_cap(scene.width, scene.height))
    box = layout.place(rng, w, h, tries=40)
    if box is None:
        return
    fill = muted_colour(rng, max_saturation=0.12)
    origin = (box[0] + pad, box[1] + (h - size) // 2)
    scene.texts.append({"box": list(box), "text": text, "origin": list(origin), "size": size})
    scene.text_fills.append(fill)


def layout_doc(rng: random.Random, width: int, height: int, alphabet: str, want_dots: bool) -> Scene | None:
    """Page-like scene: banner and blocks, 3-6 coloured field tags, dot clusters, rows of grey text fields."""
    scene = Scene("doc", width, height, render_seed=rng.getrandbits(64))
    layout = _Layout(width, height)
    if want_dots and not add_dots(scene, layout, rng, required=True):
        return None
    margin = round(rng.uniform(0.04, 0.08) * width)
    shapes = rng.sample(DOC_SHAPES, rng.randint(1, 3))
    if "rectangle" in shapes:
        _add_banner(scene, layout, rng, margin)
    others = [s for s in shapes if s != "rectangle"]
    _add_objects(scene, layout, rng, others, (0.15, 0.3), minimum=0)
    if not scene.objects:
        return None
    for obj, colour in zip(scene.objects, rng.sample(sorted(PALETTE), len(scene.objects)), strict=True):
        obj["colour"] = colour  # recoloured together so the banner's colour is unique too
    add_panels(scene, layout, rng, alphabet, rng.randint(3, 6))
    if not scene.panels:
        return None
    if not want_dots:
        add_dots(scene, layout, rng, required=False)
    _add_text_rows(scene, layout, rng, alphabet, margin)
    return scene


def _add_text_rows(scene: Scene, layout: _Layout, rng: random.Random, alphabet: str, margin: int) -> None:
    """Fill the page with rows of text fields (grey boxes or plain dark text) wherever nothing else sits."""
    size = rng.randint(8, max(10, round(max(scene.width, scene.height) / 220)))
    pitch = round(size * rng.uniform(2.0, 2.8))
    boxed = rng.random() < 0.6
    fill = (rng.randint(214, 236),) * 3
    pad_x, pad_y = max(2, round(0.4 * size)), max(2, round(0.25 * (pitch - size)))
    y = margin
    while y + size + pad_y <= scene.height - margin:
        if rng.random() < 0.12:
            scene.rules.append(y + size // 2)  # a blank row, sometimes ruled
        else:
            _add_text_row(scene, layout, rng, alphabet, (margin, y, scene.width - margin), size,
                          (pad_x, pad_y), fill if boxed else None)
        y += pitch


def _add_text_row(scene: Scene, layout: _Layout, rng: random.Random, alphabet: str, row: tuple[int, int, int],
                  size: int, pad: tuple[int, int], fill: RGB | None) -> None:
    x, y, right = row
    adv = advance(size)
    x += rng.randint(0, 6) * adv
    while True:
        words = [random_text(rng, alphabet, rng.randint(1, 7)) for _ in range(rng.randint(1, 3))]
        text = " ".join(words)
        box = (x, y - pad[1], x + text_width(text, size) + 2 * pad[0], y + size + pad[1])
        if box[2] > right:
            return
        if layout.free(box, 4):
            scene.texts.append({"box": list(box), "text": text, "origin": [x + pad[0], y], "size": size})
            scene.text_fills.append(fill)
        x = box[2] + rng.randint(1, 8) * adv


def render(scene: Scene) -> Image.Image:
    """Draw ``scene``: backdrop and clutter, then text fields, large objects, tags and dots on top."""
    rng = random.Random(scene.render_seed)
    nrng = np.random.default_rng(scene.render_seed)
    if scene.variant == "hr":
        image = cloudy_background(nrng, scene.width, scene.height, [muted_colour(rng, 0.4), muted_colour(rng, 0.4)])
        image = add_grain(image, nrng, 14)
        clutter = max(30, min(400, scene.width * scene.height // 20000))
        draw_clutter(image, rng, clutter, max_size=min(scene.width, scene.height) // 6)
    else:
        paper = (rng.randint(244, 255), rng.randint(242, 253), rng.randint(236, 250))
        image = add_grain(Image.new("RGB", (scene.width, scene.height), paper), nrng, 3)
    draw = ImageDraw.Draw(image)
    for y in scene.rules:
        draw.line((0, y, scene.width, y), fill=(190, 190, 190), width=1)
    for text, fill in zip(scene.texts, scene.text_fills, strict=True):
        if fill is not None:
            x1, y1, x2, y2 = text["box"]
            draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
        ink = text_colour(fill) if fill is not None else (35, 35, 40)
        draw_text(image, tuple(text["origin"]), text["text"], text["size"], ink)
    for obj in scene.objects:
        rgb = PALETTE[obj["colour"]]
        edge = tuple(c // 2 for c in rgb)
        width = max(2, (obj["box"][2] - obj["box"][0]) // 80)
        draw_shape(draw, obj["shape"], tuple(obj["box"]), rgb, outline=edge, width=width)
    for panel in scene.panels:
        rgb = PALETTE[panel["colour"]]
        x1, y1, x2, y2 = panel["box"]
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=rgb, outline=tuple(c // 2 for c in rgb), width=1)
        draw_text(image, tuple(panel["origin"]), panel["text"], panel["size"], text_colour(rgb))
    for dot in scene.dots:
        x1, y1, x2, y2 = dot["box"]
        draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=PALETTE[dot["colour"]])
    return image
