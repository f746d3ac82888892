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

`to_source_box` maps every frame to pixels of the original image through the one mapping core of `tools.crop`
(`map_box`), which this module re-exports with the crop limits and the schema. Crops whose side is at most 30 px or
whose aspect ratio exceeds 100 are refused with a `ToolCallError`, whose message goes back to the model as the tool
turn, as the DeepEyes harness does; so is any call that is not four finite numbers (``1e999``, 400-digit integers,
strings), so one bad call never stops a run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .crop import (
    FRAMES,
    MAX_CROP_ASPECT,
    MIN_CROP_SIDE,
    ZOOM_TOOL,
    Frame,
    ToolCallError,
    crop_for_tool,
    map_box,
    zoom_tool_schema,
)
from .dialects import DeepEyesDialect

__all__ = ["FRAMES", "MAX_CROP_ASPECT", "MAX_TURNS", "MIN_CROP_SIDE", "ZOOM_TOOL", "Frame", "ToolCallError",
           "ZoomCall", "crop_for_tool", "format_zoom_call", "parse_zoom_call", "to_source_box", "zoom_tool_schema"]

MAX_TURNS = 5  # assistant turns per question, the DeepEyes default


@dataclass(frozen=True)
class ZoomCall:
    """One parsed call: ``bbox`` (x1, y1, x2, y2) in the policy's frame, and its optional ``label``."""

    bbox: tuple[float, float, float, float]
    label: str | None = None


def format_zoom_call(bbox: tuple[float, float, float, float], label: str | None = None) -> str:
    """The call text a policy emits for ``bbox`` (whole numbers are written without a decimal point)."""
    coords = [int(v) if float(v).is_integer() else round(float(v), 3) for v in bbox]
    arguments: dict = {"bbox_2d": coords}
    if label is not None:
        arguments["label"] = label
    return "<tool_call>\n" + json.dumps({"name": ZOOM_TOOL, "arguments": arguments}) + "\n</tool_call>"


def parse_zoom_call(text: str) -> ZoomCall | None:
    """The zoom call of a policy turn as DeepEyes' harness reads it (`dialects.DeepEyesDialect`: the last
    ``<tool_call>``), or None when the turn holds no call or an ``<answer>`` (which ends the episode).

    Raises:
        ToolCallError: a call that is not JSON, names another function, or lacks four finite numbers.
    """
    turn = DeepEyesDialect().parse(text)
    if turn.error is not None:
        raise ToolCallError(turn.error)
    return None if turn.call is None else ZoomCall(turn.call.bbox, turn.call.label)


def to_source_box(bbox: tuple[float, float, float, float], frame: Frame, view_size: tuple[int, int],
                  source_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Map a box in ``frame`` to whole pixels of the original image, clipped to it (`crop.map_box` as a tuple).

    Args:
        bbox: (x1, y1, x2, y2) as the policy wrote it.
        frame: "absolute" (pixels of the view of ``view_size``), "norm1000" or "norm1".
        view_size: (width, height) of the resized image the policy saw; used by "absolute" only.
        source_size: (width, height) of the original image.

    Raises:
        ToolCallError: ``x2 <= x1`` or ``y2 <= y1``, a box wholly outside the image, values that are not four finite
            numbers, or an unknown frame (a ValueError too).
    """
    return map_box(bbox, frame, view_size, source_size).as_tuple()
