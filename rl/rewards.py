"""Reward functions for thinking-with-images GRPO with TRL's ``GRPOTrainer``.

Each reward takes TRL's keyword arguments (``completions``, the dataset columns ``answer``, ``options``, ``kind``,
``target_box``, and ``environments`` when an ``environment_factory`` is used) and returns one float, or None where it
does not apply, per completion. The YAML keys that name them:

- ``accuracy``: 1/0 by :func:`qzoom_agent.scoring.is_correct` (normalised match, multiple-choice letters in any form).
- ``exact_accuracy``: 1/0 by exact string match after stripping.
- ``judge_accuracy``: a pluggable judge's score in [0, 1] (:func:`make_judge_reward`).
- ``format``: 1/0, whether the episode is well formed (calls, then one final answer, no unparsed call text).
- ``tool_bonus``: DeepEyes' conditional tool reward (arXiv 2505.14362): 1 only when the answer is correct *and* at
  least one call succeeded, so calls are rewarded for helping, never for their own sake.
- ``call_cost``: minus the number of calls, failed ones included; the weight is the price per call.
- ``curiosity``: Pixel-Reasoner's curiosity bonus and efficiency penalty (arXiv 2505.15966), per GRPO group.
- ``box_coverage``: the best share of the ground-truth target box inside a successful call's box.

Every reward reads only the rollout's text, the dataset columns and the environment's counters; none reads the
policy's hidden state or logits, so they work unchanged with vLLM generation.
"""

from __future__ import annotations

import logging
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from qzoom_agent.boxes import coverage
from qzoom_agent.scoring import is_correct

logger = logging.getLogger(__name__)

Completion = str | Sequence[Mapping[str, Any]]
Judge = Callable[[str, str, Sequence[str] | None], float]
Rewards = list[float | None]

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK_TAG = re.compile(r"<think>.*?</think>", re.DOTALL)
# TRL turns a tool that raised into a tool message whose content is ``str({"error": ...})``.
_TRL_ERROR = "{'error':"


