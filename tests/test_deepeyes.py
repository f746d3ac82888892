"""The DeepEyes-format zoom tool (call text, parsing, frames, crops) and the external-crop agent loop."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from qzoom_agent.tools.deepeyes import (
    MIN_CROP_SIDE,
    ZOOM_TOOL,
    ToolCallError,
    ZoomCall,
    crop_for_tool,
    format_zoom_call,
    parse_zoom_call,
    to_source_box,
    zoom_tool_schema,
)

from qzoom_agent.backbones.qwen2_5_vl import Qwen2_5_VLAdapter
from qzoom_agent.bench import registry
from qzoom_agent.bench.crop_agent import ExternalCropAgent
from qzoom_agent.bench.deepeyes_agent import TOOL_ZOOM, DeepEyesAgent, policy_messages
from qzoom_agent.model import QZoomModel
from qzoom_agent.recipes.zoomworld_tiny.joint_eval import inference_model
from qzoom_agent.recipes.zoomworld_tiny.model import build_zoomworld_tiny
from qzoom_agent.zoomworld import generate

torch.set_num_threads(2)


def test_call_text_round_trips_and_matches_the_chat_template():
    text = format_zoom_call((10, 20.5, 300, 400), label="tag")
    assert text.startswith("<tool_call>\n") and text.endswith("\n</tool_call>")
    assert json.loads(text.split("\n")[1]) == {"name": ZOOM_TOOL,
                                               "arguments": {"bbox_2d": [10, 20.5, 300, 400], "label": "tag"}}
    assert parse_zoom_call("I will zoom.\n" + text) == ZoomCall((10.0, 20.5, 300.0, 400.0), "tag")
    assert parse_zoom_call("B") is None
    # the same call rendered from the chat template's tool_calls field parses identically
    _, tok, _ = build_zoomworld_tiny(hidden=32, layers=2, vision_hidden=32, vision_depth=2, intermediate=64)
    rendered = tok.apply_chat_template(
        [{"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": ZOOM_TOOL, "arguments": {"bbox_2d": [10, 20.5, 300, 400], "label": "tag"}}}]}],
        tokenize=False)
    assert format_zoom_call((10, 20.5, 300, 400), label="tag") in rendered
    assert zoom_tool_schema()["function"]["name"] == ZOOM_TOOL


@pytest.mark.parametrize("text, match", [
    ("<tool_call>\n{not json}\n</tool_call>", "not valid JSON"),
    ('<tool_call>\n{"name": "crop", "arguments": {"bbox_2d": [0, 0, 9, 9]}}\n</tool_call>', "unknown tool"),
    ('<tool_call>\n{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [0, 0, 9]}}\n</tool_call>', "four"),
    ('<tool_call>\n{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [0, "a", 9, 9]}}</tool_call>', "four"),
    ('<tool_call>\n{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [0, true, 9, 9]}}</tool_call>', "four"),
])
def test_malformed_calls_raise_a_message_for_the_policy(text, match):
    with pytest.raises(ToolCallError, match=match):
        parse_zoom_call(text)


def test_every_frame_maps_to_source_pixels():
    source, view = (2000, 1000), (500, 250)  # the policy saw the image at a quarter of its size
    assert to_source_box((100, 50, 200, 100), "absolute", view, source) == (400, 200, 800, 400)
    assert to_source_box((200, 200, 400, 400), "norm1000", view, source) == (400, 200, 800, 400)
    assert to_source_box((0.2, 0.2, 0.4, 0.4), "norm1", view, source) == (400, 200, 800, 400)
    assert to_source_box((-50, -50, 900, 900), "absolute", view, source) == (0, 0, 2000, 1000)  # clipped
    with pytest.raises(ToolCallError, match="x1 < x2"):
        to_source_box((200, 50, 100, 100), "absolute", view, source)
    with pytest.raises(ToolCallError, match="outside"):
        to_source_box((600, 10, 700, 20), "absolute", view, source)
    with pytest.raises(ValueError, match="frame"):
        to_source_box((0, 0, 1, 1), "pixels", view, source)


def test_crops_refuse_tiny_or_thin_regions_and_enlarge_within_a_cap():
    image = Image.new("RGB", (4000, 3000), "white")
    with pytest.raises(ToolCallError, match="each side"):
        crop_for_tool(image, (0, 0, MIN_CROP_SIDE, 200))
    with pytest.raises(ToolCallError, match="aspect"):
        crop_for_tool(image, (0, 0, 3500, 31 + 3))
    assert crop_for_tool(image, (0, 0, 100, 50), zoom=3.0).size == (300, 150)
    capped = crop_for_tool(image, (0, 0, 2000, 1000), zoom=3.0, max_pixels=200_000)
    assert capped.width * capped.height <= 200_000 * 1.01 and capped.width == 2 * capped.height


@pytest.fixture(scope="module")
def tiny_model() -> QZoomModel:
    model, tok, proc = build_zoomworld_tiny(hidden=32, layers=2, vision_hidden=32, vision_depth=2, intermediate=64)
    model.eval()
    return inference_model(Qwen2_5_VLAdapter(model, tok, proc))


def test_agent_loop_zooms_through_the_tool_then_answers(tiny_model, monkeypatch):
    s = generate("hr", 3_000_000_007, alphabet="0123456789", size_range=(1024, 1536))
    agent = DeepEyesAgent(tiny_model, 256, "deepeyes@256")
    view = tiny_model.adapter.prepare_image(s.image, min_tokens=256, max_tokens=256)
    sx, sy = view.resized_size[0] / s.image.width, view.resized_size[1] / s.image.height
    x1, y1, x2, y2 = s.target_box
    pad = 40
    call_box = (int((x1 - pad) * sx), int((y1 - pad) * sy), int((x2 + pad) * sx) + 1, int((y2 + pad) * sy) + 1)
    script = ["<tool_call>\n{bad}\n</tool_call>", format_zoom_call(call_box), "42<|im_end|>"]
    seen: list[tuple[int, int]] = []

    def scripted(session, ep):  # the policy's turns, scripted; each "costs" 5 tokens and re-encodes its images
        seen.append((sum(m["role"] == "tool" for m in ep.messages), len(ep.images)))
        rendered = session.render(ep.messages)
        ep.costs.visual_tokens += sum(im.inputs.n_tokens for im in rendered.images)
        ep.costs.forward_passes += 5
        ep.costs.generated_tokens += 5
        said = script[len(seen) - 1]
        return said, said.split("<|im_end|>")[0]

    monkeypatch.setattr(agent, "_turn_stock", scripted)
    res = agent.run(s.image, s.question)
    assert res.answer == "42" and res.tool_calls == 2 and res.forward_passes == res.generated_tokens == 15
    assert seen == [(0, 1), (1, 1), (2, 2)]  # the refused call added no image; the zoom added its crop
    assert res.bbox is not None and res.bbox[0] <= x1 and res.bbox[2] >= x2  # mapped back to source pixels
    crop_tokens = res.visual_tokens - 3 * view.n_tokens
    assert 0 < crop_tokens <= 256


def test_agent_runs_the_real_model_and_is_registered(tiny_model):
    s = generate("doc", 3_000_000_011, alphabet="0123456789", size_range=(1024, 1536))
    ctx = registry.AgentContext(model=tiny_model)
    agent = registry.make_agent("deepeyes@64", ctx)
    assert isinstance(agent, ExternalCropAgent) and registry.agent_tokens("deepeyes@64", {}) == 64
    agent.max_new_tokens = 4
    res = agent.run(s.image, s.question)
    assert res.forward_passes >= 1 and res.visual_tokens >= 1 and isinstance(res.answer, str)
    assert registry.make_agent("deepeyes", ctx).budget == (256, 576)
    assert "deepeyes@N" in registry.known_agents()


def test_policy_messages_render_image_and_error_turns(tiny_model):
    tok = tiny_model.adapter.tokenizer
    text = tok.apply_chat_template(policy_messages("Q?", [("call", None), ("call", "Error: too small")]),
                                   tokenize=False, add_generation_prompt=True)
    assert text.count("<|image_pad|>") == 2 and "<tool_response>\nError: too small\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n") and TOOL_ZOOM >= 1


def test_tool_listing_reaches_the_prompt_when_asked(tiny_model, monkeypatch):
    agent = DeepEyesAgent(tiny_model, 32, "deepeyes@32", list_tools=True, max_new_tokens=2, max_turns=1)
    seen: list[str] = []
    real = tiny_model.adapter.tokenizer.apply_chat_template

    def spy(messages, **kwargs):
        text = real(messages, **kwargs)
        seen.append(text)
        return text

    monkeypatch.setattr(tiny_model.adapter.tokenizer, "apply_chat_template", spy)
    agent.run(Image.new("RGB", (300, 200), "white"), "Q?")
    assert ZOOM_TOOL in seen[0] and "<tools>" in seen[0]
