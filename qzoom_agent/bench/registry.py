"""Agent names for `compare`: one table from names to factories, and the checks on names and budgets.

New agents are added by writing a class with ``name`` and ``run`` (`agents.Agent`) and one entry in
:data:`FACTORIES` (fixed names) or :data:`PARAM_FACTORIES` (``prefix@argument`` names such as ``plain@1024``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..checks import int_at_least
from .agents import Agent, OracleAgent, PlainAgent, QZoomAgent
from .deepeyes_agent import DeepEyesAgent

if TYPE_CHECKING:
    from ..model import QZoomModel

DEFAULT_LOWRES_TOKENS = 256
DEFAULT_HIGHRES_TOKENS = 4096
DEFAULT_QZOOM_TOKENS = 576  # global view of the Q-Zoom agents


@dataclass
class AgentContext:
    """What factories build agents from: one model shared by every agent of a run, and the run's settings."""

    model: QZoomModel
    lowres_tokens: int = DEFAULT_LOWRES_TOKENS
    highres_tokens: int = DEFAULT_HIGHRES_TOKENS
    max_new_tokens: int = 8
    qzoom_tokens: int = DEFAULT_QZOOM_TOKENS
    policy: str | None = None  # the tool-calling policy of ``qzoom-tool`` (default: the bundled one)


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
    "qzoom-tool": lambda ctx, name: _qzoom_tool(ctx, name),
}


def _qzoom_tool(ctx: AgentContext, name: str) -> Agent:
    from ..model import QZoomModel
    from .tool_agent import DEFAULT_POLICY, QZoomToolAgent

    policy = ctx.policy or DEFAULT_POLICY
    model = QZoomModel.from_pretrained(policy, device=ctx.model.adapter.device, dtype=ctx.model.adapter.dtype)
    return QZoomToolAgent(model, name)


def _budget_check(prefix: str) -> Callable[[str], None]:
    def check(arg: str) -> None:
        int_at_least(arg, 1, f"the token budget in {prefix}@TOKENS")

    return check


def _deepeyes(ctx: AgentContext, name: str, tokens: int) -> Agent:
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
    budgets = [int_at_least(t, 1, "each --budgets value") for t in items]
    if len(set(budgets)) != len(budgets):
        raise ValueError(f"--budgets has repeated values: {text!r}")
    return budgets
