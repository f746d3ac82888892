"""Q-Zoom over MCP: the zero-cost ``zoom`` tool and a one-shot ``ask``, served over stdio or streamable HTTP.

Tools:

- ``zoom(image, question, hint=None)``: one prefill of the image and question; the twig's box for the question (or
  for ``hint``) is cropped from the original image. Returns the crop as an image, one text line (the box and the
  gate score), and ``{box, gate_score, source, hint, image_size, view_size}`` as structured content.
- ``ask(image, question, mode="auto")``: the model's answer with its costs (`Answer.to_json`), as JSON text and as
  structured content. ``mode``: ``auto`` (the gate decides), ``never``, ``always``; more modes can be plugged in
  (`build_server`'s ``extra_modes``).

``image`` is a path inside an allowed folder, base64 or a data URL, under an `ImageRefPolicy`
(`qzoom_agent.agent.image_refs`). A refused call (a bad image reference, a bad mode, no region found) is a tool
error result with one line saying why; it is logged at INFO without a traceback, and the server goes on serving.

The model is loaded once, before the server starts (the caller passes it in; the CLI loads it before serving, so
a bad ``--model`` fails at once). The SDK runs tool calls concurrently on worker threads: images are decoded in
parallel, and the model calls are serialised with one lock, since torch calls on one model must not interleave.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal

from mcp.server.mcpserver import Image as MCPImage
from mcp.server.mcpserver import MCPServer
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from PIL import Image
from pydantic import Field

from ..checks import UsageError, one_line
from ..tools.zoom import zoom_once
from .image_refs import ImageRefError, ImageRefPolicy, resolve_image_ref

if TYPE_CHECKING:
    from ..model import QZoomModel

logger = logging.getLogger(__name__)

BUILTIN_MODES = ("auto", "never", "always")  # QZoomModel.answer's own modes
TRANSPORTS = ("stdio", "streamable-http")
MAX_QUESTION_CHARS = 4000
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

AskMode = Callable[["QZoomModel", Image.Image, str], dict[str, Any]]
"""An extra ``ask`` mode: ``(model, image, question) -> JSON-safe record`` (e.g. a later ``"tool"`` mode that runs
an agent graph). It is called under the model lock; an exception it raises is reported as a crash."""

ImageArg = Annotated[str, Field(description="the image: a path inside an allowed folder (relative paths start at "
                                "the first one), base64 of the image file, or a data:image/...;base64, URL")]
QuestionArg = Annotated[str, Field(description="the question about the image")]
HintArg = Annotated[str | None, Field(description="what to look for instead of the question, e.g. 'the green "
                                      "tag'; default: the question")]
ModeArg = Annotated[str, Field(description="when to zoom: auto (the gate decides), never, always (or a mode this "
                               "server adds; see the tool's description)")]

_READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True,
                             open_world_hint=False)


class _Refused(Exception):
    """A call refused with a one-line reason (turned into a tool error result)."""


def _error(tool: str, message: str, structured: dict[str, Any] | None = None) -> CallToolResult:
    text = one_line(message)
    logger.info("%s refused: %s", tool, text)
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=structured,
                          is_error=True)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class _QZoomTools:
    """The two tools' bodies over one model, one policy and one lock."""

    def __init__(self, model: QZoomModel, policy: ImageRefPolicy, max_new_tokens: int,
                 extra_modes: Mapping[str, AskMode]) -> None:
        self.model = model
        self.policy = policy
        self.max_new_tokens = max_new_tokens
        self.extra_modes = dict(extra_modes)
        self.lock = threading.Lock()

    @property
    def modes(self) -> tuple[str, ...]:
        return BUILTIN_MODES + tuple(self.extra_modes)

    def _inputs(self, image: str, question: str) -> tuple[Image.Image, str]:
        """The loaded image and the checked question (decoding runs outside the model lock)."""
        if not isinstance(question, str) or not question.strip():
            raise _Refused("the question is empty; ask something about the image")
        if len(question) > MAX_QUESTION_CHARS:
            raise _Refused(f"the question is {len(question):,} characters long, over the limit of "
                           f"{MAX_QUESTION_CHARS:,}; shorten it")
        try:
            return resolve_image_ref(image, self.policy), question.strip()
        except ImageRefError as err:
            raise _Refused(str(err)) from None

    def _needs_heads(self, what: str) -> None:
        if getattr(self.model, "heads", None) is None:
            raise _Refused(f"{what} needs Q-Zoom heads and this server's model has none; restart the server with "
                           "a model that has them (e.g. --model zoomworld-tiny)")

    def zoom(self, image: str, question: str, hint: str | None) -> CallToolResult:
        try:
            self._needs_heads("zoom")
            pil, question = self._inputs(image, question)
        except _Refused as err:
            return _error("zoom", str(err))
        hint = hint.strip() if isinstance(hint, str) and hint.strip() else None
        if hint is not None and len(hint) > MAX_QUESTION_CHARS:
            return _error("zoom", f"the hint is over {MAX_QUESTION_CHARS:,} characters; shorten it")
        with self.lock:
            out, _ = zoom_once(self.model, pil, question, hint)
        if out.is_error or out.image is None:
            return _error("zoom", out.text, dict(out.artifact) or None)
        content = [MCPImage(data=_png(out.image), format="png").to_image_content(),
                   TextContent(type="text", text=one_line(out.text))]
        return CallToolResult(content=content, structured_content=dict(out.artifact))

    def ask(self, image: str, question: str, mode: str) -> CallToolResult:
        try:
            if mode not in self.modes:
                raise _Refused(f"mode must be one of {', '.join(map(repr, self.modes))}, got "
                               f"{one_line(repr(mode))[:60]}")
            if mode in ("auto", "always"):
                self._needs_heads(f"mode {mode!r}")
            pil, question = self._inputs(image, question)
        except _Refused as err:
            return _error("ask", str(err))
        with self.lock:
            if mode in self.extra_modes:
                record = dict(self.extra_modes[mode](self.model, pil, question))
            else:
                record = self.model.answer(pil, question, mode=mode, max_new_tokens=self.max_new_tokens).to_json()
        record.setdefault("mode", mode)
        return CallToolResult(content=[TextContent(type="text", text=json.dumps(record))],
                              structured_content=record)


