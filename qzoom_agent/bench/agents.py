"""Agents compared by the runner: one typed interface, and one registry from agent names to factories.

An agent answers one question about one image and reports what it cost. Plain agents run the base model at a fixed
visual-token budget (``mode="never"``). New agents (Q-Zoom modes, external-crop tool loops) are added by writing a
class with ``name`` and ``run`` and one entry in :data:`FACTORIES` (fixed names) or :data:`PARAM_FACTORIES`
(``prefix@argument`` names such as ``plain@1024``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..model import QZoomModel

DEFAULT_LOWRES_TOKENS = 256
DEFAULT_HIGHRES_TOKENS = 4096
MIN_TOKENS_FLOOR = 256  # budget b means (min(256, b), b) visual tokens


@dataclass
class AgentResult:
    """One answer and its cost. ``correct`` is not here: the runner scores answers.

    Attributes:
        answer: the decoded answer text.
        latency_s: wall time from image to answer.
        visual_tokens: visual tokens processed, over all views and calls.
        forward_passes: prefills plus decode steps, over all model calls.
        generated_tokens: tokens generated, over all model calls.
        tool_calls: external crop/zoom tool calls (0 for agents without tools).
        zooms: internal Q-Zoom zooms (0 for plain agents).
        gate_score: the Q-Zoom gate score, or None when no gate ran.
        bbox: the zoom box ``[x1, y1, x2, y2]`` in source pixels, or None.
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


class Agent(Protocol):
    """Anything that answers a question about an image and reports its cost."""

    name: str

    def run(self, image: Any, question: str) -> AgentResult:
        """Answer ``question`` about ``image`` (a PIL image, path or bytes).

        Reference agents that need the benchmark's target box set ``uses_target_box = True`` and take it as the
        keyword ``target_box``.
        """
        ...


def budget_for(tokens: int) -> tuple[int, int]:
    """The ``(min_tokens, max_tokens)`` budget of a plain agent at ``tokens`` visual tokens.

    Examples:
        >>> budget_for(4096), budget_for(64)
        ((256, 4096), (64, 64))
    """
    return min(MIN_TOKENS_FLOOR, tokens), tokens


class PlainAgent:
    """The base model without zooming (``mode="never"``) at a fixed visual-token budget.

    Args:
        model: the loaded model.
        tokens: max visual tokens of the single view; min is ``min(256, tokens)``.
        name: the agent's name in results.
        max_new_tokens: decoding budget.
    """

    def __init__(self, model: QZoomModel, tokens: int, name: str, max_new_tokens: int = 8) -> None:
        self.model = model
        self.budget = budget_for(tokens)
        self.name = name
        self.max_new_tokens = max_new_tokens

    def run(self, image: Any, question: str) -> AgentResult:
        """Answer once from one view at the agent's budget."""
        t0 = time.perf_counter()
        ans = self.model.answer(image, question, mode="never", max_new_tokens=self.max_new_tokens,
                                budget=self.budget)
        return AgentResult(
            answer=ans.text,
            latency_s=time.perf_counter() - t0,
            visual_tokens=ans.visual_tokens,
            forward_passes=ans.forward_passes,
            generated_tokens=ans.generated_tokens,
            zooms=int(ans.zoomed),
            gate_score=ans.gate_score,
            bbox=ans.bbox.to_json() if ans.bbox else None,
        )


DEFAULT_QZOOM_TOKENS = 576  # global view of the Q-Zoom agents


class QZoomAgent:
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
        self.model, self.mode, self.name, self.max_new_tokens = model, mode, name, max_new_tokens
        self.budget = budget_for(tokens)

    def run(self, image: Any, question: str) -> AgentResult:
        """Answer once; the zoom, when taken, is part of the same answer (no tool call)."""
        t0 = time.perf_counter()
        ans = self.model.answer(image, question, mode=self.mode, max_new_tokens=self.max_new_tokens,
                                budget=self.budget)
        return AgentResult(
            answer=ans.text, latency_s=time.perf_counter() - t0, visual_tokens=ans.visual_tokens,
            forward_passes=ans.forward_passes, generated_tokens=ans.generated_tokens, zooms=int(ans.zoomed),
            gate_score=ans.gate_score, bbox=ans.bbox.to_json() if ans.bbox else None,
        )


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
        from ..bench.oracle import ORACLE_TOKENS, oracle_view
        from ..images import load_image

        if target_box is None:
            raise ValueError("the oracle agent needs the benchmark's target box")
        t0 = time.perf_counter()
        view = oracle_view(load_image(image), target_box)
        ans = self.model.answer(view, question, mode="never", max_new_tokens=self.max_new_tokens,
                                budget=(4, ORACLE_TOKENS))
        return AgentResult(answer=ans.text, latency_s=time.perf_counter() - t0, visual_tokens=ans.visual_tokens,
                           forward_passes=ans.forward_passes, generated_tokens=ans.generated_tokens)


@dataclass
class AgentContext:
    """What factories build agents from: one model shared by every agent of a run, and the run's settings."""

    model: QZoomModel
    lowres_tokens: int = DEFAULT_LOWRES_TOKENS
    highres_tokens: int = DEFAULT_HIGHRES_TOKENS
    max_new_tokens: int = 8
    qzoom_tokens: int = DEFAULT_QZOOM_TOKENS


