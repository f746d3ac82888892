"""ZoomWorld: a deterministic generator of high-resolution images with questions, answers and ground-truth boxes.

Fine questions ask about small coloured tags (32-96 px) holding 1-3 glyphs, small dots or the relative position of
two tags: at a low-resolution view the tags show as colour blobs but their glyphs cannot be read, so they need
zoom. Coarse questions ask about large objects and do not. Every tag, glyph, dot, object and text field is recorded
with its box, which makes ZoomWorld both the offline benchmark and a densely labelled training world.

Usage::

    from qzoom_agent import zoomworld

    s = zoomworld.sample("hr", "test", 0)          # == zoomworld.generate("hr", zoomworld.seed_for("test", 0))
    s.image, s.question, s.answer, s.target_box
    zoomworld.export_folder("doc", "val", 500, "data/zw-doc")

Modules, bottom up: ``render`` (palette, bitmap font, shapes, textures), ``scene`` (placing tags, dots, objects
and text on a canvas), ``questions`` (asking one question of a scene), ``samples`` (seeds, splits and
:func:`generate`) and ``export`` (folders and datasets). The package sits below ``bench/`` and ``train/``, which
both use it, and imports neither.
"""

from .export import export_folder, to_dataset
from .questions import COARSE_FAMILIES, FAMILIES, FINE_FAMILIES
from .samples import (
    DEFAULT_ALPHABET,
    DEFAULT_MIX,
    GENERATOR_VERSION,
    SPLITS,
    VARIANTS,
    ZoomWorldSample,
    check_alphabet,
    check_mix,
    generate,
    sample,
    seed_for,
)

__all__ = [
    "COARSE_FAMILIES", "DEFAULT_ALPHABET", "DEFAULT_MIX", "FAMILIES", "FINE_FAMILIES", "GENERATOR_VERSION",
    "SPLITS", "VARIANTS", "ZoomWorldSample", "check_alphabet", "check_mix", "export_folder", "generate", "sample",
    "seed_for", "to_dataset",
]
