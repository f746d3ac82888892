"""Multi-turn chat with the KV cache continued: exact against a from-scratch forward on every family, images encoded
once, edits fall back to the longest common prefix, and the first prefill is the perception."""

from __future__ import annotations

import pytest
import torch
from tiny_models import QUESTION, make_image, make_model

from qzoom_agent.chat import ChatSession
from qzoom_agent.engine import Sampling

FAMILIES = ["qwen2_5_vl", "qwen3_vl", "llava"]
CALL = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "zoom",
                                                                                              "arguments": {}}}]}


def _turn1(image):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]


def _tool(seed: int, text: str = "Zoomed in."):
    return {"role": "tool", "content": [{"type": "image", "image": make_image(120, 90, seed=seed)},
                                        {"type": "text", "text": text}]}


def _stock_logits(qm, session: ChatSession, messages) -> torch.Tensor:
    """The stock HF forward on the whole rendered conversation: (1, V) logits of the last token."""
    r = session.render(messages)
    a = qm.adapter
    with torch.inference_mode():
        return a.model(**a.hf_inputs(torch.tensor([r.ids]), [im.inputs for im in r.images])).logits[:, -1]


@pytest.mark.parametrize("family", FAMILIES)
def test_continued_cache_equals_a_from_scratch_forward(family):
    qm = make_model(family)
    s = ChatSession(qm, budget=(16, 64))
    m1 = _turn1(make_image())
    t1 = s.generate(m1, max_new_tokens=4)
    m2 = [*m1, CALL, _tool(3)]
    t2 = s.generate(m2, max_new_tokens=4)
    m3 = [*m2, {"role": "assistant", "content": t2.text}, {"role": "user", "content": "And the red one?"}, CALL,
          _tool(4, "Again.")]
    t3 = s.generate(m3, max_new_tokens=4)
    for turn, msgs in ((t1, m1), (t2, m2), (t3, m3)):
        assert (turn.logits - _stock_logits(qm, ChatSession(qm, budget=(16, 64)), msgs)).abs().max() < 1e-4
    # the later calls paid only for their new tokens, and each image was encoded once
    assert t2.stats.kv_reused >= t1.stats.prompt_tokens
    assert t2.stats.text_tokens + t2.stats.visual_tokens == t2.stats.prompt_tokens - t2.stats.kv_reused
    assert t3.stats.kv_reused >= t2.stats.prompt_tokens
    assert (t1.stats.vision_encodes, t2.stats.vision_encodes, t3.stats.vision_encodes) == (1, 1, 1)
    assert s.totals.vision_encodes == 3
    assert t2.stats.layer_tokens == (t2.stats.prompt_tokens - t2.stats.kv_reused) * qm.adapter.num_layers \
        + (t2.stats.forward_passes - 1) * qm.adapter.num_layers


def test_an_edited_history_falls_back_to_the_common_prefix():
    qm = make_model("qwen2_5_vl")
    s = ChatSession(qm, budget=(16, 64))
    m1 = _turn1(make_image())
    s.generate(m1, max_new_tokens=3)
    s.generate([*m1, CALL, _tool(3)], max_new_tokens=3)
    edited = [*m1, CALL, _tool(5, "Another crop.")]  # the tool turn changed: its image and text run again
    t = s.generate(edited, max_new_tokens=3)
    assert 0 < t.stats.kv_reused < t.stats.prompt_tokens
    assert t.stats.vision_encodes == 1
    assert (t.logits - _stock_logits(qm, ChatSession(qm, budget=(16, 64)), edited)).abs().max() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_the_first_prefill_is_the_perception(family):
    qm = make_model(family, roi_threshold=0.3)
    image = make_image(seed=7)
    s = ChatSession(qm, budget=(16, 64))
    s.generate(_turn1(image), max_new_tokens=2)
    assert s.perception_source == "captured"
    p = s.perception()
    ref = qm.perceive(image, QUESTION, roi="always", budget=(16, 64))
    assert p.gate_score == pytest.approx(ref.gate_score, abs=1e-6)
    got = s.locate()
    assert got.boxes == ref.boxes
    assert torch.allclose(got.logits, ref.roi_logits, atol=1e-5)
    # a session that never prefilled the first turn alone rebuilds it, and says so
    fresh = ChatSession(qm, budget=(16, 64))
    assert fresh.perception(_turn1(image)).gate_score == pytest.approx(ref.gate_score, abs=1e-6)
    assert fresh.perception_source == "rebuilt"
    with pytest.raises(ValueError, match="no image"):
        ChatSession(qm).perception([{"role": "user", "content": "no picture here"}])


def test_stop_strings_and_seeded_sampling():
    qm = make_model("qwen2_5_vl")
    m1 = _turn1(make_image())
    greedy = ChatSession(qm, budget=(16, 64)).generate(m1, max_new_tokens=12)
    stop_at = qm.adapter.tokenizer.decode(greedy.tokens[:2], skip_special_tokens=False)
    if len(greedy.tokens) > 2 and stop_at:
        stopped = ChatSession(qm, budget=(16, 64)).generate(m1, max_new_tokens=12, stop_strings=(stop_at,))
        assert stopped.reason == "stop_string" and len(stopped.tokens) <= 2
    draws = [ChatSession(qm, budget=(16, 64)).generate(m1, max_new_tokens=8, sampling=Sampling(1.5, 0.9, seed=3))
             for _ in range(2)]
    assert draws[0].tokens == draws[1].tokens
    with pytest.raises(ValueError, match="temperature"):
        Sampling(0.0)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(1.0, top_p=0.0)
