"""ZoomWorld samples: splits, seeds, question mixes, and :func:`generate`, the one function from a seed to an image
with its question, answer and the box of everything drawn.

The same (variant, seed, options) give byte-identical images with the same Pillow and numpy versions.
"""

from __future__ import annotations

import dataclasses
import random
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from .questions import FAMILIES, Question, ask
from .render import FONT_CHARS, Box
from .scene import Scene, canvas_size, layout_doc, layout_hr, render

GENERATOR_VERSION = "1.0"
DEFAULT_ALPHABET = string.ascii_uppercase + string.digits
VARIANTS = ("hr", "doc")
# (start, stop) seed ranges; disjoint, so no split can ever reproduce another split's image.
SPLITS: dict[str, tuple[int, int]] = {
    "train": (0, 10**9),
    "val": (2 * 10**9, 2 * 10**9 + 10**7),
    "test": (3 * 10**9, 3 * 10**9 + 10**7),
}
SIZE_RANGE: dict[str, tuple[int, int]] = {"hr": (1024, 4096), "doc": (1024, 4096)}
# Bounds on width/height per variant; sampling stays inside them (see scene.canvas_size).
ASPECT_BOUNDS: dict[str, tuple[float, float]] = {"hr": (0.5, 2.0), "doc": (0.25, 2.0)}
# Fine 70% (read 50%, mcq 20%, relpos 15%, count 15% of it), coarse 30%; the same for both variants for now.
_MIX = {"read": 0.35, "mcq": 0.14, "relpos": 0.105, "count": 0.105, "color": 0.15, "shape": 0.15}
DEFAULT_MIX: dict[str, dict[str, float]] = {variant: dict(_MIX) for variant in VARIANTS}
_MAX_TRIES = 30


@dataclass
class ZoomWorldSample:
    """One ZoomWorld image with its question. Boxes are [x1, y1, x2, y2] in source pixels, x2/y2 exclusive.

    Attributes:
        image: RGB image.
        question: the question text (multiple-choice questions list their options in it).
        answer: the expected answer (an option letter for mcq).
        options: the four option texts for mcq, else None.
        family: read, mcq, relpos, count, color or shape.
        kind: "fine" (needs zoom) or "coarse".
        target_box: the box that answers the question: the tag (read/mcq), the union of both tags (relpos) or of
            the counted dots (count), the large object (color/shape).
        panels: coloured tags: box, colour, text, origin (top-left of the first glyph cell), size (glyph height).
        glyphs: every tag glyph: box (tight), char, panel (index into panels).
        objects: large objects: box, colour, shape.
        dots: small dots: box, colour.
        texts: distractor text (doc fields, grey decoy tags): box, text, origin, size; glyph boxes follow from
            ``render.layout_glyphs(origin, text, size)``.
        variant: "hr" or "doc".
        split: train/val/test when made by :func:`sample`, else None.
        seed: the generator seed.
        index: index within the split when made by :func:`sample`, else None.
        alphabet: characters the glyphs were drawn from.
    """

    image: Image.Image = field(repr=False)
    question: str
    answer: str
    options: list[str] | None
    family: str
    kind: str
    target_box: Box
    panels: list[dict]
    glyphs: list[dict]
    objects: list[dict]
    dots: list[dict]
    texts: list[dict]
    variant: str
    split: str | None
    seed: int
    index: int | None
    alphabet: str

    def to_json(self) -> dict[str, Any]:
        """Every field but the image, JSON-ready, plus width, height and the generator version."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "image"}
        out["target_box"] = list(self.target_box)
        out["width"], out["height"] = self.image.size
        out["version"] = GENERATOR_VERSION
        return out


def seed_for(split: str, index: int) -> int:
    """The generator seed of ``index`` within ``split``.

    Raises:
        ValueError: unknown split, or index outside the split's seed range.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    start, stop = SPLITS[split]
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < stop - start:
        raise ValueError(f"index {index!r} is outside the {split} split; use 0 <= index < {stop - start}")
    return start + index


def check_alphabet(alphabet: str) -> str:
    """``alphabet`` without repeats; raises ValueError if it has unsupported or fewer than 4 characters."""
    chars = "".join(dict.fromkeys(alphabet))
    bad = sorted(set(chars) - FONT_CHARS)
    if bad:
        raise ValueError(f"alphabet has characters the font cannot draw: {''.join(bad)!r}; use A-Z and 0-9")
    if len(chars) < 4:
        raise ValueError(f"alphabet {alphabet!r} needs at least 4 distinct characters (for 4-option questions)")
    return chars


