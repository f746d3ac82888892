"""Per-token probe targets for any view of a ZoomWorld scene: a whole resized scene, a native tile or a zoomed crop.

Phase 1 supervises the vision tower on small dense crops only. The views the model answers from later (a
1024-4096 px scene squeezed into 256-1024 tokens, a native tile, an enlarged oracle crop) have their own look:
a 32-96 px tag shrinks to part of one token, a large object spans dozens. ZoomWorld records every panel, glyph and
object, so the same dense supervision can follow the model into those views. What is labelled, per merged token
(the cell of ``28 x 28`` view pixels it covers, in raster order):

* ``present``: 1 where a tag panel covers more than half the cell or the panel's centre lies in it (a tag smaller
  than a token still marks the one token that holds it), 0 where no panel touches it, -1 (ignore) otherwise.
* ``colour``: the tag's colour on its ``present`` cells; a large object's colour on cells whose centre lies in the
  middle of its box (objects drawn without a palette colour stay unlabelled). Tags win where both apply.
* ``shape``: the large object's shape on the same object cells.
* ``char`` and ``index``: the glyph whose tight box has its centre in the cell, and its position in the tag's text
  (0 = first character), when the glyph is at least ``min_glyph_px`` tall in the view (smaller glyphs are not
  readable, so no answer is right); cells holding two glyph centres stay unlabelled.

``index`` is what "read the tag left to right" needs: with it the token of the second character says so itself,
and the language model can fetch characters by content instead of by relative position.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ...zoomworld import ZoomWorldSample
from ...zoomworld.scene import DOC_SHAPES, HR_SHAPES
from .dense_crops import (
    CHAR_CLASSES,
    COLOURS,
    IGNORE_INDEX,
    MAX_TAG_CHARS,
    PRESENT_IGNORE,
    TOKEN_PX,
    DenseCrop,
    cell_overlap,
    centre_cell,
    tag_positions,
)
from .dense_probe import DenseTargets

SHAPES = tuple(dict.fromkeys(HR_SHAPES + DOC_SHAPES))  # fixed class order of the shape head
_OBJECT_CORE = 0.2  # object cells: centre inside the box shrunk by this fraction of its size on each side

Window = tuple[float, float, float, float]


@dataclass
class TokenTargets:
    """Per-token targets of one view, each of shape (rows, cols) in raster order (see the module docstring).

    Attributes:
        present: float32 in {1, 0, -1}.
        char: int64 index into ``CHAR_CLASSES`` or -100.
        colour: int64 index into ``COLOURS`` or -100.
        shape: int64 index into ``SHAPES`` or -100.
        index: int64 character position in its tag (0..2) or -100.
    """

    present: np.ndarray
    char: np.ndarray
    colour: np.ndarray
    shape: np.ndarray
    index: np.ndarray

    @property
    def grid(self) -> tuple[int, int]:
        return self.present.shape

    def to_torch(self) -> DenseTargets:
        """Flat (rows * cols,) tensors in raster order."""
        return DenseTargets(*(torch.from_numpy(np.ascontiguousarray(getattr(self, f)).ravel())
                              for f in ("present", "char", "colour", "shape", "index")))


def _ignore(rows: int, cols: int) -> np.ndarray:
    return np.full((rows, cols), IGNORE_INDEX, dtype=np.int64)


def crop_targets(crop: DenseCrop) -> TokenTargets:
    """A phase-1 dense crop's targets plus ``index`` (its tags' character positions); ``shape`` unlabelled."""
    rows, cols = crop.grid
    index = tag_positions(crop.tags, rows, cols)
    return TokenTargets(crop.present, crop.char, crop.colour, _ignore(rows, cols), index)


def _cell(box: tuple[float, float, float, float], rows: int, cols: int) -> tuple[int, int] | None:
    """The cell holding ``box``'s centre (view pixels), None when it lies outside the view."""
    r, c = centre_cell(box)
    return (r, c) if 0 <= r < rows and 0 <= c < cols else None


