"""External-crop agents (`bench.crop_agent`): the episode rules on scripted policies, the cached agent against the
re-encoding one on the bundled policy, and the runner's robustness, rotation and plots."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image
from qzoom_agent.tools.dialects import get_dialect

from qzoom_agent.bench import registry, runner
from qzoom_agent.bench.agents import AgentResult
from qzoom_agent.bench.crop_agent import ExternalCropAgent
from qzoom_agent.bench.deepeyes_agent import DeepEyesAgent
from qzoom_agent.model import QZoomModel
from qzoom_agent.zoomworld import sample

ALPHABET = "0123456789"  # the bundled model's training alphabet


@pytest.fixture(scope="module")
def bundled() -> QZoomModel:
    return QZoomModel.from_pretrained("zoomworld-tiny")


def _scripted(agent: ExternalCropAgent, monkeypatch, script: list[str]) -> list[list[dict]]:
    """Replace the policy by ``script`` (one text per turn); returns the messages each turn saw."""
    seen: list[list[dict]] = []

    def turn(session, ep):
        seen.append([dict(m) for m in ep.messages])
        ep.costs.forward_passes += 1
        said = script[len(seen) - 1]
        return said, said

    monkeypatch.setattr(agent, "_turn_stock", turn)
    return seen


def _box_call(agent: ExternalCropAgent, image: Image.Image, box: tuple[int, int, int, int]) -> str:
    """A DeepEyes call for ``box`` (original pixels), written in the resized view the policy sees."""
    view = agent.model.adapter.prepare_image(image, min_tokens=agent.budget[0], max_tokens=agent.budget[1])
    sx, sy = view.resized_size[0] / image.width, view.resized_size[1] / image.height
    x1, y1, x2, y2 = box
    return agent.dialect.format_call([x1 * sx, y1 * sy, x2 * sx, y2 * sy])


def test_an_answer_ends_the_episode_even_before_a_call(bundled, monkeypatch):
    agent = ExternalCropAgent(bundled, 256, "deepeyes", dialect="deepeyes")
    image = Image.new("RGB", (800, 600), "white")
    seen = _scripted(agent, monkeypatch, ["<think>easy</think><answer>42</answer>" + _box_call(
        agent, image, (100, 100, 300, 300))])
    res = agent.run(image, "Q?")
    assert res.answer == "42" and res.tool_calls == 0 and res.external_calls == 0 and len(seen) == 1
    assert [t["action"] for t in res.trace] == ["answer"] and res.bbox is None


def test_bad_calls_become_error_turns_and_the_loop_goes_on(bundled, monkeypatch):
    agent = ExternalCropAgent(bundled, 256, "deepeyes", dialect="deepeyes")
    image = Image.new("RGB", (800, 600), "white")
    good = _box_call(agent, image, (100, 120, 400, 330))
    script = ["<tool_call>\n{not json\n</tool_call>",
              agent.dialect.format_call([10, 10, 12, 12]),  # a 2 px region: refused by the size rule
              '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1e999, 0, NaN, 5]}}</tool_call>',
              '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [' + "9" * 400 + ', 0, 1, 2]}}'
              "</tool_call>",
              good]
    agent.max_turns = len(script)
    seen = _scripted(agent, monkeypatch, script)
    res = agent.run(image, "Q?")
    actions = [(t["action"], "error" in t) for t in res.trace]
    assert actions == [("call", True)] * 4 + [("call", False), ("max_turns", False)]
    assert res.answer == "" and res.tool_calls == res.external_calls == 5
    # each refused call came back as a text-only turn; the good one as the crop, mapped to original pixels
    last = seen[-1]
    replies = [m for m in last if m["role"] == agent.reply_role and m is not last[1]]
    assert len(replies) == 4 and all(not any(p.get("type") == "image" for p in m["content"]) for m in replies)
    assert res.bbox is not None and res.bbox[0] <= 100 + 2 and res.bbox[2] >= 400 - 2
    assert all(len(t.get("error", "")) < 300 for t in res.trace)  # the 400-digit number is not echoed whole


def test_a_plain_turn_is_the_answer_and_the_reference_prompt_reaches_the_policy(bundled, monkeypatch):
    agent = ExternalCropAgent(bundled, 256, "deepeyes", dialect="deepeyes")
    seen = _scripted(agent, monkeypatch, ["blue"])
    res = agent.run(Image.new("RGB", (300, 200), "white"), "What color?")
    system, user = seen[0][0], seen[0][1]
    assert res.answer == "blue" and "image_zoom_in_tool" in system["content"]
    assert user["content"][1]["text"].startswith("What color?") and "<answer>" in user["content"][1]["text"]


@pytest.mark.parametrize("dialect", ["minio3", "pixelreasoner", "qwen3vl"])
def test_other_dialects_crop_and_answer(bundled, monkeypatch, dialect):
    d = get_dialect(dialect)
    agent = ExternalCropAgent(bundled, 256, f"crop@{dialect}", dialect=d)
    image = Image.new("RGB", (1000, 800), "white")
    call = d.format_call([0.2, 0.25, 0.6, 0.75] if d.frame == "norm1" else [200, 250, 600, 750])
    answer = r"\boxed{7}" if dialect == "pixelreasoner" else "<answer>7</answer>"
    seen = _scripted(agent, monkeypatch, [call, answer])
    res = agent.run(image, "Q?")
    assert res.answer == "7" and res.external_calls == 1 and len(seen) == 2
    x1, y1, x2, y2 = res.bbox
    assert x1 <= 200 and y1 <= 200 and x2 >= 600 and y2 >= 600  # Pixel-Reasoner pads; the others clamp exactly
    assert any(p.get("type") == "image" for p in seen[1][-1]["content"])


def test_cached_agent_says_the_same_as_the_re_encoding_one_for_less():
    # the internal-zoom policy calls ``zoom``, which the DeepEyes dialect refuses: real multi-turn conversations
    policy = QZoomModel.from_pretrained("zoomworld-tiny-tool")
    stock = DeepEyesAgent(policy, 576, "deepeyes", system="", max_turns=3)
    cached = DeepEyesAgent(policy, 576, "deepeyes-cached", system="", max_turns=3, cached=True)
    calls = 0
    for i in range(4):
        s = sample("hr", "test", i, alphabet=ALPHABET)
        a, b = stock.run(s.image, s.question), cached.run(s.image, s.question)
        assert [t.get("said") for t in a.trace] == [t.get("said") for t in b.trace]
        assert (a.answer, a.bbox, a.generated_tokens) == (b.answer, b.bbox, b.generated_tokens)
        turns = len(a.trace)
        calls += a.external_calls
        # the cache makes every image encoded once and every prompt token prefilled once
        assert b.vision_encodes == 1 + a.external_calls - sum("error" in t for t in a.trace)
        assert b.visual_tokens <= a.visual_tokens and b.layer_tokens <= a.layer_tokens
        if turns > 1:
            assert b.layer_tokens < a.layer_tokens and a.vision_encodes > b.vision_encodes
    assert calls > 0  # the policy called on these questions, so the multi-turn path was exercised


def test_registry_builds_the_baselines(bundled):
    ctx = registry.AgentContext(bundled)
    for name in ("deepeyes", "deepeyes-cached", "deepeyes@256", "deepeyes-cached@256", "crop@minio3"):
        agent = registry.make_agent(name, ctx)
        assert isinstance(agent, ExternalCropAgent) and agent.name == name
    assert registry.make_agent("deepeyes-cached", ctx).cached and not registry.make_agent("deepeyes", ctx).cached
    # on the bundled base, the deepeyes agents run the bundled DeepEyes-format policy, prompted as it was trained
    agent = registry.make_agent("deepeyes", ctx)
    assert registry.crop_policy_for(ctx) == "zoomworld-tiny-deepeyes" and agent.model.policy.call == "crop"
    assert agent.system == "" and agent.reply_role == "tool" and agent.instruction == "" and agent.tools is None
    assert registry.make_agent("deepeyes-cached", ctx).model is agent.model  # loaded once per run
    with pytest.raises(ValueError, match="dialect"):
        registry.check_agent_name("crop@nope")
    assert "crop@DIALECT" in registry.known_agents()


class _Boom:
    name = "boom"

    def run(self, image, question):
        raise RuntimeError("kaput")


class _Fine:
    def __init__(self, name: str, order: list[str]) -> None:
        self.name, self.order = name, order

    def run(self, image, question):
        self.order.append(self.name)
        return AgentResult(answer="x", latency_s=0.01, visual_tokens=1, forward_passes=1, generated_tokens=1,
                           tool_calls=1 if self.name == "b" else 0, external_calls=int(self.name == "b"))


def test_runner_rotates_agents_survives_a_failing_one_and_plots(tmp_path, monkeypatch, caplog):
    order: list[str] = []
    monkeypatch.setitem(registry.FACTORIES, "a", lambda ctx, name: _Fine(name, order))
    monkeypatch.setitem(registry.FACTORIES, "b", lambda ctx, name: _Fine(name, order))
    monkeypatch.setitem(registry.FACTORIES, "boom", lambda ctx, name: _Boom())
    monkeypatch.setattr(runner, "_load_model", lambda cfg, preset: None)
    cfg = runner.CompareConfig("zoomworld:hr", ["a", "b", "boom"], 3, 0, str(tmp_path), alphabet=ALPHABET)
    summary = runner.run_compare(cfg)
    records = [json.loads(line) for line in (tmp_path / runner.RESULTS).read_text().splitlines()]
    boom = [r for r in records if r["agent"] == "boom"]
    assert len(boom) == 3 and all(r["error"] == "RuntimeError: kaput" and not r["correct"] for r in boom)
    assert summary["agents"]["boom"]["failed_mean"] == 1.0 and summary["agents"]["a"]["failed_mean"] == 0.0
    assert "kaput" in caplog.text
    # after the warm-up (a, b), each question starts with another agent
    firsts = [order[2 + 2 * q] for q in range(3)]
    indices = runner.question_indices(0, 3)
    expected = [[n for n in sorted(["a", "b"], key=lambda x: (["a", "b", "boom"].index(x) - i % 3) % 3)][0]
                for i in indices]
    assert firsts == expected and len(set(i % 3 for i in indices)) > 1
    assert summary["agents"]["b"]["external_calls_mean"] == 1.0
    for png in (runner.ACC_LATENCY, runner.TOOL_CALLS):
        assert (tmp_path / png).stat().st_size > 1000
    assert math.isclose(summary["agents"]["a"]["latency_s_mean"], 0.01)
