"""The internal, zero-cost zoom: the box comes from the model's own prefill, never from coordinates the policy writes.

Q-Zoom's twig scores the visual tokens of the global view against the question (or against any text hint) from the
layer-K hidden states that the prefill of this image and question already computed. The tool crops that box from
the original image and returns it enlarged, as an image the policy reads in its next turn, with one text line:
the box in source pixels and the gate score. No detector runs and the global image is not encoded again.

`zoom_view` renders a box as the tool's image; `zoom_output` turns a located box into the tool's `ToolOutput`;
`zoom_once` is the one-shot form (its own prefill) that the MCP server and scripts use. Inside a conversation the
box comes from the chat session's cached perception instead (`qzoom_agent.agent`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from PIL import Image

from ..boxes import Box
from .crop import enlarge
from .output import ToolOutput

if TYPE_CHECKING:
    from ..chat import ChatSession
    from ..model import QZoomModel
    from ..results import Perception

ZOOM_TOOL_NAME = "zoom"
VIEW_ZOOM = 3.0  # enlargement of the region: the scale the bundled model learned to read characters at
VIEW_TOKENS = 256  # visual-token cap of the returned view
BoxSource = Literal["cached", "hinted", "fresh"]  # where the box came from (see `zoom_output`)


def zoom_view(image: Image.Image, box: Box, *, px_per_token: float = 28.0, zoom: float = VIEW_ZOOM,
              max_tokens: int = VIEW_TOKENS) -> Image.Image:
    """The image the zoom tool returns: ``box`` cut from the original ``image``, enlarged ``zoom`` times but no
    further than ``max_tokens`` visual tokens of ``px_per_token`` pixels a side would keep."""
    return enlarge(image.crop(box.as_tuple()), zoom, max_tokens * px_per_token**2)


def zoom_output(image: Image.Image, box: Box | None, gate_score: float | None, source: BoxSource, *,
                px_per_token: float = 28.0, hint: str | None = None) -> ToolOutput:
    """The tool's result for a located ``box`` (None: the twig found no region).

    Args:
        image: the original image.
        box: the twig's box in source pixels, or None.
        gate_score: the gate's score for the question, or None for heads without a gate.
        source: ``"cached"`` (from the conversation's prefill), ``"hinted"`` (the hint's tokens scored against the
            cached image prefix) or ``"fresh"`` (no cached perception: one was run for this call).
        px_per_token: the backbone's pixels per visual token side (caps the view's size).
        hint: the hint, when one was given.
    """
    gate = "off" if gate_score is None else f"{gate_score:.3f}"
    artifact = {"box": box.to_json() if box else None, "gate_score": gate_score, "source": source,
                "hint": hint, "image_size": list(image.size)}
    if box is None:
        what = f"for {hint!r}" if hint else "for the question"
        return ToolOutput.error(f"No region stood out {what} (gate {gate}); answer from the whole image.",
                                **artifact)
    view = zoom_view(image, box, px_per_token=px_per_token)
    artifact["view_size"] = list(view.size)
    return ToolOutput(text=f"Zoomed in on [{box.x1}, {box.y1}, {box.x2}, {box.y2}] of the {image.width}x"
                      f"{image.height} image (gate {gate}).", image=view, artifact=artifact)


def zoom_once(model: QZoomModel, image: Image.Image, question: str, hint: str | None = None, *,
              budget: tuple[int, int] | None = None) -> tuple[ToolOutput, Perception]:
    """Zoom without a conversation: one prefill of ``image`` and ``question`` below layer K, the twig for the
    question (or for ``hint``), and the crop.

    Args:
        model: a model with Q-Zoom heads.
        image: the loaded original image.
        question: the user's question (the gate reads it).
        hint: text the twig looks for instead of the question, e.g. ``"the green tag"``.
        budget: (min, max) visual tokens of the global view; the model's config by default.

    Returns:
        ``(output, perception)``; the perception can be reused (e.g. to answer).
    """
    p = model.perceive(image, question, roi="always", budget=budget, roi_query=hint or None)
    return zoom_output(image, p.box, p.gate_score, "fresh", px_per_token=model.adapter.px_per_token,
                       hint=hint or None), p


def session_zoom(session: ChatSession, hint: str | None = None, *, messages: list[dict] | None = None,
                 tools: list[dict] | None = None) -> ToolOutput:
    """The zoom tool inside a conversation: the box from the session's cached perception of its first image and
    question (free: the policy's first prefill computed it), or, with ``hint``, from the hint's own tokens scored
    against the cached image prefix.

    Without a cached perception (a thread resumed after a restart) it is rebuilt once from ``messages``' first user
    turn, and the artifact's ``source`` says ``"fresh"``. Never raises on bad input: a missing image or an empty
    hint is an error result.
    """
    if hint is not None and (not isinstance(hint, str) or not hint.strip()):
        hint = None  # an empty hint means "the question", as an absent one
    had = session.state
    spent = had.layer_tokens if had is not None else 0
    try:
        p = session.perception(messages, tools)
    except ValueError as err:
        return ToolOutput.error(f"zoom needs an image: {err}")
    model = session.model
    if model.heads is None:
        return ToolOutput.error("this model has no Q-Zoom heads, so it cannot zoom; load Q-Zoom heads (qzoom=...)")
    located = session.locate(hint)
    source: BoxSource = "hinted" if hint else ("cached" if session.perception_source == "captured" else "fresh")
    out = zoom_output(p.state.image, located.box, p.gate_score, source, px_per_token=model.adapter.px_per_token,
                      hint=hint)
    # what this call cost: the gate the first time, the twig (or a hint's tokens and the twig), and a rebuilt
    # perception's prefill and image encode when the session had none
    out.artifact.update(perception=session.perception_source, vision_encodes=int(had is None),
                        layer_tokens=p.state.layer_tokens - spent + located.layer_tokens)
    return out
