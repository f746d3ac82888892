"""Agent names for `compare`: one table from names to factories, and the checks on names and budgets.

New agents are added by writing a class with ``name`` and ``run`` (`agents.Agent`) and one entry in
:data:`FACTORIES` (fixed names) or :data:`PARAM_FACTORIES` (``prefix@argument`` names such as ``plain@1024``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..checks import int_at_least
from .agents import Agent, OracleAgent, PlainAgent, QZoomAgent

if TYPE_CHECKING:
    from ..model import QZoomModel

DEFAULT_LOWRES_TOKENS = 256
DEFAULT_HIGHRES_TOKENS = 4096
DEFAULT_QZOOM_TOKENS = 576  # global view of the Q-Zoom agents
BUNDLED_CROP_POLICY = "zoomworld-tiny-deepeyes"  # the bundled base trained as a DeepEyes-format policy


@dataclass
class AgentContext:
    """What factories build agents from: one model shared by every agent of a run, and the run's settings."""

    model: QZoomModel
    lowres_tokens: int = DEFAULT_LOWRES_TOKENS
    highres_tokens: int = DEFAULT_HIGHRES_TOKENS
    max_new_tokens: int = 8
    qzoom_tokens: int = DEFAULT_QZOOM_TOKENS
    policy: str | None = None  # the tool-calling policy of ``qzoom-tool`` (default: the bundled one)
    crop_policy: str | None = None  # the external-crop policy of ``deepeyes*`` (default: see `crop_policy_for`)
    min_tokens: int | None = None  # a task's minimum view tokens (its preset), in place of `config.budget_for`'s
    thresholds_at: Callable[[int], dict[str, float]] | None = None  # a Q-Zoom agent's thresholds by its view tokens
    loaded: dict = field(default_factory=dict)  # policy models by name, loaded once and shared between agents

    def load(self, name: str) -> QZoomModel:
        """The model or policy ``name`` on the run's device, loaded once per run."""
        from ..model import QZoomModel

        if name not in self.loaded:
            a = self.model.adapter
            self.loaded[name] = QZoomModel.from_pretrained(name, device=a.device, dtype=a.dtype)
        return self.loaded[name]


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
    "deepeyes-cached": lambda ctx, name: _deepeyes(ctx, name, ctx.qzoom_tokens, cached=True),
    "qzoom-tool": lambda ctx, name: _qzoom_tool(ctx, name),
    "vicrop": lambda ctx, name: _vicrop(ctx, name),
    "zoomeye": lambda ctx, name: _zoomeye(ctx, name),
}


def _qzoom_tool(ctx: AgentContext, name: str) -> Agent:
    from .tool_agent import DEFAULT_POLICY, QZoomToolAgent

    return QZoomToolAgent(ctx.load(ctx.policy or DEFAULT_POLICY), name)


def crop_policy_for(ctx: AgentContext) -> str | None:
    """The external-crop policy the ``deepeyes*`` agents run: ``ctx.crop_policy`` when given, else the bundled
    ``zoomworld-tiny-deepeyes`` when the run's model is the bundled base it was trained from, else None (the run's
    model itself is the policy, e.g. a DeepEyes checkpoint given by path)."""
    from ..loading import resolve_model_path
    from ..policy import is_policy

    if ctx.crop_policy:
        return ctx.crop_policy
    bundled = ctx.model.path is not None and ctx.model.path.resolve() == resolve_model_path("zoomworld-tiny").resolve()
    return BUNDLED_CROP_POLICY if bundled and is_policy(BUNDLED_CROP_POLICY) else None


def _budget_check(prefix: str) -> Callable[[str], None]:
    def check(arg: str) -> None:
        int_at_least(arg, 1, f"the token budget in {prefix}@TOKENS")

    return check


def _deepeyes(ctx: AgentContext, name: str, tokens: int, *, cached: bool = False) -> Agent:
    from .crop_agent import ExternalCropAgent
    from .deepeyes_agent import deepeyes_preset

    policy = crop_policy_for(ctx)
    model = ctx.load(policy) if policy else ctx.model
    return ExternalCropAgent(model, tokens, name, cached=cached, **deepeyes_preset(model))


