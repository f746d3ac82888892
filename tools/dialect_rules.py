"""The rules the external-crop dialects (`tools.dialects`) share: reading a call out of a policy's text, the exact
region a box points at, the limits checked on it, and the size a crop is handed back at.

Everything here either returns or raises `ToolCallError`, whose one-line message is what the policy is told. The
geometry is exact (fractions of the decimals the policy wrote): a limit such as "each side must exceed 30 px" is
checked on the region the policy pointed at, never on a region already rounded outward to whole pixels, so a 29.8 px
side is refused even though its outward-rounded crop may be 31 px wide.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from ..boxes import Box
from ..images import fit_to_token_budget
from .crop import XYXY, ToolCallError, ToolImage, check_bbox, short_repr

Exact = tuple[Fraction, Fraction, Fraction, Fraction]
_OBSERVATION = re.compile(r"observation_(\d{1,6})")


# ---- text ----

@dataclass(frozen=True)
class Block:
    """The inside of a tagged block and the text after it (empty when its closing tag was missing)."""

    inner: str
    after: str


def last_block(text: str, open_tag: str, close_tag: str) -> Block | None:
    """The last ``open_tag ... close_tag`` block of ``text``, or None when ``text`` has no ``open_tag``.

    A last block whose closing tag is missing runs to the end of the text: harnesses stop generation at the closing
    tag (the dialect's stop string), so the decoded text usually ends without it. Taking the last opening tag is
    Pixel-Reasoner's ``parse_last_tool`` (``split(tool_start)[-1].split(tool_end)[0]``) and DeepEyes v2's "last
    ``<tool_call>`` match" (visual_toolbox_v2.py L43-44, L66-67).
    """
    start = text.rfind(open_tag)
    if start < 0:
        return None
    start += len(open_tag)
    end = text.find(close_tag, start)
    if end < 0:
        return Block(text[start:], "")
    return Block(text[start:end], text[end + len(close_tag):])


def last_answer_tag(text: str) -> str | None:
    """The inside of the last complete ``<answer>...</answer>``, stripped; None when there is none or it is empty.

    DeepEyes v2 (visual_toolbox_v2.py L60-62) ends the episode on ``findall(r'<answer>(.*?)</answer>')[-1]`` only
    when that text is non-empty (``if answer:``), so ``<answer></answer>`` is no answer.
    """
    found = None
    pos = 0
    while (start := text.find("<answer>", pos)) >= 0:
        end = text.find("</answer>", start + 8)
        if end < 0:
            break
        found, pos = text[start + 8:end], end + 9
    return found.strip() if found else None


def last_boxed(text: str) -> str | None:
    """The inside of the last balanced ``\\boxed{...}`` (nested braces kept), or None.

    One left-to-right pass with a stack of open braces, so a text full of unbalanced braces costs linear time.
    """
    stack: list[tuple[int, bool]] = []
    best: tuple[int, int] | None = None
    for i, ch in enumerate(text):
        if ch == "{":
            stack.append((i, text.endswith("\\boxed", 0, i)))
        elif ch == "}" and stack:
            start, boxed = stack.pop()
            if boxed and (best is None or start > best[0]):
                best = (start, i)
    return None if best is None else text[best[0] + 1:best[1]]


def load_json(raw: str, what: str = "the tool call") -> Any:
    """``raw`` parsed as JSON.

    Raises:
        ToolCallError: empty, not JSON, an integer past Python's digit limit, or nesting too deep to parse.
    """
    raw = raw.strip()
    if not raw:
        raise ToolCallError(f"{what} is empty")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        raise ToolCallError(f"{what} is not valid JSON: {err.msg} (char {err.pos})") from err
    except (ValueError, RecursionError) as err:  # a 5000-digit integer; "[" * 100_000
        raise ToolCallError(f"{what} is not valid JSON: {type(err).__name__}") from err


def hermes_arguments(raw: str, tool: str) -> dict[str, Any]:
    """The ``arguments`` object of a Hermes call ``{"name": tool, "arguments": {...}}`` that has a ``bbox_2d``.

    Raises:
        ToolCallError: not JSON, not an object, another tool, arguments that are not an object (a JSON string
            included), or no ``bbox_2d``.
    """
    call = load_json(raw)
    if not isinstance(call, dict):
        raise ToolCallError(f'the call must be {{"name": "{tool}", "arguments": {{...}}}}, got {short_repr(call)}')
    if call.get("name") != tool:
        raise ToolCallError(f"unknown tool {short_repr(call.get('name'))}; the only tool is {tool}")
    args = call.get("arguments")
    if not isinstance(args, dict):
        raise ToolCallError(f"arguments must be a JSON object, got {short_repr(args)}")
    if "bbox_2d" not in args:
        raise ToolCallError("arguments need bbox_2d: [x1, y1, x2, y2]")
    return args


def index_arg(value: object, name: str, minimum: int) -> int:
    """An image index argument: an integer (not a bool, not 1.0) of at least ``minimum``.

    Raises:
        ToolCallError: anything else.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ToolCallError(f"{name} must be an integer >= {minimum}, got {short_repr(value)}")
    return value


def grounding(raw: str) -> tuple[XYXY, int]:
    """Mini-o3's ``{"bbox_2d": [x0, y0, x1, y1], "source": "original_image" | "observation_k"}``: the box and the
    source index (0 for the original, k for the k-th crop; ``observation_0`` is the original too).

    Raises:
        ToolCallError: not JSON, not such an object, or a source of another form.
    """
    obj = load_json(raw, "the grounding")
    if not isinstance(obj, dict) or "bbox_2d" not in obj:
        raise ToolCallError('the grounding must be {"bbox_2d": [x0, y0, x1, y1], "source": "original_image"}')
    source = obj.get("source")
    match = _OBSERVATION.fullmatch(source) if isinstance(source, str) else None
    if source != "original_image" and match is None:
        raise ToolCallError(f"source must be 'original_image' or 'observation_i', got {short_repr(source)}")
    return check_bbox(obj["bbox_2d"]), int(match.group(1)) if match else 0


def label_arg(value: object) -> str | None:
    """A label when it is a string; anything else is dropped (no reference harness reads the label)."""
    return value if isinstance(value, str) else None


def number(v: float) -> int | float:
    """How a coordinate is written in a call: whole numbers without a decimal point, others as their shortest repr."""
    f = float(v)
    return int(f) if f.is_integer() and abs(f) < 2**53 else f


# ---- geometry ----

def written_box(bbox: object) -> XYXY:
    """``bbox`` as four finite floats with x1 < x2 and y1 < y2, as written.

    Raises:
        ToolCallError: not four finite numbers, or inverted or empty.
    """
    x1, y1, x2, y2 = check_bbox(bbox)
    if x2 <= x1 or y2 <= y1:
        raise ToolCallError(f"bbox_2d needs x1 < x2 and y1 < y2 (not inverted or empty), got {short_repr(bbox)}")
    return x1, y1, x2, y2


def exact(v: float) -> Fraction:
    """The decimal a policy wrote, exactly: 0.4 is 2/5, not the binary float just above it."""
    return Fraction(repr(v))


def unit_box(bbox: XYXY, extent: tuple[int, int]) -> Exact:
    """``bbox`` (in a frame spanning ``extent``) clipped to the frame and divided by it: fractions in [0, 1].

    Raises:
        ToolCallError: nothing of the box is left inside the frame.
    """
    w, h = extent
    # Clip first, so no huge number ever becomes a Fraction.
    clip = [min(max(v, 0.0), float(e)) for v, e in zip(bbox, (w, h, w, h), strict=True)]
    x1, y1, x2, y2 = (exact(v) / e for v, e in zip(clip, (w, h, w, h), strict=True))
    if x2 <= x1 or y2 <= y1:
        raise ToolCallError(f"bbox_2d {short_repr(list(bbox))} lies outside the image, which spans [0, 0, {w}, {h}]")
    return x1, y1, x2, y2


def in_original(unit: Exact, parent: ToolImage) -> Exact:
    """Fractions of ``parent`` to exact pixels of its original, through the region ``parent`` shows."""
    b = parent.box
    return (b.x1 + unit[0] * b.width, b.y1 + unit[1] * b.height, b.x1 + unit[2] * b.width, b.y1 + unit[3] * b.height)


def outward(region: Exact, parent: ToolImage) -> Box:
    """The whole-pixel box covering ``region`` (rounded outward), inside ``parent``'s region of the original."""
    b = parent.box
    x1, y1 = max(b.x1, math.floor(region[0])), max(b.y1, math.floor(region[1]))
    x2, y2 = min(b.x2, math.ceil(region[2])), min(b.y2, math.ceil(region[3]))
    return Box(x1, y1, max(x2, x1 + 1), max(y2, y1 + 1))  # x2 > x1 already unless region was empty


def _float(v: Fraction) -> float:
    try:
        return float(v)
    except OverflowError:  # the ratio of a side of 1e-321 px: past any float
        return math.inf


def fmt(v: Fraction) -> str:
    return f"{_float(v):.1f}".removesuffix(".0")


def check_sides(w: Fraction, h: Fraction, minimum: int, *, strict: bool, unit: str) -> None:
    """Refuse a side at most ``minimum`` (``strict``) or below it.

    Raises:
        ToolCallError: a side too short.
    """
    if (min(w, h) <= minimum) if strict else (min(w, h) < minimum):
        need = f"exceed {minimum}" if strict else f"be at least {minimum}"
        raise ToolCallError(f"the region is {fmt(w)}x{fmt(h)} px {unit}; each side must {need} px")


def check_aspect(w: Fraction, h: Fraction, limit: int, *, inclusive: bool) -> None:
    """Refuse a longest/shortest side ratio above ``limit`` (``inclusive``: ``limit`` itself accepted) or at it.

    Raises:
        ToolCallError: a region too thin.
    """
    ratio = max(w, h) / min(w, h)
    if ratio > limit or (not inclusive and ratio == limit):
        most = f"at most {limit}" if inclusive else f"below {limit}"
        raise ToolCallError(f"the region's aspect ratio {_float(ratio):.4g} must be {most}")


def deepeyes_limits(region: Exact) -> None:
    """DeepEyes' validate_bbox (visual_toolbox_v2.py L129-165) on an exact region of the original: aspect ratio at
    most 100 (100 itself accepted), then each side over 30 px (30 refused, 31 accepted).

    Raises:
        ToolCallError: a region too thin or too small.
    """
    w, h = region[2] - region[0], region[3] - region[1]
    check_aspect(w, h, 100, inclusive=True)
    check_sides(w, h, 30, strict=True, unit="of the original")


def padded_unit_box(bbox: XYXY, view_size: tuple[int, int]) -> Exact:
    """Pixel-Reasoner's crop_image_normalized (experience_maker.py CropImageNormalized.call) as exact fractions of the
    target image: normalized when all four values are < 1, else pixels of the target as the harness holds it (its
    view, ``view_size``) divided by its size; 0.1 of padding on every side; clamped to [0, 1]; each side of the
    padded crop over 28 px of that image (checked on the exact region, theirs on PIL's rounded crop).

    Raises:
        ToolCallError: inverted corners (x1 > x2: refused as written, where theirs pads first and can let a slightly
            inverted box through; a point x1 == x2 is padded like theirs), or a side of at most 28 px.
    """
    if bbox[2] < bbox[0] or bbox[3] < bbox[1]:
        raise ToolCallError(f"bbox_2d needs x1 <= x2 and y1 <= y2 (not inverted), got {short_repr(list(bbox))}")
    vw, vh = view_size
    scale = (1, 1, 1, 1) if max(bbox) < 1 else (vw, vh, vw, vh)
    pad = Fraction(1, 10)

    def padded(v: float, s: int, d: Fraction) -> Fraction:
        f = v / s  # past [-1, 2] the padded value clamps to 0 or 1 anyway: no exact arithmetic on huge numbers
        n = Fraction(-1) if f <= -1 else Fraction(2) if f >= 2 else exact(v) / s
        return min(max(n + d, Fraction(0)), Fraction(1))

    x1, y1, x2, y2 = (padded(v, s, d) for v, s, d in zip(bbox, scale, (-pad, -pad, pad, pad), strict=True))
    check_sides((x2 - x1) * vw, (y2 - y1) * vh, 28, strict=True, unit="of the target image")
    return x1, y1, x2, y2


def image_at(images: Sequence[ToolImage], index: object, what: str, offset: int = 0) -> ToolImage:
    """``images[index]`` for an index a policy chose (``offset`` is added when naming it: 1-based dialects).

    Raises:
        ToolCallError: no images, or an index that is not an integer naming one of them.
    """
    if not images:
        raise ToolCallError("there is no image to zoom into")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(images):
        shown = index + offset if isinstance(index, int) and not isinstance(index, bool) else index
        raise ToolCallError(f"{what} {short_repr(shown)} does not exist; there are {len(images)} images")
    return images[index]


# ---- returned sizes ----

def smart_size(width: int, height: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen's ``smart_resize`` (sides multiples of ``factor``, pixels within the bounds) via
    `images.fit_to_token_budget`, which meets the bounds where ``smart_resize`` itself would raise."""
    per = factor * factor
    return fit_to_token_budget(width, height, factor=factor, min_tokens=max(1, -(-min_pixels // per)),
                               max_tokens=max(1, max_pixels // per))


def minio3_size(width: int, height: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Mini-o3's ``process_image`` sizes (vllm_rollout_spmd.py L302-331): scaled down into ``max_pixels`` or up to
    ``min_pixels`` with sides truncated by ``int()``, then a side under 28 px grown to 28, then an aspect ratio of
    200 or more cut to 190. Truncation can leave an upscaled crop a few pixels under ``min_pixels``, as there."""
    w, h = width, height
    if w * h > max_pixels:
        f = math.sqrt(max_pixels / (w * h))
        w, h = max(1, int(w * f)), max(1, int(h * f))
    if w * h < min_pixels:
        f = math.sqrt(min_pixels / (w * h))
        w, h = int(w * f), int(h * f)
    if w < 28 or h < 28:
        f = 28 / max(1, min(w, h))
        w, h = int(w * f + 1), int(h * f + 1)
    if w / h >= 200:
        h = int(w / 190 + 1)
    elif h / w >= 200:
        w = int(h / 190 + 1)
    return w, h