def _text(content: Any) -> str:
    """A message content's text: the string itself, or its text blocks joined (images are skipped)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(str(b.get("text", "")) for b in content if isinstance(b, Mapping) and b.get("type") == "text")


def _messages(completion: Completion) -> list[Mapping[str, Any]]:
    if isinstance(completion, str):
        return [{"role": "assistant", "content": completion}]
    return [m for m in completion if isinstance(m, Mapping)]


def _column(values: Sequence[Any] | None, n: int) -> list[Any]:
    """A dataset column aligned with the completions; an absent column reads as None for every row."""
    if values is None:
        return [None] * n
    if len(values) != n:
        raise ValueError(f"column has {len(values)} rows for {n} completions")
    return list(values)


def final_answer(completion: Completion) -> str:
    """The final answer of an episode: the last assistant message's text, stripped.

    The inside of the last ``<answer>...</answer>`` tag is taken when there is one, else the text without its
    ``<think>...</think>`` blocks. An episode whose last assistant message still requests tool calls (TRL stopped it
    at ``max_tool_calling_iterations`` or at the length budget) never answered, so its answer is ``""``.

    Args:
        completion: a conversational completion (list of messages) or a plain string.

    Returns:
        The answer text, possibly empty.

    Examples:
        >>> final_answer([{"role": "assistant", "content": "", "tool_calls": [{"type": "function"}]},
        ...               {"role": "tool", "name": "zoom", "content": "ok"},
        ...               {"role": "assistant", "content": [{"type": "text", "text": "It is <answer> 42 </answer>"}]}])
        '42'
        >>> final_answer("<think>left or right?</think> Left.")
        'Left.'
    """
    assistants = [m for m in _messages(completion) if m.get("role") == "assistant"]
    if not assistants or assistants[-1].get("tool_calls"):
        return ""
    text = _text(assistants[-1].get("content"))
    tags = _ANSWER_TAG.findall(text)
    return (tags[-1] if tags else _THINK_TAG.sub("", text)).strip()


def _usage(completion: Completion, env: Any) -> tuple[int, int]:
    """(calls made, calls that succeeded) from the environment, else from the messages."""
    if env is not None:
        calls = int(env.calls)
        return calls, calls - int(env.failed_calls)
    messages = _messages(completion)
    requested = sum(len(m.get("tool_calls") or []) for m in messages if m.get("role") == "assistant")
    responses = [_text(m.get("content")) for m in messages if m.get("role") == "tool"]
    # Without an environment, a call failed when TRL answered it with its error dict or never ran it (cut off).
    return max(requested, len(responses)), sum(not r.startswith(_TRL_ERROR) for r in responses)


def _correct(completion: Completion, answer: Any, options: Sequence[str] | None) -> bool:
    prediction = final_answer(completion)
    return bool(prediction) and is_correct(prediction, str(answer), options)  # an empty answer is never right


def accuracy(completions: Sequence[Completion], answer: Sequence[Any], options: Sequence[Any] | None = None,
             **kwargs: Any) -> Rewards:
    """1.0 when the final answer is correct by :func:`~qzoom_agent.scoring.is_correct`, else 0.0; None without answer.

    Args:
        completions: the rollouts.
        answer: the reference answers (for multiple choice, the option letter).
        options: per row, the option texts of a multiple-choice question or None.
        **kwargs: TRL's other arguments, ignored.

    Returns:
        One reward per completion.

    Examples:
        >>> accuracy(["(B) 7X", "A", "x"], answer=["B", "B", None], options=[["7K", "7X"], ["7K", "7X"], None])
        [1.0, 0.0, None]
    """
    rows = zip(completions, answer, _column(options, len(completions)), strict=True)
    return [None if a is None else float(_correct(c, a, o)) for c, a, o in rows]


def exact_accuracy(completions: Sequence[Completion], answer: Sequence[Any], **kwargs: Any) -> Rewards:
    """1.0 when the final answer equals the reference after stripping whitespace, else 0.0; None without answer.

    Examples:
        >>> exact_accuracy(["Left", "left", "Left"], answer=["Left ", "Left", None])
        [1.0, 0.0, None]
    """
    rows = zip(completions, answer, strict=True)
    return [None if a is None else float(final_answer(c) == str(a).strip()) for c, a in rows]


def make_judge_reward(judge: Judge, name: str = "judge_accuracy") -> Callable[..., Rewards]:
    """A reward scoring each final answer with ``judge(prediction, answer, options)``, clipped to [0, 1].

    A judge that raises or returns a non-finite score gives None for that row (logged, never raised), so one bad
    judgement drops a sample instead of stopping the run.

    Args:
        judge: the scorer, e.g. an LLM judge or a fuzzy matcher.
        name: the reward's ``__name__``, which TRL logs as ``rewards/<name>/mean``.

    Returns:
        The reward function.

    Examples:
        >>> reward = make_judge_reward(lambda pred, ans, opts: 2.0 if ans in pred else -1.0)
        >>> reward.__name__, reward(["a red car", "blue"], answer=["red", "red"])
        ('judge_accuracy', [1.0, 0.0])
    """

    def reward(completions: Sequence[Completion], answer: Sequence[Any], options: Sequence[Any] | None = None,
               **kwargs: Any) -> Rewards:
        out: Rewards = []
        for c, a, o in zip(completions, answer, _column(options, len(completions)), strict=True):
            score = None
            if a is not None:
                try:
                    score = float(judge(final_answer(c), str(a), o))
                except Exception:
                    logger.warning("judge %r failed; reward None for this sample", name, exc_info=True)
                if score is not None and not math.isfinite(score):
                    logger.warning("judge %r returned %r; reward None for this sample", name, score)
                    score = None
            out.append(None if score is None else min(max(score, 0.0), 1.0))
        return out

    reward.__name__ = reward.__qualname__ = name
    return reward


def format_reward(completions: Sequence[Completion], **kwargs: Any) -> Rewards:
    """1.0 when the episode is well formed, else 0.0.

    Well formed: every assistant turn before the last carries tool calls, and the last one makes no call, has a
    non-empty :func:`final_answer`, and keeps no raw ``<tool_call>`` text (a call TRL could not parse).

    Examples:
        >>> call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function"}]}
        >>> format_reward([[call, {"role": "tool", "content": "ok"}, {"role": "assistant", "content": "B"}],
        ...                ["<tool_call>{bad json</tool_call>"], [call]])
        [1.0, 0.0, 0.0]
    """
    out: Rewards = []
    for completion in completions:
        turns = [m for m in _messages(completion) if m.get("role") == "assistant"]
        ok = (bool(turns) and all(m.get("tool_calls") for m in turns[:-1]) and bool(final_answer(completion))
              and "<tool_call>" not in _text(turns[-1].get("content")))
        out.append(float(ok))
    return out


def tool_bonus(completions: Sequence[Completion], answer: Sequence[Any], environments: Sequence[Any] | None = None,
               options: Sequence[Any] | None = None, **kwargs: Any) -> Rewards:
    """DeepEyes' conditional tool reward: 1.0 when the answer is correct and a call succeeded, else 0.0.

    Examples:
        >>> from types import SimpleNamespace as Env
        >>> tool_bonus(["B", "B", "A"], answer=["B", "B", "B"], options=[["x", "y"]] * 3,
        ...            environments=[Env(calls=2, failed_calls=1), Env(calls=1, failed_calls=1), Env(calls=1,
        ...                          failed_calls=0)])
        [1.0, 0.0, 0.0]
    """
    n = len(completions)
    rows = zip(completions, answer, _column(options, n), _column(environments, n), strict=True)
    return [None if a is None else float(_correct(c, a, o) and _usage(c, e)[1] > 0) for c, a, o, e in rows]


def call_cost(completions: Sequence[Completion], environments: Sequence[Any] | None = None,
              **kwargs: Any) -> Rewards:
    """Minus the number of tool calls, failed ones included; the YAML weight is the price of one call.

    Examples:
        >>> from types import SimpleNamespace as Env
        >>> call_cost(["A", "B"], environments=[Env(calls=2, failed_calls=1), Env(calls=0, failed_calls=0)])
        [-2.0, 0.0]
    """
    rows = zip(completions, _column(environments, len(completions)), strict=True)
    return [float(-_usage(c, e)[0]) for c, e in rows]


def curiosity_bonus(call_counts: Sequence[int], num_generations: int, target_rate: float = 0.3, max_calls: int = 1,
                    penalty: float = 0.05, explore: Sequence[bool] | None = None) -> list[float]:
    """Pixel-Reasoner's curiosity reward (Wang et al., arXiv 2505.15966, eq. for r_curiosity and r_penalty).

    For each consecutive block of ``num_generations`` rows (one GRPO group, one prompt), RaPR is the share of rows
    with at least one call, and row i gets ``max(target_rate - RaPR, 0) * 1{n_i > 0} - penalty * max(n_i - max_calls,
    0)``: tool use is encouraged while the group uses tools less often than ``target_rate``, and calls beyond
    ``max_calls`` cost ``penalty`` each. The paper weighs the two terms separately; here the YAML weight scales both,
    so the effective price of an extra call is ``weight * penalty``. Rows whose ``explore`` is False get the penalty
    only.

    Args:
        call_counts: the number of (successful) calls per row, grouped by prompt.
        num_generations: the group size; must divide ``len(call_counts)``.
        target_rate: the target rate H of tool-using responses.
        max_calls: calls allowed before the penalty starts.
        penalty: the cost of each call beyond ``max_calls``.
        explore: per row, whether the curiosity bonus may apply (default: every row).

    Returns:
        One reward per row.

    Examples:
        >>> curiosity_bonus([1, 0, 0, 0, 3, 2, 0, 0], num_generations=4, target_rate=0.5, penalty=0.25)
        [0.25, 0.0, 0.0, 0.0, -0.5, -0.25, 0.0, 0.0]
    """
    n = len(call_counts)
    if num_generations < 1 or n % num_generations:
        raise ValueError(f"{n} rows do not split into groups of num_generations={num_generations}; the curiosity "
                         "reward needs each process's batch to hold whole GRPO groups")
    allowed = [True] * n if explore is None else list(explore)
    out = []
    for start in range(0, n, num_generations):
        group = call_counts[start:start + num_generations]
        bonus = max(target_rate - sum(c > 0 for c in group) / num_generations, 0.0)
        for i, c in enumerate(group, start):
            out.append(bonus * (c > 0 and allowed[i]) - penalty * max(c - max_calls, 0))
    return out


def make_curiosity_reward(num_generations: int, target_rate: float = 0.3, max_calls: int = 1,
                          penalty: float = 0.05) -> Callable[..., Rewards]:
    """The ``curiosity`` reward: :func:`curiosity_bonus` over each rollout's successful calls.

    A failed call shows the model no pixels, so it does not count as pixel-space reasoning (``call_cost`` charges
    it). Rows of ``kind == "coarse"`` questions, which need no zoom, get no bonus, only the penalty (a choice of this
    project, not the paper's). TRL lays out completions group by group, so consecutive blocks are GRPO groups; with
    several processes, each process's generation batch must hold whole groups, else the reward raises ValueError.

    Args:
        num_generations: GRPO's group size.
        target_rate: the target rate H of tool-using responses (0.3 by default).
        max_calls: calls allowed before the penalty starts.
        penalty: the cost of each call beyond ``max_calls``.

    Returns:
        The reward function, named ``curiosity``; it logs the batch's tool-use rate as ``curiosity/tool_rate``.

    Examples:
        >>> reward = make_curiosity_reward(num_generations=2, target_rate=1.0)
        >>> reward.__name__, reward([[{"role": "assistant", "content": "", "tool_calls": [{}]},
        ...                            {"role": "tool", "content": "crop"}, {"role": "assistant", "content": "7"}],
        ...                           "7", "7", "7"], kind=["fine", "fine", "coarse", "coarse"])
        ('curiosity', [0.5, 0.0, 0.0, 0.0])
    """
    if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 1:
        raise ValueError(f"num_generations must be a positive int, got {num_generations!r}")
    if not (isinstance(max_calls, int) and not isinstance(max_calls, bool) and max_calls >= 0):
        raise ValueError(f"max_calls must be an int >= 0, got {max_calls!r}")
    if not 0.0 <= target_rate <= 1.0 or not (math.isfinite(penalty) and penalty >= 0):
        raise ValueError(f"need 0 <= target_rate <= 1 and a finite penalty >= 0, got {target_rate!r}, {penalty!r}")

    def curiosity(completions: Sequence[Completion], environments: Sequence[Any] | None = None,
                  kind: Sequence[Any] | None = None, log_metric: Callable[[str, float], None] | None = None,
                  **kwargs: Any) -> Rewards:
        n = len(completions)
        used = [_usage(c, e)[1] for c, e in zip(completions, _column(environments, n), strict=True)]
        if log_metric is not None and n:
            log_metric("curiosity/tool_rate", sum(u > 0 for u in used) / n)  # RaPR over the batch
        explore = [k != "coarse" for k in _column(kind, n)]
        return list(curiosity_bonus(used, num_generations, target_rate, max_calls, penalty, explore))

    return curiosity


def box_coverage(completions: Sequence[Completion], target_box: Sequence[Any] | None = None,
                 environments: Sequence[Any] | None = None, **kwargs: Any) -> Rewards:
    """The best share of the target box inside any successful call's box, ``|box ∩ target| / |target|``.

    0.0 when the rollout made no successful call; None for a row without a (non-empty) target box and for every row
    when there are no environments (the boxes are read from ``environments[i].boxes``, source pixels).

    Examples:
        >>> from types import SimpleNamespace as Env
        >>> box_coverage(["A", "B", "C"], target_box=[[10, 10, 20, 20], [0, 0, 4, 4], None],
        ...              environments=[Env(boxes=[None, [15, 0, 100, 100]]), Env(boxes=[None]), Env(boxes=[])])
        [0.5, 0.0, None]
    """
    n = len(completions)
    if environments is None:
        return [None] * n
    out: Rewards = []
    for target, env in zip(_column(target_box, n), _column(environments, n), strict=True):
        if target is None or coverage(target, target) is None:  # coverage is None for an empty target
            out.append(None)
            continue
        shares = [coverage(box, target) for box in (getattr(env, "boxes", None) or []) if box is not None]
        out.append(max((s for s in shares if s is not None), default=0.0))
    return out


REWARDS: dict[str, Callable[..., Rewards]] = {
    "accuracy": accuracy, "exact_accuracy": exact_accuracy, "format": format_reward, "tool_bonus": tool_bonus,
    "call_cost": call_cost, "box_coverage": box_coverage,
}
# The order of TRL's reward_funcs, whatever the order of the YAML mapping.
_ORDER = ("accuracy", "exact_accuracy", "judge_accuracy", "format", "tool_bonus", "call_cost", "curiosity",
          "box_coverage")
_CURIOSITY_KEYS = ("target_rate", "max_calls", "penalty")


def _named(fn: Callable[..., Rewards], name: str) -> Callable[..., Rewards]:
    """``fn`` under the name TRL logs (``get_callable_name`` reads ``__name__``, so a plain alias will not do)."""
    if fn.__name__ == name:
        return fn

    def reward(*args: Any, **kwargs: Any) -> Rewards:
        return fn(*args, **kwargs)

    reward.__name__ = reward.__qualname__ = name
    reward.__doc__ = fn.__doc__
    return reward


def build_rewards(weights: Mapping[str, float], *, num_generations: int, judge: Judge | None = None,
                  curiosity: Mapping[str, float] | None = None) -> tuple[list[Callable[..., Rewards]], list[float]]:
    """TRL's ``reward_funcs`` and ``reward_weights`` from a YAML mapping of reward names to weights.

    Args:
        weights: reward name -> weight; names are the keys of :data:`REWARDS`, ``"curiosity"`` and
            ``"judge_accuracy"``.
        num_generations: GRPO's group size (used by ``curiosity``).
        judge: the scorer behind ``judge_accuracy``; required when it is named.
        curiosity: optional ``target_rate``, ``max_calls``, ``penalty`` for :func:`make_curiosity_reward`.

    Returns:
        The functions, each with ``__name__`` equal to its key, in a fixed order, and their weights.

    Examples:
        >>> funcs, w = build_rewards({"format": 0.5, "accuracy": 1}, num_generations=4)
        >>> [f.__name__ for f in funcs], w
        (['accuracy', 'format'], [1.0, 0.5])
    """
    if not weights:
        raise ValueError(f"no rewards given; valid names: {', '.join(_ORDER)}")
    unknown = sorted(set(weights) - set(_ORDER))
    if unknown:
        raise ValueError(f"unknown reward(s) {unknown}; valid names: {', '.join(_ORDER)}")
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ValueError(f"weight of reward {name!r} must be a finite number, got {w!r}")
    settings = dict(curiosity or {})
    if set(settings) - set(_CURIOSITY_KEYS):
        raise ValueError(f"unknown curiosity setting(s) {sorted(set(settings) - set(_CURIOSITY_KEYS))}; "
                         f"valid: {', '.join(_CURIOSITY_KEYS)}")
    funcs = []
    for name in (n for n in _ORDER if n in weights):
        if name == "curiosity":
            funcs.append(make_curiosity_reward(num_generations, **settings))
        elif name == "judge_accuracy":
            if judge is None:
                raise ValueError("reward 'judge_accuracy' needs a judge: build_rewards(..., judge=callable)")
            funcs.append(make_judge_reward(judge, name))
        else:
            funcs.append(_named(REWARDS[name], name))
    return funcs, [float(weights[f.__name__]) for f in funcs]
