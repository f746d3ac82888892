"""Agents compared by the runner: one typed interface, and the agents that answer in one call of the model.

An agent answers one question about one image and reports what it cost. Plain agents run the base model at a fixed
visual-token budget (``mode="never"``); Q-Zoom agents run it with its heads, gated or with the zoom forced; the
oracle answers from the ground-truth target. Tool agents live in their own modules (`deepeyes_agent`); names map to
agents in `registry`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..config import budget_for

if TYPE_CHECKING:
    from ..backbones import ImageInputs
    from ..boxes import Box
    from ..model import QZoomModel
    from ..results import Answer


@dataclass
class AgentResult:
    """One answer and its cost. ``correct`` is not here: the runner scores answers.

    Attributes:
        answer: the decoded answer text.
        latency_s: wall time from image to answer.
        visual_tokens: visual tokens processed, over all views and calls.
        forward_passes: prefills plus decode steps, over all model calls.
        generated_tokens: tokens generated, over all model calls.
        tool_calls: tool calls the policy wrote, any tool, refused ones included (0 for agents without tools).
        zooms: internal Q-Zoom zooms (0 for plain agents).
        external_calls: calls of an external crop tool (a box written as text); an internal zoom is not one.
        gate_score: the Q-Zoom gate score, or None when no gate ran.
        bbox: the zoom box ``[x1, y1, x2, y2]`` in source pixels, or None.
        vision_encodes: images run through the vision tower, when the agent counts them (else None).
        layer_tokens: decoder layer-tokens (tokens x layers, Q-Zoom heads included), when counted (else None).
        trace: per step of a multi-step agent, what it did (turn text, call, box, error), else None.
    """

    answer: str
    latency_s: float
    visual_tokens: int
    forward_passes: int
    generated_tokens: int
    tool_calls: int = 0
    zooms: int = 0
    gate_score: float | None = None
    bbox: list[int] | None = None
    vision_encodes: int | None = None
    layer_tokens: int | None = None
    external_calls: int = 0
    trace: list[dict] | None = None

    @classmethod
    def from_answer(cls, ans: Answer, latency_s: float) -> AgentResult:
        """The result of an agent that answered with one `QZoomModel.answer` call taking ``latency_s``."""
        return cls(answer=ans.text, latency_s=latency_s, visual_tokens=ans.visual_tokens,
                   forward_passes=ans.forward_passes, generated_tokens=ans.generated_tokens, zooms=int(ans.zoomed),
                   gate_score=ans.gate_score, bbox=ans.bbox.to_json() if ans.bbox else None,
                   vision_encodes=1 + len(ans.boxes), layer_tokens=ans.layer_tokens)


@dataclass
class Ledger:
    """What one question has run so far, counted as it runs: every forward pass of the model (a prefill counts one,
    its visual tokens and encodes; each decode step one), and the decoder layer-tokens."""

    visual_tokens: int = 0
    forward_passes: int = 0
    generated_tokens: int = 0
    vision_encodes: int = 0
    layer_tokens: int = 0

    def prefill(self, length: int, images: list[ImageInputs], layers: int) -> None:
        """One forward pass over ``length`` tokens holding ``images`` (each encoded), through ``layers`` layers."""
        self.forward_passes += 1
        self.visual_tokens += sum(im.n_tokens for im in images)
        self.vision_encodes += len(images)
        self.layer_tokens += length * layers

    def generated(self, n: int, layers: int) -> None:
        """``n`` tokens generated after a prefill: the first from the prefill's logits, each further one from one
        single-token pass through ``layers`` layers (the last token is never fed back)."""
        steps = max(n - 1, 0)
        self.forward_passes += steps
        self.generated_tokens += n
        self.layer_tokens += steps * layers

    def result(self, answer: str, t0: float, *, zooms: int = 0, bbox: Box | None = None,
               **extra: Any) -> AgentResult:
        """The agent's result with these costs, timed from ``t0`` (``extra``: further `AgentResult` fields)."""
        return AgentResult(answer=answer, latency_s=time.perf_counter() - t0, visual_tokens=self.visual_tokens,
                           forward_passes=self.forward_passes, generated_tokens=self.generated_tokens,
                           zooms=zooms, bbox=bbox.to_json() if bbox else None, vision_encodes=self.vision_encodes,
                           layer_tokens=self.layer_tokens, **extra)


