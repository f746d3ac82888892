"""Dense training crops for the vision warm-up: small cluttered images full of ZoomWorld tags, with per-token targets.

Each crop is 56-224 px per side in multiples of 28, so Qwen2.5-VL's merged-token grid (one token per 28x28 px) tiles
it exactly. It holds 1-14 coloured tags drawn exactly as in ZoomWorld scenes (palette fill, darker outline, 5x7
font in black or white), over a cloudy, grainy, cluttered backdrop. Targets live on the (h/28, w/28) token grid in
raster order (row-major), which is the order of ``model.model.visual(...)``'s merged output for one image (HF
undoes the window permutation with ``reverse_indices``; ``tests/test_train_warmup.py`` checks it on the model).

Glyph sizes: the font is a 5x7 bitmap whose cell edges are rounded onto the integer grid, so ZoomWorld itself
draws it at any integer height (uneven cell widths when the height is not a multiple of 7). Crops do the same:
the glyph height is an integer drawn uniformly from the curriculum's current range, so glyphs look as in scenes.

Curriculum (``progress`` in [0, 1], the fraction of the run done): at 0 glyphs are 24-30 px tall and every glyph's
centre sits on a token centre (glyphs one token apart). Between ``ramp_start`` and ``ramp_end`` the placement
jitter grows linearly to +-14 px (uniform over a token: free placement), the spacing relaxes to the font's own
advance, and the height range widens to 16-40 px.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ...zoomworld import DEFAULT_ALPHABET
from ...zoomworld.render import (
    PALETTE,
    Box,
    add_grain,
    advance,
    cloudy_background,
    draw_clutter,
    draw_text,
    layout_glyphs,
    muted_colour,
    text_colour,
)

TOKEN_PX = 28  # patch 14 x merge 2: pixels per merged visual token side
CHAR_CLASSES = DEFAULT_ALPHABET  # fixed head layout (A-Z0-9), so the sampled alphabet can grow without new classes
COLOURS = tuple(PALETTE)
IGNORE_INDEX = -100  # char/colour cells without a label (torch's cross-entropy default)
PRESENT_IGNORE = -1.0  # present cells with a small partial overlap
MAX_TAG_CHARS = 3  # tags hold 1-3 characters: the classes of the character-position head
# Seed ranges, [start, stop): training crops and held-out crops can never coincide.
SEED_RANGES: dict[str, tuple[int, int]] = {"train": (0, 10**9), "eval": (10**9, 2 * 10**9)}
EVAL_FREE_OFFSET = 10**8  # the free-placed eval set starts this far into the eval range; the aligned one at 0
_TAG_GAP = 4  # free pixels between two tags
_TRIES = 40  # placement attempts per tag


class DenseCropConfig(BaseModel):
    """How dense crops are drawn (the ``warmup.crops`` section of the training YAML)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alphabet: str = Field(DEFAULT_ALPHABET, description="characters sampled on tags; a subset of A-Z0-9")
    min_side_tokens: int = Field(2, ge=2, le=32, description="smallest crop side in 28 px tokens (56 px)")
    max_side_tokens: int = Field(8, ge=2, le=32, description="largest crop side in 28 px tokens (224 px)")
    max_tags: int = Field(14, ge=1, description="most tags asked for in a max-size crop; scaled down by area")
    ramp_start: float = Field(0.1, ge=0.0, le=1.0, description="progress at which jitter and size range start growing")
    ramp_end: float = Field(0.7, ge=0.0, le=1.0, description="progress at which they reach their final values")
    max_jitter: int = Field(14, ge=0, le=14, description="final placement jitter (+- px) around token centres")
    size_start: tuple[int, int] = Field((24, 30), description="glyph height range (px) at progress 0")
    size_end: tuple[int, int] = Field((16, 40), description="glyph height range (px) from ramp_end on")

    @field_validator("alphabet")
    @classmethod
    def _check_alphabet(cls, value: str) -> str:
        bad = sorted(set(value) - set(CHAR_CLASSES))
        if not value or bad or len(set(value)) != len(value):
            raise ValueError(f"alphabet must be distinct characters of {CHAR_CLASSES}, got {value!r}")
        return value

    @field_validator("size_start", "size_end")
    @classmethod
    def _check_sizes(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 7 <= value[0] <= value[1] <= 2 * TOKEN_PX:
            raise ValueError(f"glyph size range must satisfy 7 <= lo <= hi <= 56 px, got {value}")
        return value

    @model_validator(mode="after")
    def _check_order(self) -> DenseCropConfig:
        if self.min_side_tokens > self.max_side_tokens:
            raise ValueError("min_side_tokens must not exceed max_side_tokens")
        if self.ramp_start > self.ramp_end:
            raise ValueError("ramp_start must not exceed ramp_end")
        return self

    def ramp(self, progress: float) -> float:
        """Curriculum position in [0, 1]: 0 up to ``ramp_start``, linear, 1 from ``ramp_end`` on."""
        if progress <= self.ramp_start:
            return 0.0
        if progress >= self.ramp_end:
            return 1.0
        return (progress - self.ramp_start) / (self.ramp_end - self.ramp_start)

    def size_range(self, progress: float) -> tuple[int, int]:
        """Integer glyph-height range at ``progress``."""
        t = self.ramp(progress)
        return (round(self.size_start[0] + t * (self.size_end[0] - self.size_start[0])),
                round(self.size_start[1] + t * (self.size_end[1] - self.size_start[1])))


@dataclass
class Tag:
    """One drawn tag. Boxes are (x1, y1, x2, y2) in crop pixels, x2/y2 exclusive."""

    box: Box  # the panel, clipped to the crop
    colour: str
    text: str
    size: int
    glyphs: list[tuple[str, Box]]  # (char, tight ink box) per glyph
    origins: list[tuple[int, int]]  # top-left of each glyph's font cell, where it is stamped


@dataclass
class DenseCrop:
    """A rendered crop and its per-token targets, each of shape (h/28, w/28) in raster order.

    Attributes:
        image: RGB crop, both sides multiples of 28.
        present: float32; 1 where a tag covers more than half the cell, 0 where nothing of a tag touches it,
            -1 (ignore) for a small partial overlap.
        char: int64 index into ``CHAR_CLASSES`` of the one glyph whose tight-box centre lies in the cell, else -100
            (also -100 when two glyph centres share a cell: no single right answer).
        colour: int64 index into ``COLOURS`` of the tag covering more than half the cell, else -100.
        tags: the tags drawn, for tests and debugging.
    """

    image: Image.Image
    present: np.ndarray
    char: np.ndarray
    colour: np.ndarray
    tags: list[Tag]

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the merged-token grid."""
        return self.present.shape


def _overlaps(box: Box, taken: list[Box]) -> bool:
    return any(box[0] < b[2] + _TAG_GAP and b[0] < box[2] + _TAG_GAP and box[1] < b[3] + _TAG_GAP
               and b[1] < box[3] + _TAG_GAP for b in taken)


def _place_tag(rng: random.Random, size_wh: tuple[int, int], taken: list[Box], cfg: DenseCropConfig,
               progress: float) -> Tag | None:
    """Lay out one tag: glyph row anchored on a token centre plus jitter, panel around it; None if it does not fit.

    The glyphs always lie wholly inside the crop; the panel may run off its edge (clipped), as a tag does when a
    crop is cut from a scene. Without that, big aligned glyphs would rarely fit near the border of small crops.
    """
    width, height = size_wh
    t = cfg.ramp(progress)
    jitter = round(t * cfg.max_jitter)
    size = rng.randint(*cfg.size_range(progress))
    cell_w = round(5 * size / 7)  # the font's glyph cell width at this height
    # One token per glyph at t = 0 (every centre on a token centre), the font's own advance at t = 1.
    pitch = max(round(TOKEN_PX + t * (advance(size) - TOKEN_PX)), cell_w + 1)
    fits = 1 + max(0, (width - 2 - cell_w) // pitch)  # glyphs a row of this crop can hold
    text = "".join(rng.choice(cfg.alphabet) for _ in range(rng.randint(1, min(3, fits))))
    row_w = (len(text) - 1) * pitch + cell_w
    pad_x = max(3, round(0.3 * size)) + rng.randint(0, round(0.2 * size))
    pad_y = round(rng.uniform(0.15, 0.6) * size)
    for _ in range(_TRIES):
        cx = TOKEN_PX * rng.randrange(width // TOKEN_PX) + TOKEN_PX // 2 + rng.randint(-jitter, jitter)
        cy = TOKEN_PX * rng.randrange(height // TOKEN_PX) + TOKEN_PX // 2 + rng.randint(-jitter, jitter)
        ox, oy = cx - cell_w // 2, cy - size // 2  # first glyph cell's top-left
        if ox < 1 or oy < 1 or ox + row_w > width - 1 or oy + size > height - 1:
            continue
        box = (max(ox - pad_x, 0), max(oy - pad_y, 0), min(ox + row_w + pad_x, width), min(oy + size + pad_y, height))
        if _overlaps(box, taken):
            continue
        origins = [(ox + i * pitch, oy) for i in range(len(text))]
        glyphs = [layout_glyphs(o, ch, size)[0] for o, ch in zip(origins, text, strict=True)]
        return Tag(box, rng.choice(COLOURS), text, size, glyphs, origins)
    return None


def _draw_tags(image: Image.Image, tags: list[Tag]) -> None:
    """Draw tags as ZoomWorld's renderer does: palette fill, half-bright outline, contrasting glyphs."""
    draw = ImageDraw.Draw(image)
    for tag in tags:
        rgb = PALETTE[tag.colour]
        x1, y1, x2, y2 = tag.box
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=rgb, outline=tuple(c // 2 for c in rgb), width=1)
        for char, origin in zip(tag.text, tag.origins, strict=True):
            # one stamp per glyph: at the font's own advance this equals ZoomWorld's draw_text of the whole string
            draw_text(image, origin, char, tag.size, text_colour(rgb))


def cell_overlap(box: tuple[float, float, float, float], rows: int, cols: int) -> np.ndarray:
    """(rows, cols) fraction of each 28 px cell covered by ``box`` (pixels; fractional edges are fine)."""
    edges_r = np.arange(rows + 1) * TOKEN_PX
    edges_c = np.arange(cols + 1) * TOKEN_PX
    over_r = np.clip(np.minimum(edges_r[1:], box[3]) - np.maximum(edges_r[:-1], box[1]), 0, None)
    over_c = np.clip(np.minimum(edges_c[1:], box[2]) - np.maximum(edges_c[:-1], box[0]), 0, None)
    return np.outer(over_r, over_c) / TOKEN_PX**2


def centre_cell(box: tuple[float, float, float, float]) -> tuple[int, int]:
    """(row, col) of the 28 px cell holding the centre of ``box`` (pixels)."""
    return math.floor((box[1] + box[3]) / 2 / TOKEN_PX), math.floor((box[0] + box[2]) / 2 / TOKEN_PX)


def dense_targets(tags: list[Tag], rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-token ``(present, char, colour)`` targets of shape (rows, cols) for ``tags`` (see `DenseCrop`)."""
    cover = np.zeros((rows, cols))
    colour = np.full((rows, cols), IGNORE_INDEX, dtype=np.int64)
    char = np.full((rows, cols), IGNORE_INDEX, dtype=np.int64)
    centres = np.zeros((rows, cols), dtype=np.int64)
    for tag in tags:
        frac = cell_overlap(tag.box, rows, cols)
        cover += frac  # tags never overlap, so the sum is the covered fraction
        colour[frac > 0.5] = COLOURS.index(tag.colour)
        for ch, (x1, y1, x2, y2) in tag.glyphs:
            r, c = centre_cell((x1, y1, x2, y2))
            centres[r, c] += 1
            char[r, c] = CHAR_CLASSES.index(ch)
    char[centres > 1] = IGNORE_INDEX
    present = np.where(cover > 0.5, 1.0, np.where(cover > 0, PRESENT_IGNORE, 0.0)).astype(np.float32)
    return present, char, colour


def tag_positions(tags: list[Tag], rows: int, cols: int) -> np.ndarray:
    """(rows, cols) int64: each glyph's position in its tag's text (0 = first) on the cell holding its centre,
    -100 elsewhere and where two glyph centres share a cell (the cells ``dense_targets`` labels with a char)."""
    index, centres = np.full((rows, cols), IGNORE_INDEX, dtype=np.int64), np.zeros((rows, cols), dtype=np.int64)
    for tag in tags:
        for pos, (_, box) in enumerate(tag.glyphs):
            r, c = centre_cell(box)
            centres[r, c] += 1
            index[r, c] = pos
    index[centres > 1] = IGNORE_INDEX
    return index


def render_dense_crop(seed: int, progress: float = 1.0, cfg: DenseCropConfig | None = None) -> DenseCrop:
    """Render one dense crop; the same ``(seed, progress, cfg)`` give identical pixels and targets.

    Args:
        seed: any non-negative integer; pick it from `SEED_RANGES` so train and eval crops stay disjoint.
        progress: curriculum position, the fraction of the run done (0: aligned big glyphs, 1: free placement).
        cfg: drawing settings; defaults to `DenseCropConfig()`.

    Returns:
        The crop, sides multiples of 28 in [56, 224] px by default, with (h/28, w/28) targets.
    """
    cfg = cfg or DenseCropConfig()
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must lie in [0, 1], got {progress}")
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    rows = rng.randint(cfg.min_side_tokens, cfg.max_side_tokens)
    cols = min(max(rows + rng.choice((-1, 0, 0, 1)), cfg.min_side_tokens), cfg.max_side_tokens)  # square-ish
    width, height = cols * TOKEN_PX, rows * TOKEN_PX
    image = cloudy_background(nrng, width, height, [muted_colour(rng, 0.4), muted_colour(rng, 0.4)])
    image = add_grain(image, nrng, 14)
    draw_clutter(image, rng, rng.randint(1, 3 + rows * cols // 6), max_size=max(width, height) // 2)
    most = max(1, round(cfg.max_tags * rows * cols / cfg.max_side_tokens**2))
    wanted = rng.randint((most + 1) // 2, most)  # dense: each forward should carry many labelled glyphs
    tags: list[Tag] = []
    for _ in range(wanted):
        tag = _place_tag(rng, (width, height), [t.box for t in tags], cfg, progress)
        if tag is not None:
            tags.append(tag)
    _draw_tags(image, tags)
    present, char, colour = dense_targets(tags, rows, cols)
    return DenseCrop(image, present, char, colour, tags)


def crop_seed(split: str, index: int) -> int:
    """The seed of crop ``index`` of ``split`` ("train" or "eval"); raises if the split's range is exhausted."""
    start, stop = SEED_RANGES[split]
    if index < 0 or start + index >= stop:
        raise ValueError(f"crop index {index} is outside the {split} seed range {SEED_RANGES[split]}")
    return start + index


def eval_sets(cfg: DenseCropConfig, n: int) -> dict[str, list[DenseCrop]]:
    """The two held-out sets of ``n`` crops each, from the eval seed range.

    Returns:
        ``{"aligned": crops at progress 0 (big glyphs on token centres), "free": crops at progress 1 (16-40 px
        glyphs anywhere)}``; disjoint seeds inside the eval range, never a training seed.
    """
    if not 0 < n <= EVAL_FREE_OFFSET:
        raise ValueError(f"eval set size must lie in [1, {EVAL_FREE_OFFSET}], got {n}")
    return {
        "aligned": [render_dense_crop(crop_seed("eval", k), 0.0, cfg) for k in range(n)],
        "free": [render_dense_crop(crop_seed("eval", EVAL_FREE_OFFSET + k), 1.0, cfg) for k in range(n)],
    }
