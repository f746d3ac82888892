"""LangChain messages to chat-template messages and back: image blocks in, ``<tool_call>`` text out.

Images arrive as LangChain's standard blocks (``{"type": "image", "base64": ..., "mime_type": ...}``, ``"url"`` or
``"path"``), as OpenAI-style ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``, or as a
PIL image under ``"image"``; tool turns may carry images too. A policy's text is split into its prose and its
``<tool_call>{json}</tool_call>`` blocks; a block that does not parse becomes an ``invalid_tool_call`` with the
reason, as LangChain expects, so a malformed call never raises.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage

_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


def _image_part(block: dict) -> dict | None:
    """A chat-template image part for a LangChain or OpenAI image block, or None for other blocks."""
    kind = block.get("type")
    if kind == "image_url":
        url = block.get("image_url")
        return {"type": "image", "image": url.get("url") if isinstance(url, dict) else url}
    if kind == "image" or (kind is None and "image" in block):
        if "image" in block:
            return {"type": "image", "image": block["image"]}
        if block.get("base64"):
            return {"type": "image", "image": f"data:{block.get('mime_type') or 'image/png'};base64,{block['base64']}"}
        for key in ("url", "path"):
            if block.get(key):
                return {"type": "image", "image": block[key]}
        raise ValueError("an image block carries no image (no base64, url or path)")
    return None


def _content(content: Any) -> str | list[dict]:
    """Message content as a string or chat-template parts (images, then text in order)."""
    if isinstance(content, str):
        return content
    parts: list[dict] = []
    for block in content or []:
        if isinstance(block, str):
            parts.append({"type": "text", "text": block})
            continue
        image = _image_part(block)
        if image is not None:
            parts.append(image)
        elif block.get("type") == "text":
            parts.append({"type": "text", "text": block.get("text", "")})
    return parts


def text_of(content: Any) -> str:
    """The text of LangChain message content (blocks joined)."""
    if isinstance(content, str):
        return content
    return "".join(b if isinstance(b, str) else b.get("text", "") for b in content or []
                   if isinstance(b, str) or b.get("type") == "text")


def to_chat(messages: list[BaseMessage]) -> list[dict]:
    """LangChain messages as chat-template messages (roles system, user, assistant, tool).

    Raises:
        ValueError: a message type the chat template cannot render, or an image block without an image.
    """
    out: list[dict] = []
    for m in messages:
        if isinstance(m, SystemMessage):
            out.append({"role": "system", "content": text_of(m.content)})
        elif isinstance(m, HumanMessage):
            out.append({"role": "user", "content": _content(m.content)})
        elif isinstance(m, AIMessage):
            calls = [{"type": "function", "function": {"name": c["name"], "arguments": c["args"]}}
                     for c in m.tool_calls]
            entry: dict = {"role": "assistant", "content": text_of(m.content)}
            if calls:
                entry["tool_calls"] = calls
            out.append(entry)
        elif isinstance(m, ToolMessage):
            out.append({"role": "tool", "content": _content(m.content)})
        else:
            raise ValueError(f"cannot render a {type(m).__name__} in a chat template; use system, human, AI and "
                             "tool messages")
    return out


def parse_tool_calls(text: str) -> tuple[str, list[dict], list[dict]]:
    """Split a policy's turn into its prose, its valid calls and its malformed ones.

    Args:
        text: the generated text, special tokens removed except the tool-call tags.

    Returns:
        ``(content, tool_calls, invalid_tool_calls)`` in LangChain's shapes: ``{"name", "args", "id", "type":
        "tool_call"}`` and ``{"name", "args", "id", "error", "type": "invalid_tool_call"}``.

    >>> parse_tool_calls('<tool_call>\\n{"name": "zoom", "arguments": {}}\\n</tool_call>')[1][0]["name"]
    'zoom'
    >>> parse_tool_calls('<tool_call>{"name": zoom}</tool_call>')[2][0]["error"][:15]
    'malformed JSON:'
    """
    calls, invalid = [], []
    for raw in _CALL.findall(text):
        call_id = f"call_{uuid.uuid4().hex[:12]}"
        body = raw.strip()
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, ValueError, RecursionError) as err:
            invalid.append({"name": None, "args": body, "id": call_id, "error": f"malformed JSON: {err}",
                            "type": "invalid_tool_call"})
            continue
        name = data.get("name") if isinstance(data, dict) else None
        args = data.get("arguments", {}) if isinstance(data, dict) else None
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except (json.JSONDecodeError, ValueError):
                args = None
        if not isinstance(name, str) or not name or not isinstance(args, dict):
            invalid.append({"name": name if isinstance(name, str) else None, "args": body, "id": call_id,
                            "error": 'a call needs {"name": <string>, "arguments": <object>}',
                            "type": "invalid_tool_call"})
            continue
        calls.append({"name": name, "args": args, "id": call_id, "type": "tool_call"})
    content = _CALL.sub("", text).strip()
    return content, calls, invalid
