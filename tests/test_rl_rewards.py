"""Tests for qzoom_agent.rl.rewards: the GRPO reward functions, the curiosity bonus and build_rewards."""

from __future__ import annotations

import doctest
import logging
import math
from types import SimpleNamespace

import pytest
import qzoom_agent.rl.rewards as rewards
from qzoom_agent.rl.rewards import (
    REWARDS,
    accuracy,
    box_coverage,
    build_rewards,
    call_cost,
    curiosity_bonus,
    exact_accuracy,
    final_answer,
    format_reward,
    make_curiosity_reward,
    make_judge_reward,
    tool_bonus,
)

OPTIONS = ["7K", "7X", "QQ", "A1"]


def call(n: int = 1) -> dict:
    """An assistant turn requesting ``n`` zoom calls."""
    fn = {"type": "function", "function": {"name": "zoom", "arguments": {"x1": 0, "y1": 0, "x2": 8, "y2": 8}}}
    return {"role": "assistant", "content": "<think>zoom</think>", "tool_calls": [fn] * n}


def tool(ok: bool = True) -> dict:
    content = [{"type": "image", "image": None}, {"type": "text", "text": "crop"}] if ok else "{'error': 'bad box'}"
    return {"role": "tool", "name": "zoom", "content": content}


def answer_turn(text: str) -> dict:
    return {"role": "assistant", "content": text}


def env(calls: int = 0, failed: int = 0, boxes: list | None = None) -> SimpleNamespace:
    return SimpleNamespace(calls=calls, failed_calls=failed, boxes=boxes or [], image=None)


def trl_kwargs(completions: list, **columns) -> dict:
    """Everything GRPOTrainer passes to a reward function besides the dataset columns."""
    n = len(completions)
    base = dict(prompts=[[{"role": "user", "content": "q"}]] * n, completions=completions,
                completion_ids=[[1, 2]] * n, trainer_state=SimpleNamespace(global_step=3),
                log_extra=lambda column, values: None, log_metric=lambda name, value: None)
    return {**base, **columns}


def test_doctests_pass():
    result = doctest.testmod(rewards)
    assert result.failed == 0
    assert result.attempted >= 8


# --- final_answer --------------------------------------------------------------------------------------------------


def test_final_answer_forms():
    episode = [call(), tool(), {"role": "assistant", "content": [{"type": "text", "text": "<answer>a</answer> then"},
                                                                   {"type": "image", "image": None},
                                                                   {"type": "text", "text": "<answer> B </answer>"}]}]
    assert final_answer(episode) == "B"  # the last tag, across text blocks
    assert final_answer("  plain  ") == "plain"
    assert final_answer([answer_turn("<think>maybe A</think>\nC")]) == "C"
    assert final_answer([{"role": "assistant", "content": None}]) == ""
    assert final_answer([]) == ""


def test_final_answer_empty_when_episode_stops_on_a_call():
    assert final_answer([call(), tool(), {**call(), "content": "<answer>B</answer>"}]) == ""
    assert final_answer([call(), tool()]) == ""


# --- accuracy ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["B", "(B)", "b.", "B) 7X", "7x", "<answer>B</answer>"])
def test_accuracy_accepts_letter_forms(prediction):
    completion = [call(), tool(), answer_turn(prediction)]
    assert accuracy([completion], answer=["B"], options=[OPTIONS]) == [1.0]


@pytest.mark.parametrize("prediction", ["A", "(C)", "7K", "B) QQ", ""])
def test_accuracy_rejects_wrong_options(prediction):
    assert accuracy([prediction], answer=["B"], options=[OPTIONS]) == [0.0]


def test_accuracy_free_text_none_answer_and_absent_options():
    assert accuracy([" \"Left.\" ", "right", "left"], answer=["left", "left", None]) == [1.0, 0.0, None]
    assert accuracy([""], answer=[""]) == [0.0]  # an empty answer never scores
    with pytest.raises(ValueError, match="rows"):
        accuracy(["a", "b"], answer=["a", "b"], options=[None])


def test_exact_accuracy_is_case_and_punctuation_sensitive():
    got = exact_accuracy([" Left ", "left", "Left.", [answer_turn("<answer>Left</answer>")], "x"],
                         answer=["Left", "Left", "Left", "Left", None])
    assert got == [1.0, 0.0, 0.0, 1.0, None]


# --- judge ---------------------------------------------------------------------------------------------------------


def test_judge_reward_clips_passes_options_and_names():
    seen = []

    def judge(prediction, answer, options):
        seen.append((prediction, answer, options))
        return {"good": 3.0, "half": 0.5}.get(prediction, -2.0)

    reward = make_judge_reward(judge, name="my_judge")
    assert reward.__name__ == "my_judge"
    got = reward(["good", "half", "bad", "skip"], answer=["a", "a", "a", None], options=[OPTIONS, None, None, None])
    assert got == [1.0, 0.5, 0.0, None]
    assert seen[0] == ("good", "a", OPTIONS) and len(seen) == 3  # no call for a missing answer