def build_server(model: QZoomModel, policy: ImageRefPolicy, *, name: str = "qzoom-agent",
                 max_new_tokens: int = 32, extra_modes: Mapping[str, AskMode] | None = None) -> MCPServer:
    """An MCP server with the ``zoom`` and ``ask`` tools over ``model``.

    Args:
        model: a loaded `QZoomModel`; ``zoom`` and ``ask`` modes ``auto``/``always`` need its Q-Zoom heads (without
            them those calls are refused, and ``ask`` mode ``never`` still works).
        policy: which image references clients may send (allowed folders, URLs, byte and pixel limits).
        name: the server's name, as clients list it.
        max_new_tokens: decoding budget of ``ask``.
        extra_modes: more ``ask`` modes by name, e.g. ``{"tool": run_agent}`` (see `AskMode`); a name may not
            shadow ``auto``, ``never`` or ``always``.

    Returns:
        The server; run it with `serve`, or connect to it in-process with ``mcp.Client(server)``.

    Raises:
        UsageError: a bad ``max_new_tokens``, policy or extra mode.
    """
    if not isinstance(policy, ImageRefPolicy):
        raise UsageError(f"policy must be an ImageRefPolicy, got {type(policy).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    extra = dict(extra_modes or {})
    for mode, fn in extra.items():
        if not isinstance(mode, str) or not mode or mode in BUILTIN_MODES or not callable(fn):
            raise UsageError(f"extra ask mode {mode!r} must be a new, non-empty name mapped to a callable "
                             f"(the built-in modes are {', '.join(BUILTIN_MODES)})")
    tools = _QZoomTools(model, policy, max_new_tokens, extra)
    server = MCPServer(name, instructions="Q-Zoom: `zoom` crops the region of an image that matters for a question "
                       "(found in the model's own prefill, no detector); `ask` answers a question about an image.")
    modes = " | ".join(tools.modes)

    @server.tool(annotations=_READ_ONLY, description="Zoom in on the region of the image that matters for the "
                 "question (or for the hint): returns the enlarged crop, one line with the box in source pixels "
                 "and the gate score, and {box, gate_score, source} as structured content.")
    def zoom(image: ImageArg, question: QuestionArg, hint: HintArg = None) -> CallToolResult:
        return tools.zoom(image, question, hint)

    @server.tool(annotations=_READ_ONLY, description="Answer a question about the image with Q-Zoom; returns the "
                 "answer and its costs (zoomed, gate score, box, visual tokens, forward passes, latency). "
                 f"Modes: {modes}.")
    def ask(image: ImageArg, question: QuestionArg, mode: ModeArg = "auto") -> CallToolResult:
        return tools.ask(image, question, mode)

    logger.info("MCP server %r: tools zoom, ask (modes %s); %d allowed folder(s), urls %s, max %s bytes, "
                "%s pixels", name, modes, len(policy.allowed_roots), "allowed" if policy.allow_urls else "refused",
                f"{policy.max_bytes:,}", f"{policy.max_pixels:,}")
    return server


def request_body_limit(max_image_bytes: int) -> int:
    """The HTTP request body limit that lets one base64 image of ``max_image_bytes`` through (at least the SDK's
    own 4 MiB)."""
    return max(4 * 1024 * 1024, max_image_bytes * 4 // 3 + 1024 * 1024)


def _check_port(host: str, port: int) -> None:
    """Fail with one line, before the server starts, when ``host:port`` cannot be bound (in use, unknown host)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as err:
        raise UsageError(f"cannot listen on {host}:{port} ({one_line(err.strerror or err)}); pick another --port "
                         "or --host") from None


def serve(server: MCPServer, transport: Literal["stdio", "streamable-http"] = "stdio", host: str = "127.0.0.1",
          port: int = 8000, *, max_image_bytes: int | None = None) -> None:
    """Run ``server`` until it is stopped (end of input for stdio; SIGINT or SIGTERM for HTTP).

    Args:
        server: from `build_server`.
        transport: ``"stdio"`` (the client starts this process) or ``"streamable-http"`` (at
            ``http://HOST:PORT/mcp``).
        host: the HTTP interface to bind. The server has no authentication: keep it on loopback unless it sits
            behind something that authenticates; another host is served with a warning.
        port: the HTTP port, 1-65535.
        max_image_bytes: the policy's ``max_bytes``, to size the HTTP request body limit (`request_body_limit`).

    Raises:
        UsageError: an unknown transport, a bad port, or a host and port that cannot be bound.
    """
    if transport not in TRANSPORTS:
        raise UsageError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
    if transport == "stdio":
        logger.info("serving MCP over stdio")
        server.run("stdio")
        return
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise UsageError(f"port must be an integer in 1-65535, got {port!r}")
    if host not in LOOPBACK_HOSTS:
        logger.warning("serving MCP on %s:%d, beyond loopback: this server has no authentication; anyone who can "
                       "reach it can read images in the allowed folders", host, port)
    _check_port(host, port)
    body = request_body_limit(max_image_bytes or 0)
    logger.info("serving MCP over streamable HTTP at http://%s:%d/mcp", host, port)
    server.run("streamable-http", host=host, port=port, max_request_body_size=body)