QZOOM_MODES = {"qzoom": "auto", "qzoom-always": "always", "qzoom-never": "never"}  # agent name -> answer mode

Factory = Callable[[AgentContext, str], Agent]
ParamFactory = Callable[[AgentContext, str, str], Agent]

# name -> factory(context, name); the one place fixed agent names are defined.
FACTORIES: dict[str, Factory] = {
    "lowres": lambda ctx, name: PlainAgent(ctx.model, ctx.lowres_tokens, name, ctx.max_new_tokens),
    "highres": lambda ctx, name: PlainAgent(ctx.model, ctx.highres_tokens, name, ctx.max_new_tokens),
    "oracle": lambda ctx, name: OracleAgent(ctx.model, name, ctx.max_new_tokens),
    **{fixed: (lambda ctx, name, mode=mode: QZoomAgent(ctx.model, mode, ctx.qzoom_tokens, name, ctx.max_new_tokens))
       for fixed, mode in QZOOM_MODES.items()},
    "deepeyes": lambda ctx, name: _deepeyes(ctx, name, ctx.qzoom_tokens),
}


def _positive_int(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{what} must be a positive integer, got {text!r}") from None
    if value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value}")
    return value


def _budget_check(prefix: str) -> Callable[[str], None]:
    def check(arg: str) -> None:
        _positive_int(arg, f"the token budget in {prefix}@TOKENS")

    return check


def _deepeyes(ctx: AgentContext, name: str, tokens: int) -> Agent:
    from .deepeyes_agent import DeepEyesAgent  # it builds on this module

    return DeepEyesAgent(ctx.model, tokens, name)


def _qzoom_factory(mode: str) -> ParamFactory:
    return lambda ctx, name, arg: QZoomAgent(ctx.model, mode, int(arg), name, ctx.max_new_tokens)


# prefix -> (argument check raising ValueError, factory(context, name, argument)) for ``prefix@argument`` names.
# ``qzoom@576`` is the gated agent at a 576-token global view; the plain ``qzoom`` name uses --qzoom-tokens.
PARAM_FACTORIES: dict[str, tuple[Callable[[str], None], ParamFactory]] = {
    "plain": (_budget_check("plain"),
              lambda ctx, name, arg: PlainAgent(ctx.model, int(arg), name, ctx.max_new_tokens)),
    **{prefix: (_budget_check(prefix), _qzoom_factory(mode)) for prefix, mode in QZOOM_MODES.items()},
    "deepeyes": (_budget_check("deepeyes"), lambda ctx, name, arg: _deepeyes(ctx, name, int(arg))),
}


def agent_tokens(name: str, ctx_tokens: dict[str, int]) -> int | None:
    """The max visual tokens of agent ``name``'s (global) view, or None for agents without a fixed budget.

    Args:
        name: an agent name, fixed or ``prefix@TOKENS``.
        ctx_tokens: the run's tokens for fixed names, e.g. ``{"lowres": 256, "highres": 4096, "qzoom": 576}``.

    Examples:
        >>> agent_tokens("qzoom@256", {}), agent_tokens("qzoom-always", {"qzoom": 576}), agent_tokens("oracle", {})
        (256, 576, None)
    """
    prefix, sep, arg = name.partition("@")
    if sep and prefix in PARAM_FACTORIES:
        return int(arg)
    if name in QZOOM_MODES or name == "deepeyes":
        return ctx_tokens.get("qzoom")
    return ctx_tokens.get(name)


def known_agents() -> list[str]:
    """Agent names and name patterns, for error messages."""
    return [*FACTORIES, *(f"{prefix}@N" for prefix in PARAM_FACTORIES)]


def check_agent_name(name: str) -> None:
    """Raise ValueError with the known names unless ``name`` is a valid agent name."""
    if name in FACTORIES:
        return
    prefix, sep, arg = name.partition("@")
    if sep and prefix in PARAM_FACTORIES:
        PARAM_FACTORIES[prefix][0](arg)
        return
    raise ValueError(f"unknown agent {name!r}; choose from {', '.join(known_agents())}")


def make_agent(name: str, ctx: AgentContext) -> Agent:
    """Build the agent called ``name``.

    Raises:
        ValueError: an unknown name or a bad argument.
    """
    check_agent_name(name)
    if name in FACTORIES:
        return FACTORIES[name](ctx, name)
    prefix, _, arg = name.partition("@")
    return PARAM_FACTORIES[prefix][1](ctx, name, arg)


def parse_budgets(text: str) -> list[int]:
    """Parse ``"256,576,1024"`` into distinct positive budgets.

    Examples:
        >>> parse_budgets("256, 1024")
        [256, 1024]

    Raises:
        ValueError: empty items, non-integers, values < 1 or repeats.
    """
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in items):
        raise ValueError(f"--budgets must be comma-separated positive integers like 256,1024,4096, got {text!r}")
    budgets = [_positive_int(t, "each --budgets value") for t in items]
    if len(set(budgets)) != len(budgets):
        raise ValueError(f"--budgets has repeated values: {text!r}")
    return budgets
