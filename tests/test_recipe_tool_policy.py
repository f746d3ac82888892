"""The tool-calling policy recipe (`recipes.zoomworld_tiny.tool_policy`) on a tiny random Qwen2.5-VL: what is
supervised, what stays frozen, the exported delta, and a short run end to end."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from qzoom_agent.tools.crop import ToolImage
from qzoom_agent.tools.dialects import get_dialect
from qzoom_agent.tools.zoom import zoom_output

from qzoom_agent.bench.deepeyes_agent import tool_response_view
from qzoom_agent.boxes import Box, coverage
from qzoom_agent.chat import ChatSession
from qzoom_agent.model import QZoomModel
from qzoom_agent.policy import PolicyConfig, read_policy
from qzoom_agent.recipes.zoomworld_tiny.answer_data import IGNORE
from qzoom_agent.recipes.zoomworld_tiny.tool_policy import (
    ToolPolicyConfig,
    export_policy,
    load_tool_policy_config,
    parse_zoom_call,
    run_tool_policy,
    span_losses,
    train_tool_policy,
    trained_prefixes,
)
from qzoom_agent.recipes.zoomworld_tiny.tool_policy_data import (
    CALL_MESSAGE,
    ToolExample,
    ToolPolicyDataConfig,
    crop_call,
    encode_tool_example,
    jittered_box,
    make_tool_example,
    tool_message,
    user_message,
)
from qzoom_agent.tiny import make_tiny
from qzoom_agent.zoomworld import generate

torch.set_num_threads(2)
ALPHABET = "0123456789"
DATA = ToolPolicyDataConfig(fine_share=0.5, size_range=(1024, 1280))
CFG = ToolPolicyConfig(alphabet=ALPHABET, steps=3, batch_size=2, warmup_steps=1, lr=1e-2, eval_items=2,
                       log_every=1, data=DATA, threads=2)
CALL = '<tool_call>\n{"name": "zoom", "arguments": {}}\n</tool_call>'


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "qwen", "qwen2_5_vl", seed=3)


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory):
    """A base model trained in place for 3 steps, its state before, and its exported policy folder."""
    cfg = CFG.model_copy(update={"base": str(base_dir)})
    model = QZoomModel.from_pretrained(base_dir, min_tokens=16, max_tokens=64)  # small views: a fast test
    before = {k: v.clone() for k, v in model.adapter.model.state_dict().items()}
    out = tmp_path_factory.mktemp("run")
    step = train_tool_policy(model, cfg, out, ALPHABET)
    return model, before, export_policy(model, out / "policy", cfg, step), step


def _sample(family: str, seed: int = 11):
    return generate("hr", seed, alphabet=ALPHABET, mix={family: 1.0}, size_range=(1024, 1280))


def test_supervised_spans_are_exactly_the_call_and_the_answers(base_dir):
    model = QZoomModel.from_pretrained(base_dir, min_tokens=16, max_tokens=64)
    tok = model.adapter.tokenizer
    s = _sample("read")
    box = jittered_box(random.Random(0), tuple(s.target_box), s.image.size, (2.0, 3.0))
    enc = encode_tool_example(model, ToolExample(s, box, 0.75, "truth"))
    assert [tok.decode(enc.input_ids[a:b]) for a, b, _ in enc.spans] == [CALL, s.answer + "<|im_end|>"]
    assert [w for *_, w in enc.spans] == ["call", "answer"]
    supervised = (enc.labels != IGNORE).nonzero().squeeze(1).tolist()
    assert supervised == [i for a, b, _ in enc.spans for i in range(a, b)]
    assert torch.equal(enc.labels[supervised], enc.input_ids[supervised])
    # the ids are the chat renderer's own: the first turn's prompt, then the call and tool turns
    session, user = ChatSession(model), user_message(s.image, s.question)
    out = zoom_output(s.image, box, 0.75, "cached", px_per_token=model.adapter.px_per_token)
    convo = session.render([user, CALL_MESSAGE, tool_message(out)]).ids
    assert enc.input_ids[: len(convo)].tolist() == convo
    assert enc.spans[0][0] == len(session.render([user]).ids)
    assert len(enc.images) == 2 and enc.kind == "fine"

    coarse = _sample("color")
    enc = encode_tool_example(model, ToolExample(coarse, None, None, ""))
    assert [tok.decode(enc.input_ids[a:b]) for a, b, _ in enc.spans] == [coarse.answer + "<|im_end|>"]
    assert int((enc.labels != IGNORE).sum()) == len(coarse.answer) + 1
    assert enc.input_ids[: enc.spans[0][0]].tolist() == ChatSession(model).render(
        [user_message(coarse.image, coarse.question)]).ids


def test_only_layers_from_k_the_norm_and_lm_head_change(trained):
    model, before, _, step = trained
    assert step == CFG.steps
    prefixes = tuple(trained_prefixes(model))
    k = model.config.twig_K
    assert prefixes[0].endswith(f"layers.{k}.") and prefixes[-1] == "lm_head."
    after = model.adapter.model.state_dict()
    frozen = [n for n in after if not n.startswith(prefixes)]
    assert any(".visual." in n for n in frozen) and any("embed_tokens" in n for n in frozen)
    assert any(f"layers.{k - 1}." in n for n in frozen)
    assert all(torch.equal(after[n], before[n]) for n in frozen)
    assert all(not torch.equal(after[n], before[n]) for n in after if n.startswith(prefixes) and n.endswith("weight"))


def test_export_reloads_to_the_same_logits_and_the_base_layer_k_states(trained, base_dir):
    model, _, policy_dir, _ = trained
    cfg, tensors = read_policy(policy_dir)
    assert cfg.frozen_below == model.config.twig_K and cfg.system is None and not cfg.list_tools
    assert tensors and all(k.startswith(tuple(cfg.trained)) for k in tensors)
    policy, base = QZoomModel.from_pretrained(str(policy_dir)), QZoomModel.from_pretrained(base_dir)
    with torch.no_grad():  # the exported tensors are fp16: round the in-memory ones the same way
        for name, value in model.adapter.model.state_dict().items():
            if name in tensors:
                value.copy_(value.half().float())
    s = _sample("read", 5)
    enc = encode_tool_example(policy, ToolExample(s, Box(*s.target_box), 0.5, "truth"))
    ids = enc.input_ids[None]
    k = policy.config.twig_K
    with torch.no_grad():
        outs = [m.adapter.model(**m.adapter.hf_inputs(ids, enc.images), output_hidden_states=True)
                for m in (policy, model, base)]
    assert torch.allclose(outs[0].logits, outs[1].logits, atol=1e-5)
    assert not torch.allclose(outs[0].logits, outs[2].logits, atol=1e-3)
    assert all(torch.equal(outs[0].hidden_states[i], outs[2].hidden_states[i]) for i in range(k + 1))
    assert not torch.equal(outs[0].hidden_states[k + 1], outs[2].hidden_states[k + 1])
    # hence the perception (gate and box) on the policy is the base's
    p, q = policy.perceive(s.image, s.question, roi="always"), base.perceive(s.image, s.question, roi="always")
    assert p.gate_score == q.gate_score and p.box == q.box


def test_span_loss_weighs_each_span_equally():
    logits = torch.zeros(1, 6, 4)
    logits[0, 0, 1] = logits[0, 1, 1] = logits[0, 2, 1] = 5.0  # the long span is predicted well
    labels = torch.tensor([[IGNORE, 1, 1, 1, IGNORE, 2]])
    spans = [[(1, 4, "call"), (5, 6, "answer")]]
    out = span_losses(logits, labels, spans)
    ce = torch.nn.functional.cross_entropy
    call, answer = ce(logits[0, :3], labels[0, 1:4]), ce(logits[0, 4:5], labels[0, 5:6])
    assert torch.isclose(out["total"], (call + answer) / 2) and torch.isclose(out["answer"], answer)
    assert out["decide"] == 1.0
    # with the call token's id, each example adds its decision as a term of its own
    out = span_losses(logits, labels, spans, call_id=1)
    decision = -torch.log_softmax(logits[0, 0], -1)[1]
    assert torch.isclose(out["total"], (call + answer + decision) / 3) and torch.isclose(out["decision"], decision)
    weighted = span_losses(logits, labels, spans, call_id=1, call_weight=4.0)["total"]
    assert torch.isclose(weighted, (4 * call + answer + decision) / 6)
    # an example that should answer decides right on any first token but <tool_call> (id 3 here)
    coarse = [[(5, 6, "answer")]]
    assert span_losses(logits, labels, coarse)["decide"] == 0.0  # exact first character: 0, not 2
    out = span_losses(logits, labels, coarse, call_id=3)
    assert out["decide"] == 1.0 and torch.isclose(out["decision"], -torch.log1p(-torch.softmax(logits[0, 4], -1)[3]))
    assert span_losses(logits, labels, coarse, call_id=0)["decide"] == 0.0


def test_parse_zoom_call():
    assert parse_zoom_call(CALL) is True
    assert parse_zoom_call('<tool_call>\n{"name": "zoom", "arguments": {}}') is True  # stopped at </tool_call>
    assert parse_zoom_call("14") is None
    assert parse_zoom_call('<tool_call>{"name": zoom}</tool_call>') is False
    assert parse_zoom_call('<tool_call>{"name": "crop", "arguments": {}}</tool_call>') is False


def test_jittered_box_holds_the_target_inside_the_image():
    rng = random.Random(1)
    for _ in range(200):
        w, h = rng.randint(300, 900), rng.randint(300, 900)
        x, y = rng.randint(0, w - 40), rng.randint(0, h - 40)
        target = (x, y, x + rng.randint(8, 40), y + rng.randint(8, 40))
        box = jittered_box(rng, target, (w, h), (1.5, 4.0))
        assert coverage(box, target) == 1.0 and box.x2 <= w and box.y2 <= h


def test_config_is_validated(tmp_path):
    with pytest.raises(ValueError, match="warmup_steps"):
        ToolPolicyConfig(steps=5, warmup_steps=5)
    with pytest.raises(ValueError, match="fine_mix"):
        ToolPolicyDataConfig(fine_mix={"color": 1.0})
    shipped = load_tool_policy_config("configs/recipes/zoomworld_tiny/tool_policy.yaml")
    assert shipped.base == "zoomworld-tiny" and shipped.threads == 2
    (tmp_path / "bad.yaml").write_text("tool_policy: {steps: 0}\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_tool_policy_config(tmp_path / "bad.yaml")


def test_tied_lm_head_is_refused(base_dir):
    model = QZoomModel.from_pretrained(base_dir)
    model.adapter.model.lm_head.weight = model.adapter.embed_tokens.weight
    with pytest.raises(ValueError, match="ties"):
        trained_prefixes(model)


def test_run_end_to_end_exports_logs_evaluates_and_resumes(base_dir, tmp_path):
    cfg = CFG.model_copy(update={"base": str(base_dir), "steps": 2})
    row = run_tool_policy(cfg, tmp_path, to=tmp_path / "shipped")
    folder = tmp_path / "tool_policy"
    assert row["step"] == 2 and row["n_fine"] + row["n_coarse"] == cfg.eval_items
    assert all(row[k] is None or 0.0 <= row[k] <= 1.0 for k in ("call_fine", "call_coarse", "acc_fine"))
    assert [r["step"] for r in map(json.loads, (folder / "train_log.jsonl").read_text().splitlines())] == [1, 2]
    assert (folder / "policy" / "policy.safetensors").read_bytes() == (tmp_path / "shipped" /
                                                                     "policy.safetensors").read_bytes()
    assert QZoomModel.from_pretrained(str(tmp_path / "shipped")).policy.base == str(base_dir.resolve())
    again = run_tool_policy(cfg, tmp_path)  # resumes at its last step: nothing more to train
    assert again["step"] == 2 and len((folder / "train_log.jsonl").read_text().splitlines()) == 2
    with pytest.raises(ValueError, match="different config"):
        run_tool_policy(cfg.model_copy(update={"lr": 1e-3}), tmp_path)


# ---- the DeepEyes-style crop-call policy (data.call: crop, zoomworld-tiny-deepeyes) ---------------------------------
def test_crop_call_writes_view_pixels_of_the_box_and_the_tool_turn_is_the_crop_alone(base_dir):
    model = QZoomModel.from_pretrained(base_dir, min_tokens=16, max_tokens=64)
    tok, deepeyes = model.adapter.tokenizer, get_dialect("deepeyes")
    s = _sample("read")
    box = jittered_box(random.Random(0), tuple(s.target_box), s.image.size, (2.0, 3.0))
    enc = encode_tool_example(model, ToolExample(s, box, None, "truth", "crop"))
    call, answer = [tok.decode(enc.input_ids[a:b]) for a, b, _ in enc.spans]
    assert answer == s.answer + "<|im_end|>" and [w for *_, w in enc.spans] == ["call", "answer"]
    assert call.startswith('<tool_call>\n{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [')
    written = json.loads(call.split("\n")[1])["arguments"]["bbox_2d"]  # whole numbers, as written
    assert all(type(v) is int for v in written) and call == deepeyes.format_call(written)
    parsed = deepeyes.parse(call)
    # in pixels of the view the policy saw: mapped back, the box within one view pixel, holding it whole
    first = ChatSession(model).render([user_message(s.image, s.question)])
    (vw, vh), (w, h) = first.images[0].inputs.resized_size, s.image.size
    back = [written[0] * w / vw, written[1] * h / vh, written[2] * w / vw, written[3] * h / vh]
    assert all(abs(b - v) <= scale for b, v, scale in zip(back, box.as_tuple(), (w / vw, h / vh) * 2, strict=True))
    assert back[0] <= box.x1 and back[1] <= box.y1 and back[2] >= box.x2 and back[3] >= box.y2
    # the tool turn holds one image, exactly the DeepEyes agent's crop of the region it locates for that call,
    # and no text: between the call and the answer there is only the chat template's wrapping
    region = deepeyes.locate(parsed.call, [ToolImage(s.image, (vw, vh), 0, Box(0, 0, w, h))])
    assert coverage(region, box.as_tuple()) == 1.0
    crop = model.adapter.prepare_image(tool_response_view(s.image, region.as_tuple()), min_tokens=4, max_tokens=256)
    assert len(enc.images) == 2 and torch.equal(enc.images[1].pixel_values, crop.pixel_values)
    between = tok.decode(enc.input_ids[enc.spans[0][1] : enc.spans[1][0]])
    assert between.replace("<|image_pad|>", "") == ("<|im_end|>\n<|im_start|>user\n<tool_response>\n"
                                                    "<|vision_start|><|vision_end|>\n</tool_response><|im_end|>\n"
                                                    "<|im_start|>assistant\n")
    assert between.count("<|image_pad|>") == crop.n_tokens


def test_crop_call_grows_a_region_deepeyes_refuses():
    written, region = crop_call(Box(100, 100, 110, 112), (2000, 1500), (560, 420))
    assert region.width > 30 and region.height > 30 and coverage(region, (100, 100, 110, 112)) == 1.0
    assert region.width < 60 and region.height < 60  # grown just enough
    assert all(isinstance(v, int) for v in written) and written[2] - written[0] >= 9  # 31 px at 3.57 px a pixel


def test_crop_examples_use_jittered_truth_boxes_without_twig_boxes():
    cfg = ToolPolicyDataConfig(call="crop", fine_share=1.0, size_range=(1024, 1280))
    for k in range(4):
        ex = make_tool_example(cfg, ALPHABET, k, None)
        assert ex.call == "crop" and ex.box_source == "truth" and coverage(ex.box, ex.sample.target_box) == 1.0
    with pytest.raises(ValueError, match="call"):
        ToolPolicyDataConfig(call="bbox")
    with pytest.raises(ValueError, match="twig boxes"):
        make_tool_example(ToolPolicyDataConfig(fine_share=1.0, size_range=(1024, 1280)), ALPHABET, 0, None)


def test_crop_policy_config_differs_from_the_tool_policy_only_in_the_call():
    tool = load_tool_policy_config("configs/recipes/zoomworld_tiny/tool_policy.yaml").model_dump()
    crop = load_tool_policy_config("configs/recipes/zoomworld_tiny/crop_policy.yaml").model_dump()
    assert crop["data"].pop("call") == "crop" and tool["data"].pop("call") == "zoom"
    assert {k for k in crop if crop[k] != tool[k]} == {"threads"}


def test_crop_run_end_to_end_records_the_call_and_runs_the_deepeyes_agent(base_dir, tmp_path):
    cfg = CFG.model_copy(update={"base": str(base_dir), "steps": 1, "warmup_steps": 0,
                                 "data": DATA.model_copy(update={"call": "crop"})})
    row = run_tool_policy(cfg, tmp_path)
    assert row["step"] == 1 and row["n_fine"] + row["n_coarse"] == cfg.eval_items and "croppable" in row
    assert not (tmp_path / "tool_policy" / "twig_boxes.jsonl").exists()
    policy = QZoomModel.from_pretrained(row["policy"]).policy
    assert policy.call == "crop" and policy.system is None and not policy.list_tools


def test_policy_json_without_a_call_reads_as_zoom():
    assert PolicyConfig(base="zoomworld-tiny", frozen_below=1).call == "zoom"


def test_bundled_policies_load_with_their_calls():
    assert QZoomModel.from_pretrained("zoomworld-tiny-tool").policy.call == "zoom"
    deepeyes = QZoomModel.from_pretrained("zoomworld-tiny-deepeyes")
    assert deepeyes.policy.call == "crop" and deepeyes.policy.system is None
    assert deepeyes.policy.base == "zoomworld-tiny" and not deepeyes.policy.list_tools


class _FixedBoxes:
    """Stands in for TwigBoxes: one twig box and gate score for every scene."""

    def get(self, scene: int):
        return Box(10, 20, 300, 400), 0.7


def test_coarse_calls_make_a_share_of_coarse_examples_call_at_the_twig_box_and_leave_the_rest_as_they_were():
    plain = ToolPolicyDataConfig(fine_share=0.5, size_range=(1024, 1280))
    calling = plain.model_copy(update={"coarse_calls": 0.5})
    examples = [(make_tool_example(plain, ALPHABET, k, _FixedBoxes()),
                 make_tool_example(calling, ALPHABET, k, _FixedBoxes())) for k in range(24)]
    coarse = [(a, b) for a, b in examples if a.sample.kind == "coarse"]
    called = [b for _, b in coarse if b.box is not None]
    assert coarse and 0 < len(called) < len(coarse)  # a share, drawn per example
    assert all(b.box_source == "coarse" and b.box == Box(10, 20, 300, 400) and b.gate_score == 0.7 for b in called)
    assert all(a.box is None and a.box_source == "" for a, _ in coarse)  # coarse_calls 0: no coarse call
    # fine examples draw exactly as before: the coarse draw has its own random stream
    assert all((a.box, a.box_source) == (b.box, b.box_source) for a, b in examples if a.sample.kind == "fine")
    with pytest.raises(ValueError):
        ToolPolicyDataConfig(coarse_calls=1.5)


def test_a_policy_can_be_the_base_of_further_training():
    from qzoom_agent.policy import policy_base

    assert policy_base("zoomworld-tiny-tool") == "zoomworld-tiny"
    assert policy_base("zoomworld-tiny") == "zoomworld-tiny"
