"""The zoom tools as LangChain tools: one line to make, usable in a LangGraph ``ToolNode`` or ``create_agent``.

The image never goes through the tool's schema: the policy only writes the arguments (``hint`` for the internal
zoom; ``bbox_2d`` for the external crop), and the tool finds the conversation's image and cached perception from
the graph state, injected with LangGraph's ``InjectedState``. The result is LangChain's ``content_and_artifact``:
image and text blocks the policy reads, and the box, gate score and box source as the artifact.

    chat = ChatQZoom.from_pretrained("zoomworld-tiny-tool")
    tools = [zoom_tool(chat.session_for)]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

from langchain_core.tools import BaseTool, StructuredTool
from langgraph.prebuilt import InjectedState
from pydantic import BaseModel, Field

from ..tools.crop import ZOOM_TOOL, ImageZoomInTool
from ..tools.output import ToolOutput
from ..tools.zoom import ZOOM_TOOL_NAME, session_zoom
from .messages import to_chat

if TYPE_CHECKING:
    from ..chat import ChatSession

SessionFor = Callable[[list], "ChatSession"]  # messages -> the conversation's chat session (ChatQZoom.session_for)


class ZoomArgs(BaseModel):
    """What the policy writes to call ``zoom``: at most a hint."""

    hint: str | None = Field(None, description="what to look for, e.g. 'the green tag'; leave it out to look "
                                               "where the question points")
    state: Annotated[dict, InjectedState] = Field(default=None, description="the graph state (injected)")


class CropArgs(BaseModel):
    """What the policy writes to call ``image_zoom_in_tool``: a box, and optionally a label and an image index."""

    bbox_2d: list[Any] = Field(description="the region [x1, y1, x2, y2] in the policy's box frame")
    label: str | None = Field(None, description="what is in the region")
    img_idx: int | None = Field(None, description="which image to crop: 0 is the original, 1.. the earlier crops")
    state: Annotated[dict, InjectedState] = Field(default=None, description="the graph state (injected)")


def _result(out: ToolOutput) -> tuple[list[dict], dict]:
    return out.content_blocks(), {**out.artifact, "is_error": out.is_error}


def _messages(state: dict | None) -> list | None:
    if not state:
        return None
    return state.get("messages") if isinstance(state, dict) else getattr(state, "messages", None)


def zoom_tool(session_for: SessionFor) -> BaseTool:
    """The internal zero-cost zoom as a LangChain tool.

    Args:
        session_for: finds a conversation's `ChatSession` from its messages (``ChatQZoom.session_for``).
    """

    def zoom(hint: str | None = None, state: dict | None = None) -> tuple[list[dict], dict]:
        messages = _messages(state)
        if not messages:
            return _result(ToolOutput.error("zoom runs inside an agent graph: the conversation's state was not "
                                             "injected"))
        session = session_for(messages)
        return _result(session_zoom(session, hint, messages=to_chat(messages)))

    return StructuredTool.from_function(
        zoom, name=ZOOM_TOOL_NAME, args_schema=ZoomArgs, response_format="content_and_artifact",
        description="Zoom in where the question points (or on the hint) and look at that region closely. The region "
                    "comes from the model's own reading of the image; you write no coordinates.")


def crop_tool(session_for: SessionFor, *, frame: str = "absolute", zoom: float = 3.0,
              max_pixels: int | None = 256 * 28 * 28) -> BaseTool:
    """The external crop (``image_zoom_in_tool``, DeepEyes' format) as a LangChain tool.

    The tool of a conversation keeps its crops, so ``img_idx`` can select an earlier one (Qwen3-VL's native
    form); boxes are in ``frame`` relative to the image they crop.
    """

    def image_zoom_in_tool(bbox_2d: list[Any], label: str | None = None, img_idx: int | None = None,
                           state: dict | None = None) -> tuple[list[dict], dict]:
        messages = _messages(state)
        if not messages:
            return _result(ToolOutput.error("image_zoom_in_tool runs inside an agent graph: the state was not "
                                            "injected"))
        session = session_for(messages)
        try:
            p = session.perception(to_chat(messages))
        except ValueError as err:
            return _result(ToolOutput.error(f"image_zoom_in_tool needs an image: {err}"))
        tool = getattr(session, "external_tool", None)
        if tool is None:
            tool = ImageZoomInTool([p.state.image], [p.resized_size], frame, zoom=zoom, max_pixels=max_pixels)
            session.external_tool = tool
        return _result(tool(bbox_2d, label, img_idx))

    return StructuredTool.from_function(
        image_zoom_in_tool, name=ZOOM_TOOL, args_schema=CropArgs, response_format="content_and_artifact",
        description="Zoom in on a region of the image: crop [x1, y1, x2, y2] from the original and look closely.")