def _crop(ctx: AgentContext, name: str, dialect: str) -> Agent:
    from .crop_agent import ExternalCropAgent

    return ExternalCropAgent(ctx.model, ctx.qzoom_tokens, name, dialect=dialect, list_tools=True)


def _check_dialect(arg: str) -> None:
    from ..tools.dialects import DIALECTS

    if arg not in DIALECTS:
        raise ValueError(f"unknown dialect in crop@{arg}; choose from {', '.join(DIALECTS)}")


def _vicrop(ctx: AgentContext, name: str) -> Agent:
    from .vicrop_agent import ViCropAgent

    return ViCropAgent(ctx.model, ctx.qzoom_tokens, name, max_new_tokens=ctx.max_new_tokens)


def _zoomeye(ctx: AgentContext, name: str) -> Agent:
    from .zoomeye_agent import ZoomEyeAgent

    return ZoomEyeAgent(ctx.model, ctx.qzoom_tokens, name, max_new_tokens=ctx.max_new_tokens)


def _qzoom_factory(mode: str) -> ParamFactory:
    return lambda ctx, name, arg: QZoomAgent(ctx.model, mode, int(arg), name, ctx.max_new_tokens)


# prefix -> (argument check raising ValueError, factory(context, name, argument)) for ``prefix@argument`` names.
# ``qzoom@576`` is the gated agent at a 576-token global view; the plain ``qzoom`` name uses --qzoom-tokens.
PARAM_FACTORIES: dict[str, tuple[Callable[[str], None], ParamFactory]] = {
    "plain": (_budget_check("plain"),
              lambda ctx, name, arg: PlainAgent(ctx.model, int(arg), name, ctx.max_new_tokens)),
    **{prefix: (_budget_check(prefix), _qzoom_factory(mode)) for prefix, mode in QZOOM_MODES.items()},
    "deepeyes": (_budget_check("deepeyes"), lambda ctx, name, arg: _deepeyes(ctx, name, int(arg))),
    "deepeyes-cached": (_budget_check("deepeyes-cached"),
                        lambda ctx, name, arg: _deepeyes(ctx, name, int(arg), cached=True)),
    # an external-crop agent in any dialect with its reference prompt, e.g. crop@minio3 (policies by --model)
    "crop": (_check_dialect, lambda ctx, name, arg: _crop(ctx, name, arg)),
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
        return int(arg) if arg.isdigit() else ctx_tokens.get("qzoom")
    if name in QZOOM_MODES or name in ("deepeyes", "deepeyes-cached", "qzoom-tool", "vicrop", "zoomeye"):
        return ctx_tokens.get("qzoom")
    return ctx_tokens.get(name)


def known_agents() -> list[str]:
    """Agent names and name patterns, for error messages."""
    return [*FACTORIES, *(f"{prefix}@{'DIALECT' if prefix == 'crop' else 'N'}" for prefix in PARAM_FACTORIES)]


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
    """Build the agent called ``name``. With ``ctx.min_tokens`` set, an agent with a view budget ``(lo, hi)`` gets
    ``(min(ctx.min_tokens, hi), hi)``: a benchmark's own minimum (e.g. 512 tokens on V*), capped by the budget.
    With ``ctx.thresholds_at``, a Q-Zoom agent answers under the thresholds of its view's size.

    Raises:
        ValueError: an unknown name or a bad argument.
    """
    check_agent_name(name)
    if name in FACTORIES:
        agent = FACTORIES[name](ctx, name)
    else:
        prefix, _, arg = name.partition("@")
        agent = PARAM_FACTORIES[prefix][1](ctx, name, arg)
    budget = getattr(agent, "budget", None)
    if ctx.min_tokens is not None and budget is not None:  # the task's floor, as its released evaluation sets it
        agent.budget = (min(ctx.min_tokens, budget[1]), budget[1])  # type: ignore[attr-defined]
    if ctx.thresholds_at is not None and isinstance(agent, QZoomAgent):
        agent.thresholds = ctx.thresholds_at(agent.budget[1])
    return agent


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
