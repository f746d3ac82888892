"""The external-crop baseline: a DeepEyes-style tool loop around a plain VLM policy.

Each turn re-renders the whole conversation and calls the stock HF ``generate`` (no cache is carried between
turns, as in the DeepEyes harness), stopping at ``</tool_call>`` or the end of the turn. A zoom call is mapped
from the policy's coordinate frame to the original image (`tools.deepeyes.to_source_box`), the region is cropped,
enlarged like the oracle view (`tool_response_view`), and returned as a ``<tool_response>`` image turn; a call the
harness refuses returns its error text instead. The loop stops at the first turn without a call, or after
`MAX_TURNS` turns. Costs count every turn: visual tokens are re-encoded each time.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from ..backbones import ImageInputs
from ..config import budget_for
from ..images import load_image
from ..tools.deepeyes import (
    MAX_TURNS,
    Frame,
    ToolCallError,
    crop_for_tool,
    parse_zoom_call,
    to_source_box,
    zoom_tool_schema,
)
from .agents import AgentResult
from .oracle import ORACLE_TOKENS, ORACLE_ZOOM

if TYPE_CHECKING:
    from ..model import QZoomModel

POLICY_SYSTEM = "Use image_zoom_in_tool to look closer when the answer is too small to see."
TOOL_ZOOM = ORACLE_ZOOM  # enlargement of the returned region: the scale the answer phases trained reading on
TOOL_TOKENS = ORACLE_TOKENS  # token cap of the tool turn's image


def tool_response_view(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """What the zoom tool returns for ``box`` (original pixels): the region enlarged `TOOL_ZOOM` times, capped at
    what `TOOL_TOKENS` tokens keep.

    Raises:
        ToolCallError: a region the DeepEyes harness refuses (a side <= 30 px, aspect > 100).
    """
    return crop_for_tool(image, box, zoom=TOOL_ZOOM, max_pixels=TOOL_TOKENS * 28 * 28)


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


class DeepEyesAgent:
    """A plain VLM run as a DeepEyes-style external-crop tool agent.

    Args:
        model: the loaded model (its heads, if any, are not used).
        tokens: max visual tokens of the global view; min is ``min(256, tokens)``.
        name: the agent's name in results.
        frame: the policy's box frame ("absolute" for Qwen2.5-VL policies such as zoomworld-tiny).
        max_new_tokens: decoding budget per turn (a call is about 80 characters for a character tokenizer).
        max_turns: assistant turns before the loop gives up.
        system: the system prompt; `POLICY_SYSTEM` is what phase 4 trained zoomworld-tiny on.
        list_tools: also pass the tool's schema to the chat template (``tools=[...]``), as policies trained
            with a tool listing (DeepEyes on Qwen2.5-VL) expect; off for zoomworld-tiny, which never saw one.
    """

    def __init__(self, model: QZoomModel, tokens: int, name: str, *, frame: Frame = "absolute",
                 max_new_tokens: int = 96, max_turns: int = MAX_TURNS, system: str = POLICY_SYSTEM,
                 list_tools: bool = False) -> None:
        self.model = model
        self.budget = budget_for(tokens)
        self.name = name
        self.frame = frame
        self.max_new_tokens = max_new_tokens
        self.max_turns = max_turns
        self.system = system
        self.tools = [zoom_tool_schema()] if list_tools else None
        vocab = model.adapter.tokenizer.get_vocab()
        # a call ends the turn at its closing tag, as in the DeepEyes harness (when the vocabulary has one)
        self.stop_ids = sorted({*model.adapter.eos_token_ids, *(vocab[t] for t in ("</tool_call>",) if t in vocab)})

    def _generate(self, question: str, turns: list[tuple[str, str | None]],
                  images: list[ImageInputs]) -> tuple[str, str, int]:
        """One policy turn: its raw text (special tokens kept, for the call parser), its text without special
        tokens (the answer, when there is no call), and the number of tokens generated."""
        adapter = self.model.adapter
        text = adapter.tokenizer.apply_chat_template(policy_messages(question, turns, system=self.system),
                                                     tools=self.tools, tokenize=False, add_generation_prompt=True)
        ids = adapter.expand_images(adapter.tokenizer(text, add_special_tokens=False)["input_ids"], images)
        inputs = adapter.hf_inputs(torch.tensor([ids], device=adapter.device), images)
        with torch.inference_mode():
            out = adapter.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                         eos_token_id=self.stop_ids, pad_token_id=adapter.tokenizer.pad_token_id)
        new = out[0, len(ids):]
        raw = adapter.tokenizer.decode(new, skip_special_tokens=False)
        return raw, adapter.tokenizer.decode(new, skip_special_tokens=True), int(new.shape[0])

    def run(self, image: Any, question: str) -> AgentResult:
        """Answer ``question`` about ``image``, zooming through the tool as the policy asks."""
        t0 = time.perf_counter()
        adapter = self.model.adapter
        source = load_image(image)
        view = adapter.prepare_image(source, min_tokens=self.budget[0], max_tokens=self.budget[1])
        images, turns = [view], []
        visual = passes = generated = calls = 0
        answer, bbox = "", None
        for _ in range(self.max_turns):
            said, plain, n_new = self._generate(question, turns, images)
            visual += sum(im.n_tokens for im in images)
            passes += n_new  # one prefill and n_new - 1 decode steps
            generated += n_new
            said = said.split("<|im_end|>")[0]
            try:
                call = parse_zoom_call(said)
            except ToolCallError as err:
                calls += 1
                turns.append((said, f"Error: {err}"))
                continue
            if call is None:
                answer = plain.strip()
                break
            calls += 1
            try:
                box = to_source_box(call.bbox, self.frame, view.resized_size, view.source_size)
                crop = tool_response_view(source, box)
            except ToolCallError as err:
                turns.append((said, f"Error: {err}"))
                continue
            bbox = bbox or list(box)  # the first successful zoom is the one scored against the target
            images.append(adapter.prepare_image(crop, min_tokens=4, max_tokens=TOOL_TOKENS))
            turns.append((said, None))
        return AgentResult(answer=answer, latency_s=time.perf_counter() - t0, visual_tokens=visual,
                           forward_passes=passes, generated_tokens=generated, tool_calls=calls, bbox=bbox)
