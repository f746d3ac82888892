"""External-crop agents: a VLM policy writes a box as text in a tool dialect, a harness crops, the crop comes back.

One loop serves every dialect of `tools.dialects` (DeepEyes, Qwen3-VL's native tool, Mini-o3, Pixel-Reasoner)
and two ways of running the policy:

* ``cached=False`` (the reference harnesses): each turn re-renders the whole conversation and runs the stock HF
  ``generate``, so every image is encoded again and every prompt token prefilled again, turn after turn;
* ``cached=True`` (``deepeyes-cached``, the strongest form of an external-crop agent): the conversation's KV cache
  is continued across turns (`chat.ChatSession`), so a turn pays only for the policy's last call, the tool turn and
  the crop. Both render the same prompt with the same renderer (`adapter.render_chat`), so they differ only in cost.

Episode rules are the dialect's: an answer ends the episode (even next to a call), a call is located, cropped and
returned, a refused call returns the dialect's error turn and the policy tries again, and the loop ends after the
dialect's turn limit. A turn with neither a call nor an answer tag is the answer (policies trained without tags,
such as the bundled one, answer plainly). No policy output can raise out of `run`: every outcome is in the trace.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from ..boxes import Box
from ..chat import ChatSession
from ..config import budget_for
from ..images import load_image
from ..tools.crop import ToolCallError, ToolImage
from ..tools.dialects import get_dialect
from .agents import AgentResult, Ledger

if TYPE_CHECKING:
    from ..model import QZoomModel
    from ..tools.dialects import ToolDialect

TRACE_TEXT = 240  # characters of a turn's text kept in the trace


@dataclass
class _Episode:
    """One question's conversation: the messages, the images the tool can crop, the costs and the trace."""

    source: Image.Image
    messages: list[dict]
    images: list[ToolImage]
    costs: Ledger = field(default_factory=Ledger)
    trace: list[dict] = field(default_factory=list)
    calls: int = 0
    box: Box | None = None