def check_mix(mix: Mapping[str, float] | None, variant: str) -> dict[str, float]:
    """Family weights: ``mix`` (families left out get 0) or the variant's default; raises ValueError if bad."""
    if mix is None:
        return dict(DEFAULT_MIX[variant])
    unknown = sorted(set(mix) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown question families {unknown}; choose from {', '.join(FAMILIES)}")
    weights = {f: float(mix.get(f, 0.0)) for f in FAMILIES}
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"mix weights must be >= 0 with a positive sum, got {dict(mix)}")
    return weights


def check_size_range(size_range: tuple[int, int] | None, variant: str) -> tuple[int, int]:
    if size_range is None:
        return SIZE_RANGE[variant]
    lo, hi = (int(v) for v in size_range)
    if not 256 <= lo <= hi <= 8192:
        raise ValueError(f"size_range must satisfy 256 <= min <= max <= 8192, got {tuple(size_range)}")
    return lo, hi


def _canvas(rng: random.Random, variant: str, size_range: tuple[int, int]) -> tuple[int, int]:
    if variant == "hr":
        return canvas_size(rng, size_range, ASPECT_BOUNDS["hr"])
    receipt = rng.random() < 0.2  # mostly portrait pages, sometimes a narrow receipt
    return canvas_size(rng, size_range, (0.3, 0.5) if receipt else (0.55, 1.0))


def _layout(rng: random.Random, variant: str, family: str, alphabet: str,
            size_range: tuple[int, int]) -> tuple[Scene, Question]:
    """Lay scenes out until one supports a ``family`` question; the retries consume the same seeded stream."""
    build = layout_hr if variant == "hr" else layout_doc
    for _ in range(_MAX_TRIES):
        width, height = _canvas(rng, variant, size_range)
        scene = build(rng, width, height, alphabet, want_dots=family == "count")
        question = ask(family, rng, scene, alphabet) if scene is not None else None
        if question is not None:
            return scene, question
    raise RuntimeError(f"no {variant} scene with a {family} question fits in size_range {size_range}; widen it")


def generate(variant: str, seed: int, *, alphabet: str = DEFAULT_ALPHABET, mix: Mapping[str, float] | None = None,
             size_range: tuple[int, int] | None = None) -> ZoomWorldSample:
    """Generate one sample; a pure function of its arguments.

    Args:
        variant: "hr" (photo-like clutter) or "doc" (page-like layouts).
        seed: any non-negative integer; :func:`seed_for` maps split indices to seeds.
        alphabet: characters for tag and text glyphs (A-Z, 0-9; at least 4), e.g. digits only for early training.
        mix: weight per question family (read, mcq, relpos, count, color, shape); default :data:`DEFAULT_MIX`.
        size_range: (min, max) pixels per image side; default (1024, 4096). Smaller canvases keep tags 32-96 px.

    Returns:
        The sample, with split and index None.

    Raises:
        ValueError: a bad argument.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    alphabet = check_alphabet(alphabet)
    weights = check_mix(mix, variant)
    size_range = check_size_range(size_range, variant)
    # A local generator (nothing global is read or changed). String seeds are hashed with SHA-512, which is stable
    # across Python versions and platforms, and putting the variant in decorrelates hr and doc at the same seed.
    rng = random.Random(f"zoomworld/{variant}/{seed}")
    family = rng.choices(FAMILIES, weights=[weights[f] for f in FAMILIES])[0]
    scene, q = _layout(rng, variant, family, alphabet, size_range)
    return ZoomWorldSample(
        image=render(scene), question=q.question, answer=q.answer, options=q.options, family=q.family,
        kind=q.kind, target_box=q.target_box, panels=scene.panels, glyphs=scene.glyphs, objects=scene.objects,
        dots=scene.dots, texts=scene.texts, variant=variant, split=None, seed=seed, index=None, alphabet=alphabet,
    )


def sample(variant: str, split: str, index: int, **kw: Any) -> ZoomWorldSample:
    """Sample ``index`` of ``split``: :func:`generate` at :func:`seed_for` (split, index); ``kw`` as there."""
    out = generate(variant, seed_for(split, index), **kw)
    return dataclasses.replace(out, split=split, index=index)