def test_judge_failures_give_none_and_are_logged(caplog):
    def judge(prediction, answer, options):
        if prediction == "boom":
            raise RuntimeError("judge down")
        return math.nan if prediction == "nan" else 1.0

    with caplog.at_level(logging.WARNING, logger=rewards.__name__):
        got = make_judge_reward(judge)(["boom", "nan", "ok"], answer=["a", "a", "a"])
    assert got == [None, None, 1.0]
    assert "judge down" in caplog.text and "nan" in caplog.text


# --- format --------------------------------------------------------------------------------------------------------


def test_format_reward():
    completions = [
        [call(), tool(), call(2), tool(), tool(), answer_turn("<answer>B</answer>")],  # well formed
        "B",  # no calls at all
        [answer_turn("thinking"), answer_turn("B")],  # an earlier turn without a call
        [call(), tool(), answer_turn("<tool_call>{broken</tool_call>")],  # unparsed call text
        [call(), tool(), answer_turn("<answer> </answer>")],  # empty answer
        [call(), tool(), call()],  # stopped on a call
        [call(), tool()],  # truncated after a tool result
        [],
    ]
    assert format_reward(completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


# --- tool bonus and call cost ----------------------------------------------------------------------------------------


def test_tool_bonus_with_environments():
    envs = [env(1), env(2, failed=2), env(0), env(3, failed=1), env(1)]
    got = tool_bonus(["B", "B", "B", "(B)", "A"], answer=["B", "B", "B", "B", None], options=[OPTIONS] * 5,
                     environments=envs)
    assert got == [1.0, 0.0, 0.0, 1.0, None]


def test_tool_bonus_without_environments_reads_messages():
    ok = [call(), tool(), answer_turn("B")]
    failed = [call(), tool(ok=False), answer_turn("B")]
    wrong = [call(), tool(), answer_turn("A")]
    assert tool_bonus([ok, failed, wrong, "B"], answer=["B"] * 4, options=[OPTIONS] * 4) == [1.0, 0.0, 0.0, 0.0]


def test_call_cost_counts_every_call():
    assert call_cost(["a", "b"], environments=[env(3, failed=2), env(0)]) == [-3.0, 0.0]
    no_tools = [[call(2), tool(), tool(ok=False), call(), tool(), answer_turn("B")], "B", [call(), tool(), call(3)]]
    assert call_cost(no_tools) == [-3.0, 0.0, -4.0]  # the unanswered final calls count too


# --- curiosity -----------------------------------------------------------------------------------------------------


def test_curiosity_bonus_is_per_group():
    got = curiosity_bonus([1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0], num_generations=4, target_rate=0.6, penalty=0.1)
    assert got[:4] == pytest.approx([0.35, 0, 0, 0])  # RaPR 0.25
    assert got[4:8] == pytest.approx([0.1, 0.1, 0, 0])  # RaPR 0.5: a different bonus
    assert got[8:] == [0.0] * 4  # RaPR 0.75 is above the target rate


def test_curiosity_bonus_penalty_and_explore():
    got = curiosity_bonus([3, 0, 1, 0], num_generations=2, target_rate=1.0, max_calls=1, penalty=0.2,
                          explore=[False, False, True, True])
    assert got == pytest.approx([-0.4, 0.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="groups"):
        curiosity_bonus([1, 0, 0], num_generations=2)


def test_curiosity_reward_uses_successful_calls_and_kind():
    metrics = []
    reward = make_curiosity_reward(num_generations=2, target_rate=0.75, max_calls=2, penalty=0.1)
    envs = [env(1), env(3, failed=3), env(4), env(0), env(1), env(0)]
    got = reward(**trl_kwargs(["a"] * 6, environments=envs, kind=["fine", "fine", "fine", "fine", "coarse", "coarse"],
                              log_metric=lambda name, value: metrics.append((name, value))))
    assert reward.__name__ == "curiosity"
    # Group 1: the failed calls are no pixel-space reasoning, so RaPR is 0.5 (not 1) and the caller gets 0.75 - 0.5.
    # Group 2: the same bonus, less 2 calls beyond max_calls. Group 3: coarse, so no bonus though RaPR is 0.5.
    assert got == pytest.approx([0.25, 0.0, 0.05, 0.0, 0.0, 0.0])
    assert metrics == [("curiosity/tool_rate", pytest.approx(0.5))]
    high = make_curiosity_reward(num_generations=2, target_rate=1.0)
    assert high(["a", [call(), tool(), answer_turn("b")]], kind=None) == pytest.approx([0.0, 0.5])


@pytest.mark.parametrize("kwargs", [dict(num_generations=0), dict(num_generations=2, target_rate=1.5),
                                    dict(num_generations=2, max_calls=-1), dict(num_generations=2, penalty=-0.1),
                                    dict(num_generations=True)])
def test_curiosity_reward_validates(kwargs):
    with pytest.raises(ValueError):
        make_curiosity_reward(**kwargs)


# --- box coverage --------------------------------------------------------------------------------------------------


def test_box_coverage_exact_fractions():
    envs = [env(2, boxes=[[5, 5, 100, 100], [0, 0, 2, 2]]), env(1, boxes=[[0, 0, 10, 3]]), env(2, boxes=[None, None]),
            env(0), env(1, boxes=[[0, 0, 9, 9]]), env(1, boxes=[[0, 0, 9, 9]])]
    targets = [[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], None, [3, 3, 3, 8]]
    got = box_coverage(["a"] * 6, target_box=targets, environments=envs)
    assert got == [0.25, 0.3, 0.0, 0.0, None, None]  # best box; failed calls; no call; no target; empty target


def test_box_coverage_none_without_environments_or_targets():
    assert box_coverage(["a", "b"], target_box=[[0, 0, 4, 4], None]) == [None, None]
    assert box_coverage(["a"], environments=[env(1, boxes=[[0, 0, 4, 4]])]) == [None]


# --- build_rewards -------------------------------------------------------------------------------------------------


def test_build_rewards_order_names_and_weights():
    weights = {"box_coverage": 0.5, "curiosity": 1, "call_cost": 0.1, "tool_bonus": 1.0, "format": 0.2,
               "judge_accuracy": 1.0, "exact_accuracy": 0.0, "accuracy": 2}
    funcs, w = build_rewards(weights, num_generations=2, judge=lambda p, a, o: 1.0, curiosity={"target_rate": 1.0})
    names = [f.__name__ for f in funcs]
    assert names == ["accuracy", "exact_accuracy", "judge_accuracy", "format", "tool_bonus", "call_cost",
                     "curiosity", "box_coverage"]
    assert w == [2.0, 0.0, 1.0, 0.2, 1.0, 0.1, 1.0, 0.5] and all(type(x) is float for x in w)
    assert set(REWARDS) < set(names)
    # Every function takes TRL's full keyword set and returns one value per completion.
    completions = [[call(), tool(), answer_turn("B")], "A"]
    columns = dict(answer=["B", "B"], options=[OPTIONS, OPTIONS], kind=["fine", "fine"],
                   target_box=[[0, 0, 10, 10], None], environments=[env(1, boxes=[[0, 0, 5, 10]]), env(0)])
    got = {f.__name__: f(**trl_kwargs(completions, **columns)) for f in funcs}
    assert got["accuracy"] == [1.0, 0.0] and got["format"] == [1.0, 1.0] and got["tool_bonus"] == [1.0, 0.0]
    assert got["call_cost"] == [-1.0, 0.0] and got["box_coverage"] == [0.5, None]
    assert got["curiosity"] == pytest.approx([0.5, 0.0]) and got["judge_accuracy"] == [1.0, 1.0]


def test_build_rewards_is_independent_of_mapping_order():
    a, _ = build_rewards({"format": 1, "accuracy": 1}, num_generations=4)
    b, _ = build_rewards({"accuracy": 1, "format": 1}, num_generations=4)
    assert [f.__name__ for f in a] == [f.__name__ for f in b] == ["accuracy", "format"]
    assert a[0] is accuracy  # already named right, so not wrapped


@pytest.mark.parametrize(("weights", "kwargs", "match"), [
    ({}, {}, "no rewards"),
    ({"acuracy": 1.0}, {}, "valid names: accuracy"),
    ({"accuracy": math.nan}, {}, "finite"),
    ({"accuracy": math.inf}, {}, "finite"),
    ({"accuracy": "1"}, {}, "finite"),
    ({"accuracy": True}, {}, "finite"),
    ({"judge_accuracy": 1.0}, {}, "needs a judge"),
    ({"curiosity": 1.0}, {"curiosity": {"rate": 0.3}}, "curiosity setting"),
])
def test_build_rewards_errors(weights, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_rewards(weights, num_generations=4, **kwargs)


def test_build_rewards_passes_curiosity_settings():
    (fn,), _ = build_rewards({"curiosity": 1.0}, num_generations=2,
                             curiosity={"target_rate": 0.8, "max_calls": 0, "penalty": 0.5})
    assert fn(["a", "b"], environments=[env(1), env(0)]) == pytest.approx([0.3 - 0.5, 0.0])