class Agent(Protocol):
    """Anything that answers a question about an image and reports its cost."""

    name: str

    def run(self, image: Any, question: str) -> AgentResult:
        """Answer ``question`` about ``image`` (a PIL image, path or bytes).

        Reference agents that need the benchmark's target box set ``uses_target_box = True`` and take it as the
        keyword ``target_box``.
        """
        ...


class PlainAgent:
    """The base model without zooming (``mode="never"``) at a fixed visual-token budget.

    Args:
        model: the loaded model.
        tokens: max visual tokens of the single view; min is ``min(256, tokens)``.
        name: the agent's name in results.
        max_new_tokens: decoding budget.
    """

    mode = "never"

    def __init__(self, model: QZoomModel, tokens: int, name: str, max_new_tokens: int = 8) -> None:
        self.model = model
        self.budget = budget_for(tokens)
        self.name = name
        self.max_new_tokens = max_new_tokens

    def run(self, image: Any, question: str) -> AgentResult:
        """Answer once from one view at the agent's budget; a Q-Zoom agent's zoom, when taken, is part of the same
        answer (no tool call)."""
        t0 = time.perf_counter()
        ans = self.model.answer(image, question, mode=self.mode, max_new_tokens=self.max_new_tokens,
                                budget=self.budget)
        return AgentResult.from_answer(ans, time.perf_counter() - t0)


class QZoomAgent(PlainAgent):
    """The model with its Q-Zoom heads: gated (``mode="auto"``), or the zoom forced on or off.

    Args:
        model: a model with heads.
        mode: "auto" (the gate decides), "always" or "never".
        tokens: max visual tokens of the global view (and of the RoI crop); min is ``min(256, tokens)``.
        name: the agent's name in results.
        max_new_tokens: decoding budget.

    Raises:
        ValueError: the model has no Q-Zoom heads.
    """

    def __init__(self, model: QZoomModel, mode: str, tokens: int, name: str, max_new_tokens: int = 8) -> None:
        if model.heads is None:
            raise ValueError(f"agent {name!r} needs Q-Zoom heads and the model has none; pass a model with a "
                             "qzoom/ adapter (qzoom-agent train stage1 writes one)")
        super().__init__(model, tokens, name, max_new_tokens)
        self.mode = mode
        self.thresholds: dict[str, float] = {}  # RoI/gate thresholds of this agent's view (`presets.thresholds_at`)

    def run(self, image: Any, question: str) -> AgentResult:
        """Answer as `PlainAgent.run`, under this agent's own thresholds when it has them: agents share one model,
        so they are set for this answer and the model's own are put back after it."""
        if not self.thresholds:
            return super().run(image, question)
        config = self.model.config
        saved = {key: getattr(config, key) for key in self.thresholds}
        try:
            for key, value in self.thresholds.items():
                setattr(config, key, value)
            return super().run(image, question)
        finally:
            for key, value in saved.items():
                setattr(config, key, value)


class OracleAgent:
    """A reference, not a real agent: the plain model on the oracle view of the benchmark's target box.

    It reads the ground-truth box (``uses_target_box``; the runner passes it), crops it with one box size of
    context, enlarges it 3x and answers at <= 256 tokens (`bench.oracle`). Its accuracy is what a perfect zoom
    would reach, the ceiling for Q-Zoom and tool agents; its cost counts only the oracle view.
    """

    uses_target_box = True

    def __init__(self, model: QZoomModel, name: str, max_new_tokens: int = 8) -> None:
        self.model = model
        self.name = name
        self.max_new_tokens = max_new_tokens

    def run(self, image: Any, question: str, target_box: tuple[int, int, int, int] | None = None) -> AgentResult:
        """Answer from the oracle view of ``target_box`` (source pixels).

        Raises:
            ValueError: no target box was given.
        """
        from ..images import load_image
        from .oracle import ORACLE_TOKENS, oracle_view

        if target_box is None:
            raise ValueError("the oracle agent needs the benchmark's target box")
        t0 = time.perf_counter()
        view = oracle_view(load_image(image), target_box)
        ans = self.model.answer(view, question, mode="never", max_new_tokens=self.max_new_tokens,
                                budget=(4, ORACLE_TOKENS))
        return AgentResult.from_answer(ans, time.perf_counter() - t0)