def view_mapper(window: Window, grid: tuple[int, int]) -> Callable[[Sequence[float]], Window]:
    """The map from source pixels to view pixels of ``window`` stretched onto a ``grid`` of 28 px merged tokens.

    Args:
        window: (x1, y1, x2, y2) of the source image the view shows.
        grid: (rows, cols) of merged visual tokens of the encoded view.

    Returns:
        ``box -> box``: an (x1, y1, x2, y2) source box in view pixels.

    Raises:
        ValueError: an empty window or grid.
    """
    rows, cols = grid
    wx1, wy1, wx2, wy2 = window
    if wx2 <= wx1 or wy2 <= wy1 or rows < 1 or cols < 1:
        raise ValueError(f"need a non-empty window and grid, got window {window} and grid {grid}")
    sx, sy = cols * TOKEN_PX / (wx2 - wx1), rows * TOKEN_PX / (wy2 - wy1)

    def view(box: Sequence[float]) -> Window:
        return (box[0] - wx1) * sx, (box[1] - wy1) * sy, (box[2] - wx1) * sx, (box[3] - wy1) * sy

    return view


def scene_targets(sample: ZoomWorldSample, window: Window, grid: tuple[int, int],
                  min_glyph_px: float = 10.0) -> TokenTargets:
    """Targets for the view of ``window`` (source pixels) of ``sample`` resized onto a ``grid`` of merged tokens.

    Args:
        sample: the scene, with its recorded panels, glyphs and objects.
        window: (x1, y1, x2, y2) of the source image the view shows; the view stretches it to ``grid`` * 28 px.
        grid: (rows, cols) of merged visual tokens of the encoded view.
        min_glyph_px: smallest glyph height (view pixels) that gets ``char`` and ``index`` labels.

    Returns:
        The view's targets (see the module docstring).
    """
    rows, cols = grid
    view = view_mapper(window, grid)
    colour, shape = _ignore(rows, cols), _ignore(rows, cols)
    centre_r, centre_c = (np.arange(rows) + 0.5) * TOKEN_PX, (np.arange(cols) + 0.5) * TOKEN_PX
    for obj in sample.objects:
        x1, y1, x2, y2 = view(obj["box"])
        mx, my = _OBJECT_CORE * (x2 - x1), _OBJECT_CORE * (y2 - y1)
        inside = np.outer((centre_r >= y1 + my) & (centre_r < y2 - my), (centre_c >= x1 + mx) & (centre_c < x2 - mx))
        shape[inside] = SHAPES.index(obj["shape"])
        if obj["colour"]:
            colour[inside] = COLOURS.index(obj["colour"])

    cover, tag_cells = np.zeros((rows, cols)), np.zeros((rows, cols), dtype=bool)
    for panel in sample.panels:
        box = view(panel["box"])
        frac = cell_overlap(box, rows, cols)
        cover += frac  # panels never overlap, so the sum is the covered fraction
        cells = frac > 0.5
        centre = _cell(box, rows, cols)
        if centre is not None:
            cells[centre] = True
        tag_cells |= cells
        colour[cells] = COLOURS.index(panel["colour"])
        shape[cells] = IGNORE_INDEX
    present = np.where(tag_cells | (cover > 0.5), 1.0, np.where(cover > 0, PRESENT_IGNORE, 0.0)).astype(np.float32)

    char, index, centres = _ignore(rows, cols), _ignore(rows, cols), np.zeros((rows, cols), dtype=np.int64)
    position: dict[int, int] = {}
    for glyph in sample.glyphs:
        pos = position.get(glyph["panel"], 0)
        position[glyph["panel"]] = pos + 1
        x1, y1, x2, y2 = view(glyph["box"])
        cell = _cell((x1, y1, x2, y2), rows, cols)
        if cell is None:
            continue
        centres[cell] += 1
        if y2 - y1 >= min_glyph_px:
            char[cell], index[cell] = CHAR_CLASSES.index(glyph["char"]), min(pos, MAX_TAG_CHARS - 1)
    char[centres > 1] = IGNORE_INDEX
    index[centres > 1] = IGNORE_INDEX
    return TokenTargets(present, char, colour, shape, index)
