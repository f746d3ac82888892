"""The DeepEyes-style external-crop agent as the bundled ZoomWorld policies were trained to run it.

`crop_agent.ExternalCropAgent` runs every dialect; this module keeps the conventions our ZoomWorld recipe trained
the bundled model's grounding phase on (`recipes.zoomworld_tiny.grounding_data` renders its conversations with
`policy_messages`): the short system prompt `POLICY_SYSTEM`, no tool listing, the crop returned alone in the tool
turn (no reference instruction text), enlarged `TOOL_ZOOM` times up to `TOOL_TOKENS` tokens, because the bundled
model reads glyphs only when they are enlarged. `DeepEyesAgent` is the DeepEyes dialect with those settings;
``deepeyes_preset`` chooses them for a model trained by that recipe and DeepEyes' reference settings otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from PIL import Image

from ..tools.deepeyes import MAX_TURNS, crop_for_tool
from ..tools.dialects import get_dialect
from .crop_agent import ExternalCropAgent
from .oracle import ORACLE_TOKENS, ORACLE_ZOOM

if TYPE_CHECKING:
    from ..model import QZoomModel

POLICY_SYSTEM = "Use image_zoom_in_tool to look closer when the answer is too small to see."
TOOL_ZOOM = ORACLE_ZOOM  # enlargement of the returned region: the scale the answer phases trained reading on
TOOL_TOKENS = ORACLE_TOKENS  # token cap of the tool turn's image


def tool_response_view(image: Image.Image, box: tuple[int, int, int, int], px_per_token: float = 28) -> Image.Image:
    """What the zoom tool returns for ``box`` (original pixels): the region enlarged `TOOL_ZOOM` times, capped at
    what `TOOL_TOKENS` tokens keep at ``px_per_token`` pixels per token side (28: Qwen2.5-VL, the bundled model's).

    Raises:
        ToolCallError: a region the DeepEyes harness refuses (a side <= 30 px, aspect > 100).
    """
    return crop_for_tool(image, box, zoom=TOOL_ZOOM, max_pixels=round(TOOL_TOKENS * px_per_token ** 2))


def policy_messages(question: str, turns: list[tuple[str, str | None]] | None = None, *,
                    system: str = POLICY_SYSTEM) -> list[dict]:
    """The chat of a tool-using policy: ``system`` prompt, the image and question, then per earlier turn the
    policy's text and the tool's reply (an image when the reply text is None, else that error text)."""
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    for said, error in turns or []:
        reply = [{"type": "image"}] if error is None else [{"type": "text", "text": error}]
        messages += [{"role": "assistant", "content": said}, {"role": "tool", "content": reply}]
    return messages


def trained_on_zoomworld(model: QZoomModel) -> bool:
    """Whether ``model`` was trained by our ZoomWorld recipe (its directory holds ``zoomworld.json``), and so expects
    the conventions of `policy_messages` rather than DeepEyes' reference prompt."""
    from ..loading import trained_alphabet

    path = getattr(model, "path", None)
    return path is not None and trained_alphabet(path) is not None


def trained_settings(model: QZoomModel) -> dict[str, Any]:
    """How our ZoomWorld recipes train DeepEyes-format policies to be run (`policy_messages`): image-only tool
    turns (the chat template wraps them), no appended instruction, crops enlarged `TOOL_ZOOM` times up to what
    `TOOL_TOKENS` tokens of ``model`` keep; the system prompt is the caller's."""
    max_pixels = round(TOOL_TOKENS * model.adapter.px_per_token ** 2)
    return {"dialect": get_dialect("deepeyes", zoom=TOOL_ZOOM, max_pixels=max_pixels, reply_text=False),
            "instruction": False, "reply_role": "tool", "tool_tokens": (4, TOOL_TOKENS)}


def deepeyes_preset(model: QZoomModel) -> dict[str, Any]:
    """`ExternalCropAgent` keyword arguments for the DeepEyes dialect on ``model``.

    * a policy delta (`policy.py`, e.g. the bundled ``zoomworld-tiny-deepeyes``): the prompt it records (system
      prompt, tool listing), image-only tool turns, crops enlarged as in its training;
    * another model trained by our ZoomWorld recipe (phase 4): `POLICY_SYSTEM`, image-only tool turns, enlarged crops;
    * any other model (a DeepEyes checkpoint): DeepEyes' reference prompt, instruction, reply text and crop sizes.
    """
    trained = trained_settings(model)
    if model.policy is not None:
        return {**trained, "system": model.policy.system or "", "list_tools": model.policy.list_tools}
    if trained_on_zoomworld(model):
        return {**trained, "system": POLICY_SYSTEM}
    return {"dialect": get_dialect("deepeyes")}


class DeepEyesAgent(ExternalCropAgent):
    """DeepEyes' dialect run with the conventions the bundled ZoomWorld policies were trained on.

    Args:
        model: the policy.
        tokens: max visual tokens of the global view.
        name: the agent's name in results.
        cached: continue the KV cache across turns (``deepeyes-cached``) instead of re-running every turn.
        max_new_tokens: decoding budget per turn (a call is about 80 characters for a character tokenizer).
        max_turns: assistant turns before the loop gives up (DeepEyes' 5).
        system: the system prompt; `POLICY_SYSTEM` is what the grounding phase trained zoomworld-tiny on.
        list_tools: also list the tool's schema in the system turn, as policies trained with a listing expect.
    """

    def __init__(self, model: QZoomModel, tokens: int, name: str, *, cached: bool = False,
                 max_new_tokens: int = 96, max_turns: int = MAX_TURNS, system: str = POLICY_SYSTEM,
                 list_tools: bool = False) -> None:
        super().__init__(model, tokens, name, cached=cached, system=system, list_tools=list_tools,
                         max_new_tokens=max_new_tokens, max_turns=max_turns, **trained_settings(model))