class ExternalCropAgent:
    """A plain VLM run as an external-crop tool agent in one dialect.

    Args:
        model: the policy (its Q-Zoom heads, if any, are not used).
        tokens: max visual tokens of the global view; min is ``min(256, tokens)``.
        name: the agent's name in results.
        dialect: a `tools.dialects` dialect or its name ("deepeyes", "qwen3vl", "minio3", "pixelreasoner").
        cached: continue the conversation's KV cache across turns (True) or re-run everything each turn (False,
            as the reference harnesses do).
        system: the system prompt; the dialect's reference prompt when None ("" for none).
        instruction: append the dialect's reference instruction to the question (DeepEyes' format reminder,
            Pixel-Reasoner's guidelines); off for policies trained without it.
        reply_role: the role of the turn returning a crop; the dialect's reference one when None ("user" for
            DeepEyes, whose harness writes ``<tool_response>`` into a user turn; "tool" lets the chat template wrap
            it, as the bundled policies were trained).
        list_tools: pass the dialect's tool schema to the chat template (policies trained with a tool listing;
            DeepEyes' reference system prompt already holds its schema).
        tool_tokens: (min, max) visual tokens of a crop in a tool turn.
        max_new_tokens: decoding budget per turn.
        max_turns: assistant turns before the loop gives up; the dialect's limit when None.

    Raises:
        ValueError: an unknown dialect, or budgets below 1.
    """

    def __init__(self, model: QZoomModel, tokens: int, name: str, *, dialect: str | ToolDialect = "deepeyes",
                 cached: bool = False, system: str | None = None, instruction: bool = True,
                 reply_role: str | None = None, list_tools: bool = False,
                 tool_tokens: tuple[int, int] = (4, 256), max_new_tokens: int = 96,
                 max_turns: int | None = None) -> None:
        self.model = model
        self.budget = budget_for(tokens)
        self.name = name
        self.dialect = get_dialect(dialect) if isinstance(dialect, str) else dialect
        self.cached = cached
        self.system = (self.dialect.system_prompt() or "") if system is None else system
        self.instruction = (self.dialect.instruction() or "") if instruction else ""
        self.reply_role = self.dialect.reply_role if reply_role is None else reply_role
        if self.reply_role not in ("user", "tool"):
            raise ValueError(f"reply_role must be 'user' or 'tool', got {reply_role!r}")
        self.tools = [self.dialect.schema()] if list_tools and self.dialect.schema() is not None else None
        if min(tool_tokens) < 1 or tool_tokens[0] > tool_tokens[1]:
            raise ValueError(f"tool_tokens must be (min, max) with 1 <= min <= max, got {tool_tokens!r}")
        self.tool_tokens = tool_tokens
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
        self.max_new_tokens = max_new_tokens
        self.max_turns = self.dialect.max_turns if max_turns is None else max_turns
        if self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {self.max_turns!r}")
        adapter = model.adapter
        vocab = adapter.tokenizer.get_vocab()
        # a call ends the turn at its closing tag: one id when the vocabulary has it, else by decoded text
        self.stop_ids = sorted({*adapter.eos_token_ids, *(vocab[s] for s in self.dialect.stop_strings if s in vocab)})
        self.stop_strings = tuple(s for s in self.dialect.stop_strings if s not in vocab)
        # the end-of-turn markers of this tokenizer (``<|im_end|>`` for Qwen, ``</s>`` for LLaVA): a turn ends there
        self.turn_ends = tuple(t for t in adapter.tokenizer.convert_ids_to_tokens(sorted(adapter.eos_token_ids)) if t)
        self.last_trace: list[dict] = []

    # ---- one policy turn ---------------------------------------------------------------------------------------
    def _turn_stock(self, session: ChatSession, ep: _Episode) -> tuple[str, str]:
        """Render everything and run the stock HF ``generate`` (no cache kept): the reference harness's cost."""
        adapter = self.model.adapter
        rendered = session.render(ep.messages, self.tools)  # the renderer ChatSession uses; nothing runs yet
        inputs = adapter.hf_inputs(torch.tensor([rendered.ids], device=adapter.device),
                                   [im.inputs for im in rendered.images])
        kwargs: dict[str, Any] = {}
        if self.stop_strings:
            kwargs = {"stop_strings": list(self.stop_strings), "tokenizer": adapter.tokenizer}
        with torch.inference_mode():
            out = adapter.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                         eos_token_id=self.stop_ids, pad_token_id=adapter.tokenizer.pad_token_id,
                                         **kwargs)
        new = out[0, len(rendered.ids):]
        ep.costs.prefill(len(rendered.ids), [im.inputs for im in rendered.images], adapter.num_layers)
        ep.costs.generated(int(new.shape[0]), adapter.num_layers)
        tok = adapter.tokenizer
        return tok.decode(new, skip_special_tokens=False), tok.decode(new, skip_special_tokens=True).strip()

    def _turn_cached(self, session: ChatSession, ep: _Episode) -> tuple[str, str]:
        """Continue the conversation's cache: only the new tokens and the new crop are prefilled."""
        turn = session.generate(ep.messages, tools=self.tools, max_new_tokens=self.max_new_tokens,
                                stop_strings=self.dialect.stop_strings)
        c, s = ep.costs, turn.stats
        c.visual_tokens += s.visual_tokens
        c.vision_encodes += s.vision_encodes
        c.forward_passes += s.forward_passes
        c.generated_tokens += s.generated_tokens
        c.layer_tokens += s.layer_tokens
        return turn.raw, turn.text

    # ---- the loop ----------------------------------------------------------------------------------------------
    def _tool_turn(self, ep: _Episode, call: Any) -> dict:
        """Carry out one parsed call: the tool turn to append and the trace entry (refusals included)."""
        try:
            box = self.dialect.locate(call, ep.images)
            crop = self.dialect.view(ep.images[ep.images[call.source].source].image, box)
        except ToolCallError as err:
            return {"error": str(err)}
        view = self.model.adapter.prepare_image(crop, min_tokens=self.tool_tokens[0], max_tokens=self.tool_tokens[1])
        ep.images.append(ToolImage(crop, view.resized_size, 0, box))
        ep.box = ep.box or box  # the first successful crop is the one scored against the target
        return {"box": box.to_json(), "crop": list(crop.size), "image": crop, "observation": len(ep.images) - 1}

    def _reply(self, result: dict) -> dict:
        if "error" in result:
            content = self.dialect.reply(False, error=result["error"])
        else:
            content = self.dialect.reply(True, observation=result["observation"], size=result["image"].size)
        parts = []
        for part in content:  # the dialect says where the image goes; the crop is attached here
            parts.append({"type": "image", "image": result["image"]} if part.get("type") == "image" else part)
        return {"role": self.reply_role, "content": parts}

    def run(self, image: Any, question: str) -> AgentResult:
        """Answer ``question`` about ``image``, cropping where the policy asks; never raises on policy output.

        Returns:
            The answer ("" when the turn limit is reached without one), the costs summed over every turn, the
            number of calls the policy wrote (refused ones included), and the first successful crop box.
        """
        t0 = time.perf_counter()
        source = load_image(image)
        adapter = self.model.adapter
        view = adapter.prepare_image(source, min_tokens=self.budget[0], max_tokens=self.budget[1])
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages.append({"role": "user", "content": [{"type": "image", "image": source},
                                                     {"type": "text", "text": question + self.instruction}]})
        ep = _Episode(source, messages, [ToolImage(source, view.resized_size, 0, Box(0, 0, *source.size))])
        session = ChatSession(self.model, budget=self.budget, tool_budget=self.tool_tokens)
        answer = ""
        for turn in range(self.max_turns):
            raw, plain = (self._turn_cached if self.cached else self._turn_stock)(session, ep)
            said = _cut(raw, self.turn_ends)
            parsed = self.dialect.parse(said)
            entry: dict[str, Any] = {"turn": turn, "said": said[:TRACE_TEXT]}
            if parsed.answer is not None or (parsed.call is None and parsed.error is None):
                answer = parsed.answer.strip() if parsed.answer is not None else plain
                ep.trace.append({**entry, "action": "answer"})
                break
            ep.calls += 1
            result = {"error": parsed.error} if parsed.error is not None else self._tool_turn(ep, parsed.call)
            ep.trace.append({**entry, "action": "call", **{k: v for k, v in result.items() if k != "image"}})
            ep.messages += [{"role": "assistant", "content": said}, self._reply(result)]
        else:
            ep.trace.append({"turn": self.max_turns, "action": "max_turns"})
        self.last_trace = ep.trace
        return ep.costs.result(answer, t0, bbox=ep.box, tool_calls=ep.calls, external_calls=ep.calls, trace=ep.trace)


def _cut(text: str, ends: tuple[str, ...]) -> str:
    """``text`` up to the first of the end-of-turn markers ``ends``."""
    for end in ends:
        text = text.split(end)[0]
    return text
