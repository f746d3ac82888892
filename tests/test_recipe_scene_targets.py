"""Per-token probe targets of scene views (`scene_targets`), the widened probe and target concatenation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qzoom_agent.bench.oracle import zoom_crop, zoom_window
from qzoom_agent.recipes.zoomworld_tiny.dense_crops import (
    CHAR_CLASSES,
    COLOURS,
    IGNORE_INDEX,
    TOKEN_PX,
    DenseCropConfig,
    render_dense_crop,
)
from qzoom_agent.recipes.zoomworld_tiny.dense_probe import DenseProbe, DenseTargets, dense_losses, probe_counts
from qzoom_agent.recipes.zoomworld_tiny.scene_targets import MAX_TAG_CHARS, SHAPES, crop_targets, scene_targets
from qzoom_agent.zoomworld import generate

ALPHABET = "0123456789"


@pytest.fixture(scope="module")
def scene():
    # seed 49: a three-character target with 12 px glyphs, which get a token each when enlarged 3x
    return generate("hr", 49, alphabet=ALPHABET, mix={"read": 1.0}, size_range=(1024, 1400))


def _cell(box, window, grid):
    """Cell holding the centre of ``box`` (source px) in the view of ``window`` on ``grid``."""
    sx, sy = grid[1] * TOKEN_PX / (window[2] - window[0]), grid[0] * TOKEN_PX / (window[3] - window[1])
    cx, cy = ((box[0] + box[2]) / 2 - window[0]) * sx, ((box[1] + box[3]) / 2 - window[1]) * sy
    return math.floor(cy / TOKEN_PX), math.floor(cx / TOKEN_PX)


def test_whole_scene_marks_every_tag_and_object(scene):
    window, grid = (0, 0, *scene.image.size), (16, 20)
    t = scene_targets(scene, window, grid)
    assert all(a.shape == grid for a in (t.present, t.char, t.colour, t.shape, t.index))
    for panel in scene.panels:  # a tag smaller than a token still marks the token that holds its centre
        cell = _cell(panel["box"], window, grid)
        assert t.present[cell] == 1.0 and t.colour[cell] == COLOURS.index(panel["colour"])
    for obj in scene.objects:
        cell = _cell(obj["box"], window, grid)
        if t.present[cell] != 1.0:  # a tag on top of the object wins its cell
            assert t.shape[cell] == SHAPES.index(obj["shape"])
            if obj["colour"]:
                assert t.colour[cell] == COLOURS.index(obj["colour"])
    assert (t.present == 0).sum() > 0.5 * t.present.size  # most of a scene is background
    # at ~70 px per token the 10-48 px glyphs shrink below the readable size: no character is labelled
    assert (t.char == IGNORE_INDEX).all() and (t.index == IGNORE_INDEX).all()


def test_enlarged_window_labels_characters_in_order(scene):
    x1, y1, x2, y2 = scene.target_box
    window = (x1 - 20, y1 - 20, x1 - 20 + 28 * 4, y1 - 20 + 28 * 8 / 3)  # 3 view px per source px
    t = scene_targets(scene, window, (8, 12), min_glyph_px=1.0)
    target = next(i for i, p in enumerate(scene.panels) if list(p["box"]) == list(scene.target_box))
    glyphs = [g for g in scene.glyphs if g["panel"] == target]
    assert "".join(g["char"] for g in glyphs) == scene.answer
    cells = [_cell(g["box"], window, (8, 12)) for g in glyphs]
    assert len(glyphs) == 3 and len(set(cells)) == 3
    for pos, (g, cell) in enumerate(zip(glyphs, cells, strict=True)):
        if cells.count(cell) == 1:  # two glyph centres in one cell have no single right answer
            assert t.char[cell] == CHAR_CLASSES.index(g["char"])
            assert t.index[cell] == min(pos, MAX_TAG_CHARS - 1)
        else:
            assert t.char[cell] == IGNORE_INDEX
    tall = scene_targets(scene, window, (8, 12), min_glyph_px=1000.0)
    assert (tall.char == IGNORE_INDEX).all()  # glyphs below min_glyph_px are never labelled


def test_oracle_window_matches_zoom_crop(scene):
    margins = (0.5, 1.0, 1.5, 0.7)
    window = zoom_window(scene.image.size, tuple(scene.target_box), margins)
    crop = zoom_crop(scene.image, tuple(scene.target_box), margins, 3.0)
    assert crop.size == (round((window[2] - window[0]) * 3.0), round((window[3] - window[1]) * 3.0))
    grid = (crop.height // TOKEN_PX, crop.width // TOKEN_PX)
    t = scene_targets(scene, window, grid)
    assert (t.present == 1).any() and (t.char != IGNORE_INDEX).any()  # enlarged 3x, the tag's glyphs are readable


def test_bad_window_is_refused(scene):
    with pytest.raises(ValueError, match="non-empty window"):
        scene_targets(scene, (10, 10, 10, 50), (4, 4))


def test_crop_targets_add_character_positions():
    crop = render_dense_crop(3, 0.0, DenseCropConfig(alphabet=ALPHABET, max_side_tokens=6))
    t = crop_targets(crop)
    assert np.array_equal(t.char, crop.char) and (t.shape == IGNORE_INDEX).all()
    labelled = t.char != IGNORE_INDEX
    assert np.array_equal(labelled, t.index != IGNORE_INDEX)
    for tag in crop.tags:  # at progress 0 every glyph sits on its own token centre
        for pos, (_, (x1, y1, x2, y2)) in enumerate(tag.glyphs):
            assert t.index[math.floor((y1 + y2) / 2 / TOKEN_PX), math.floor((x1 + x2) / 2 / TOKEN_PX)] == pos


def test_wider_probe_loads_a_phase1_probe_and_trains_new_heads():
    narrow, wide = DenseProbe(16), DenseProbe(16, n_shapes=len(SHAPES), n_index=MAX_TAG_CHARS)
    wide.load_heads(narrow.state_dict())
    feats = torch.randn(5, 16)
    a, b = narrow(feats), wide(feats)
    for kind in ("present", "char", "colour"):
        assert torch.allclose(a[kind], b[kind])
    assert b["shape"].shape == (5, len(SHAPES)) and b["index"].shape == (5, MAX_TAG_CHARS)
    narrow.load_heads(wide.state_dict())  # heads it lacks are dropped
    assert torch.allclose(narrow(feats)["colour"], b["colour"])
    index_only = DenseProbe(16, n_index=MAX_TAG_CHARS)  # phase 1 with positions: index sits right after colour
    index_only.load_heads(wide.state_dict())
    assert torch.allclose(index_only(feats)["index"], b["index"])
    legacy = {k: v for k, v in narrow.state_dict().items() if k != "head_sizes"}  # written before head_sizes
    wide.load_heads(legacy)
    with pytest.raises(ValueError, match="cannot load"):
        wide.load_heads({k: v for k, v in wide.state_dict().items() if k != "head_sizes"})
    with pytest.raises(ValueError, match="classes"):
        DenseProbe(16, n_index=2).load_heads(wide.state_dict())
    ignore = torch.full((5,), IGNORE_INDEX)
    targets = DenseTargets(torch.zeros(5), ignore, ignore, torch.tensor([0, 1, IGNORE_INDEX, 2, 3]),
                           torch.tensor([0, IGNORE_INDEX, 2, 1, IGNORE_INDEX]))
    losses = dense_losses(b, targets, {"present": 1.0, "shape": 2.0, "index": 0.5})
    want_shape = torch.nn.functional.cross_entropy(b["shape"][[0, 1, 3, 4]], torch.tensor([0, 1, 2, 3]))
    want_index = torch.nn.functional.cross_entropy(b["index"][[0, 2, 3]], torch.tensor([0, 2, 1]))
    assert torch.allclose(losses["shape"], want_shape) and torch.allclose(losses["index"], want_index)
    assert torch.allclose(losses["total"], losses["present"] + 2.0 * want_shape + 0.5 * want_index)
    assert probe_counts(b, targets)["shape"][1] == 4


def test_targets_concatenate_with_unlabelled_kinds_ignored():
    full = DenseTargets(torch.ones(2), torch.tensor([1, 2]), torch.tensor([0, 0]), torch.tensor([3, 3]),
                        torch.tensor([0, 1]))
    bare = DenseTargets(torch.zeros(3), torch.full((3,), IGNORE_INDEX), torch.full((3,), IGNORE_INDEX))
    both = DenseTargets.cat([full, bare])
    assert both.shape.tolist() == [3, 3, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert both.index.tolist() == [0, 1, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert DenseTargets.cat([bare, bare]).shape is None
