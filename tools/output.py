"""What every tool returns, whatever framework carries it: one text line, an optional image, and an artifact.

A tool is defined once and returns a `ToolOutput`; the LangChain, TRL and MCP adapters only change its wrapping.
A refused call is a `ToolOutput` with ``is_error`` set and a one-line ``text`` the policy reads: tools never raise
on bad arguments, so one bad call cannot stop a reasoning loop or a whole comparison run.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Any

from PIL import Image


def png_base64(image: Image.Image) -> str:
    """``image`` as base64-encoded PNG bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass(frozen=True)
class ToolOutput:
    """One tool result.

    Attributes:
        text: one line for the policy (the box and gate score of a zoom, or why the call was refused).
        image: the crop to show the policy, or None (errors, text-only tools).
        artifact: JSON-safe details for the caller, not shown to the policy (box, gate score, source of the box).
        is_error: True when the call was refused; ``text`` then says why.
    """

    text: str
    image: Image.Image | None = None
    artifact: dict[str, Any] = field(default_factory=dict)
    is_error: bool = False

    @classmethod
    def error(cls, message: str, **artifact: Any) -> ToolOutput:
        """A refused call: ``message`` (one line) goes back to the policy."""
        return cls(text=" ".join(str(message).split()), artifact=artifact, is_error=True)

    def content_blocks(self) -> list[dict[str, Any]]:
        """LangChain's standard content blocks: the image first (base64 PNG), then the text."""
        blocks: list[dict[str, Any]] = []
        if self.image is not None:
            blocks.append({"type": "image", "base64": png_base64(self.image), "mime_type": "image/png"})
        blocks.append({"type": "text", "text": self.text})
        return blocks

    def chat_content(self) -> list[dict[str, Any]]:
        """Hugging Face chat-template content (``{"type": "image", "image": PIL}`` then the text), as TRL's tool
        loop and this project's chat sessions take it."""
        parts: list[dict[str, Any]] = []
        if self.image is not None:
            parts.append({"type": "image", "image": self.image})
        parts.append({"type": "text", "text": self.text})
        return parts
