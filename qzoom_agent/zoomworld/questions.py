"""ZoomWorld question families: one question per scene, answered and grounded from the scene's records.

Fine families (read, mcq, relpos, count) ask about small things and need zoom; coarse ones (color, shape) ask
about a large object and can be answered from a low-resolution view.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from .render import Box
from .scene import Scene, random_text

FINE_FAMILIES = ("read", "mcq", "relpos", "count")
COARSE_FAMILIES = ("color", "shape")
FAMILIES = FINE_FAMILIES + COARSE_FAMILIES
OPTION_LETTERS = "ABCD"


@dataclass(frozen=True)
class Question:
    """A question about a scene, its answer, the multiple-choice options if any, and the box that answers it."""

    family: str
    question: str
    answer: str
    options: list[str] | None
    target_box: Box

    @property
    def kind(self) -> str:
        """Either "fine" or "coarse"."""
        return "fine" if self.family in FINE_FAMILIES else "coarse"


def union_box(boxes: list[list[int]]) -> Box:
    """Smallest box holding every box in ``boxes``."""
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def _ask_read(rng: random.Random, scene: Scene, alphabet: str) -> Question | None:
    panel = rng.choice(scene.panels)
    return Question("read", f"What is written on the {panel['colour']} tag?", panel["text"], None,
                    tuple(panel["box"]))


def _distractors(rng: random.Random, right: str, alphabet: str) -> list[str]:
    """Three wrong options as long as ``right``: half differ in one character (hard), the rest are random."""
    out: list[str] = []
    while len(out) < 3:
        if rng.random() < 0.5:
            pos = rng.randrange(len(right))
            cand = right[:pos] + rng.choice(alphabet) + right[pos + 1 :]
        else:
            cand = random_text(rng, alphabet, len(right))
        if cand != right and cand not in out:
            out.append(cand)
    return out


def _ask_mcq(rng: random.Random, scene: Scene, alphabet: str) -> Question | None:
    panel = rng.choice(scene.panels)
    options = [panel["text"], *_distractors(rng, panel["text"], alphabet)]
    rng.shuffle(options)
    lines = [f"What is written on the {panel['colour']} tag?"]
    lines += [f"({letter}) {option}" for letter, option in zip(OPTION_LETTERS, options, strict=True)]
    lines.append("Answer with the option's letter.")
    answer = OPTION_LETTERS[options.index(panel["text"])]
    return Question("mcq", "\n".join(lines), answer, options, tuple(panel["box"]))


def relation(a: list[int], b: list[int], axis: int) -> str | None:
    """Where box ``a`` lies relative to ``b`` along ``axis`` (0: left/right, 1: above/below).

    None unless the gap between them exceeds twice the larger extent of the two along that axis, so the answer
    never hinges on a few pixels.
    """
    extent = 2 * max(a[axis + 2] - a[axis], b[axis + 2] - b[axis])
    before, after = ("left", "right") if axis == 0 else ("above", "below")
    if b[axis] - a[axis + 2] > extent:
        return before
    if a[axis] - b[axis + 2] > extent:
        return after
    return None


def _ask_relpos(rng: random.Random, scene: Scene, alphabet: str) -> Question | None:
    pairs = [(i, j, axis) for i in range(len(scene.panels)) for j in range(len(scene.panels)) if i != j
             for axis in (0, 1) if relation(scene.panels[i]["box"], scene.panels[j]["box"], axis)]
    if not pairs:
        return None
    axis = rng.choice(sorted({p[2] for p in pairs}))  # axis first: tall or wide images would favour one otherwise
    i, j, _ = rng.choice([p for p in pairs if p[2] == axis])
    a, b = scene.panels[i], scene.panels[j]
    if axis == 0:
        text = f"Is the {a['colour']} tag to the left or to the right of the {b['colour']} tag?"
    else:
        text = f"Is the {a['colour']} tag above or below the {b['colour']} tag?"
    answer = relation(a["box"], b["box"], axis)
    return Question("relpos", text, str(answer), None, union_box([a["box"], b["box"]]))


def _ask_count(rng: random.Random, scene: Scene, alphabet: str) -> Question | None:
    colours = sorted({dot["colour"] for dot in scene.dots})
    if not colours:
        return None
    colour = rng.choice(colours)
    boxes = [dot["box"] for dot in scene.dots if dot["colour"] == colour]
    return Question("count", f"How many {colour} dots are there?", str(len(boxes)), None, union_box(boxes))


def _ask_color(rng: random.Random, scene: Scene, alphabet: str) -> Question | None:
    obj = rng.choice(scene.objects)
    return Question("color", f"What color is the large {obj['shape']}?", obj["colour"], None, tuple(obj["box"]))


def _ask_shape(rng: random.Random, scene: Scene, alphabet: str) -> Question | None:
    obj = rng.choice(scene.objects)
    return Question("shape", f"What shape is the large {obj['colour']} object?", obj["shape"], None,
                    tuple(obj["box"]))


_ASK: dict[str, Callable[[random.Random, Scene, str], Question | None]] = {
    "read": _ask_read,
    "mcq": _ask_mcq,
    "relpos": _ask_relpos,
    "count": _ask_count,
    "color": _ask_color,
    "shape": _ask_shape,
}


def ask(family: str, rng: random.Random, scene: Scene, alphabet: str) -> Question | None:
    """A question of ``family`` about ``scene``, or None when the scene cannot support one (e.g. no tag pair far
    enough apart for relpos)."""
    return _ASK[family](rng, scene, alphabet)
