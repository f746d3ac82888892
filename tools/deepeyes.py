"""The external-crop zoom tool in the DeepEyes format: its schema, the call text, parsing, frames and the crop.

A DeepEyes-style policy answers a question about an image either directly or by calling one function,

    <tool_call>
    {"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [x1, y1, x2, y2]}}
    </tool_call>

after which the harness crops the original image and returns the crop as a ``<tool_response>`` image turn. The
box comes in the model's own coordinate frame, the most common source of silent bugs in these agents:

* ``absolute``: pixels of the *resized* input the model saw (Qwen2.5-VL);
* ``norm1000``: 0-1000 over the image (Qwen2-VL, Qwen3-VL);
* ``norm1``: 0-1 over the image (Mini-o3, Pixel Reasoner, Zoom-Refine).

`to_source_box` maps every frame to pixels of the original image. Crops whose side is at most 30 px or whose
aspect ratio exceeds 100 are refused with a `ToolCallError`, whose message goes back to the model as the tool
turn, as the DeepEyes harness does.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Literal

from PIL import Image

from ..images import resize_to

ZOOM_TOOL = "image_zoom_in_tool"
MIN_CROP_SIDE = 30  # px of the original image; a side at most this long is refused
MAX_CROP_ASPECT = 100.0
MAX_TURNS = 5  # assistant turns per question, the DeepEyes default
Frame = Literal["absolute", "norm1000", "norm1"]
FRAMES: tuple[str, ...] = ("absolute", "norm1000", "norm1")
_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


class ToolCallError(ValueError):
    """A tool call that cannot be carried out; its message is what the policy is told."""


@dataclass(frozen=True)
class ZoomCall:
    """One parsed call: ``bbox`` (x1, y1, x2, y2) in the policy's frame, and its optional ``label``."""

    bbox: tuple[float, float, float, float]
    label: str | None = None


def zoom_tool_schema() -> dict:
    """The function schema to pass as ``tools=[...]`` to a chat template that lists tools."""
    return {
        "type": "function",
        "function": {
            "name": ZOOM_TOOL,
            "description": "Zoom in on a region of the image: crop it from the original and look at it closely.",
            "parameters": {
                "type": "object",
                "properties": {
                    "bbox_2d": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4,
                                "description": "the region as [x1, y1, x2, y2]"},
                    "label": {"type": "string", "description": "what is in the region"},
                },
                "required": ["bbox_2d"],
            },
        },
    }


def format_zoom_call(bbox: tuple[float, float, float, float], label: str | None = None) -> str:
    """The call text a policy emits for ``bbox`` (whole numbers are written without a decimal point)."""
    coords = [int(v) if float(v).is_integer() else round(float(v), 3) for v in bbox]
    arguments: dict = {"bbox_2d": coords}
    if label is not None:
        arguments["label"] = label
    return "<tool_call>\n" + json.dumps({"name": ZOOM_TOOL, "arguments": arguments}) + "\n</tool_call>"


def parse_zoom_call(text: str) -> ZoomCall | None:
    """The first zoom call in ``text``, or None when it holds no ``<tool_call>`` (a direct answer).

    Raises:
        ToolCallError: a call that is not JSON, names another function, or lacks four finite numbers.
    """
    match = _CALL.search(text)
    if match is None:
        return None
    try:
        call = json.loads(match.group(1).strip())
    except json.JSONDecodeError as err:
        raise ToolCallError(f"the tool call is not valid JSON: {err.msg}") from err
    if not isinstance(call, dict) or call.get("name") != ZOOM_TOOL:
        name = call.get("name") if isinstance(call, dict) else None
        raise ToolCallError(f"unknown tool {name!r}; the only tool is {ZOOM_TOOL}")
    args = call.get("arguments")
    bbox = args.get("bbox_2d") if isinstance(args, dict) else None
    if (not isinstance(bbox, list) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)):
        raise ToolCallError(f"bbox_2d must be four numbers [x1, y1, x2, y2], got {bbox!r}")
    label = args.get("label")
    return ZoomCall(tuple(float(v) for v in bbox), label if isinstance(label, str) else None)


def to_source_box(bbox: tuple[float, float, float, float], frame: Frame, view_size: tuple[int, int],
                  source_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Map a box in ``frame`` to whole pixels of the original image, clipped to it.

    Args:
        bbox: (x1, y1, x2, y2) as the policy wrote it.
        frame: "absolute" (pixels of the view of ``view_size``), "norm1000" or "norm1".
        view_size: (width, height) of the resized image the policy saw; used by "absolute" only.
        source_size: (width, height) of the original image.

    Raises:
        ToolCallError: ``x2 <= x1`` or ``y2 <= y1``, or a box wholly outside the image.
        ValueError: an unknown frame.
    """
    if frame == "absolute":
        sx, sy = source_size[0] / view_size[0], source_size[1] / view_size[1]
    elif frame == "norm1000":
        sx, sy = source_size[0] / 1000, source_size[1] / 1000
    elif frame == "norm1":
        sx, sy = float(source_size[0]), float(source_size[1])
    else:
        raise ValueError(f"frame must be one of {FRAMES}, got {frame!r}")
    x1, y1, x2, y2 = bbox
    if x2 <= x1 or y2 <= y1:
        raise ToolCallError(f"bbox_2d needs x1 < x2 and y1 < y2, got {list(bbox)}")
    box = (max(0, math.floor(x1 * sx)), max(0, math.floor(y1 * sy)),
           min(source_size[0], math.ceil(x2 * sx)), min(source_size[1], math.ceil(y2 * sy)))
    if box[2] <= box[0] or box[3] <= box[1]:
        raise ToolCallError(f"bbox_2d {list(bbox)} lies outside the image")
    return box


def crop_for_tool(image: Image.Image, box: tuple[int, int, int, int], *, zoom: float = 1.0,
                  max_pixels: int | None = None) -> Image.Image:
    """Cut ``box`` (original pixels) from ``image``, enlarged ``zoom`` times but to at most ``max_pixels``.

    Raises:
        ToolCallError: a side of at most `MIN_CROP_SIDE` px, or an aspect ratio above `MAX_CROP_ASPECT`.
    """
    w, h = box[2] - box[0], box[3] - box[1]
    if min(w, h) <= MIN_CROP_SIDE:
        raise ToolCallError(f"the region is {w}x{h} px; each side must exceed {MIN_CROP_SIDE} px")
    if max(w, h) / min(w, h) > MAX_CROP_ASPECT:
        raise ToolCallError(f"the region's aspect ratio {max(w, h) / min(w, h):.0f} exceeds {MAX_CROP_ASPECT:.0f}")
    crop = image.crop(box)
    if max_pixels is not None:  # no point enlarging past what the encoder will keep
        zoom = min(zoom, math.sqrt(max_pixels / (w * h)))
    if abs(zoom - 1.0) < 1e-6:
        return crop
    return resize_to(crop, (max(1, round(w * zoom)), max(1, round(h * zoom))))
