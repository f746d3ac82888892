"""Unit tests of the GRPO recipe's processor and held-out evaluation (`qzoom_agent.rl.processor`, `.evaluate`).

The processor's key test, `test_trl_tool_round_tokenises_as_the_agent_loop_renders_it`, builds the ids TRL 1.16
builds for a tool round (``prompt_ids + completion_ids + suffix_ids``, the suffix from TRL's own
``GRPOTrainer._get_tool_suffix_ids``) and checks they are the agent loop's rendering of the same conversation."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from qzoom_agent.rl.config import RecipeArguments
from qzoom_agent.rl.evaluate import plot_progress, policy_compare_args, read_history, replot, summarize_eval
from qzoom_agent.rl.processor import CALL_END, grpo_processor, view_size_of
from qzoom_agent.tools.trl_env import zoom_environment
from tiny_models import QUESTION, make_image
from transformers.utils import get_json_schema

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

pytestmark = pytest.mark.usefixtures("one_thread")

CALL = '<tool_call>\n{"name": "zoom", "arguments": {}}\n</tool_call>'
ZOOM_REPLY = "Zoomed in on [1, 2, 3, 4]"


# ====================================================================================================================
# rl/processor.py
# ====================================================================================================================
def test_grpo_processor_ends_calls_and_leaves_the_model_tokenizer_alone(tool_model, tmp_path):
    own = tool_model.adapter.tokenizer
    eos, template = own.eos_token, own.chat_template
    proc = grpo_processor(tool_model)
    assert proc.tokenizer.eos_token == CALL_END == "</tool_call>"
    assert proc.tokenizer.decode([proc.tokenizer.eos_token_id]) == CALL_END
    assert proc.tokenizer is not own and own.eos_token == eos == "<|im_end|>" and own.chat_template == template
    assert getattr(own, "response_template", None) is None and proc.tokenizer.response_template is not None

    files = proc.save_pretrained(tmp_path)
    names = {Path(f).name for f in files}
    assert {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"} <= names
    assert all(Path(f).is_file() for f in files)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path).eos_token == CALL_END


@pytest.mark.parametrize("choice", ["model", "qwen3_vl"])
def test_tool_listing_follows_list_tools(tool_model, choice):
    schema = get_json_schema(zoom_environment(tool_model)().zoom)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    rendered = {}
    for list_tools in (False, True):
        proc = grpo_processor(tool_model, chat_template=choice, list_tools=list_tools)
        rendered[list_tools] = proc.apply_chat_template(msgs, tools=[schema], add_generation_prompt=True,
                                                        tokenize=False)
    assert "<tools>" not in rendered[False] and '"name": "zoom"' not in rendered[False]
    assert "<tools>" in rendered[True] and '"name": "zoom"' in rendered[True]
    assert rendered[False].endswith("<|im_start|>assistant\n") and QUESTION in rendered[False]


def test_grpo_processor_image_sizes(tool_model):
    import torch

    proc = grpo_processor(tool_model)
    ip, px = proc.image_processor, tool_model.adapter.px_per_token
    size_of = view_size_of(tool_model)

    def shown(image: Image.Image) -> tuple[tuple[int, int], int]:
        out = ip(images=[image])  # no return_tensors: torch tensors all the same
        assert isinstance(out["pixel_values"], torch.Tensor) and isinstance(out["image_grid_thw"], torch.Tensor)
        _, h, w = out["image_grid_thw"][0].tolist()
        return (w * ip.patch_size, h * ip.patch_size), h * w // ip.merge_size ** 2

    big = Image.new("RGB", (2000, 1500))
    size, tokens = shown(big)
    assert size == size_of(big) == (756, 560)  # the row image at the model's budget, as the agent sizes it
    assert tool_model.config.max_tokens * 0.9 <= tokens <= tool_model.config.max_tokens

    small = Image.new("RGB", (200, 150))
    size, tokens = shown(small)
    assert size == size_of(small) == (196, 140) and tokens == 35  # a crop keeps about its size
    assert 4 <= tokens < tool_model.config.min_tokens
    assert abs(size[0] - 200) < px and abs(size[1] - 150) < px

    tiny = Image.new("RGB", (20, 15))
    assert shown(tiny) == (size_of(tiny), 6)  # raised only to the 4-token floor (2x3 here)
    for w, h in ((1234, 567), (451, 300), (3000, 200), (640, 480), (28 * 24 + 1, 28 * 24)):
        im = Image.new("RGB", (w, h))
        assert shown(im)[0] == size_of(im), (w, h)


def _expand(ids: list[int], image_token: int, counts: list[int]) -> list[int]:
    """The chat template's one placeholder per image replaced by that image's visual tokens, in order."""
    out, k = [], 0
    for t in ids:
        if t == image_token:
            out += [image_token] * counts[k]
            k += 1
        else:
            out.append(t)
    assert k == len(counts)
    return out


@pytest.mark.parametrize("list_tools", [False, True])
def test_trl_tool_round_tokenises_as_the_agent_loop_renders_it(tool_model, list_tools):
    """TRL builds a tool round's ids as ``prompt_ids + completion_ids + suffix_ids``; they must be the ids of the
    agent loop's rendering (`BackboneAdapter.render_chat`) of the same conversation, tokenised by the model's own
    tokenizer, with each image expanded to its visual tokens."""
    from trl import GRPOTrainer
    from trl.chat_template_utils import is_chat_template_prefix_preserving

    proc = grpo_processor(tool_model, list_tools=list_tools)
    tok = proc.tokenizer
    assert is_chat_template_prefix_preserving(proc)  # so TRL renders with this template, not a training swap
    schema = get_json_schema(zoom_environment(tool_model)().zoom)  # the tool TRL passes with the prompt
    image, crop = make_image(640, 480), make_image(200, 150, seed=1)

    # TRL: the prompt (tokenised and expanded by the processor), the generated call, then the tool suffix.
    prompt = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
    rendered = proc.apply_chat_template(conversation=[prompt], tools=[schema], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)
    prompt_ids = rendered["input_ids"][0]
    completion_ids = tok(CALL, add_special_tokens=False)["input_ids"]
    assert completion_ids[-1] == tok.eos_token_id  # generation stops at the end of the call
    tool_messages = [{"role": "tool", "name": "zoom",
                      "content": [{"type": "image", "image": crop}, {"type": "text", "text": ZOOM_REPLY}]}]
    trainer = SimpleNamespace(_is_vlm=True, processing_class=proc, chat_template=None, chat_template_kwargs={},
                              _tokenizer=tok)
    suffix_ids = GRPOTrainer._get_tool_suffix_ids(trainer, tool_messages)
    # The eos trimming: the dummy call turn's last eos is the call's end, so the suffix closes the call turn.
    assert tok.decode(suffix_ids).startswith("<|im_end|>\n<|im_start|>user\n<tool_response>\n")
    trl_ids = prompt_ids + completion_ids + suffix_ids

    # The agent loop: the whole conversation rendered as text, placeholders unexpanded.
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "zoom", "arguments": {}}}]},
        {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": ZOOM_REPLY}]},
    ]
    agent_text = tool_model.adapter.render_chat(conversation, tools=[schema] if list_tools else None)
    assert agent_text.count(CALL) == 1 and agent_text.endswith("<|im_start|>assistant\n")
    assert ("<tools>" in agent_text) is list_tools

    # Text level: TRL's ids decoded, each image's run of visual tokens folded back to one placeholder.
    pad = "<|image_pad|>"
    trl_text = re.sub(f"(?:{re.escape(pad)})+", pad, tok.decode(trl_ids))
    assert trl_text == agent_text

    # Id level: the agent's text through the model's own tokenizer, images expanded to their token counts.
    merge = proc.image_processor.merge_size ** 2
    counts = [int(rendered["image_grid_thw"][0].prod()) // merge,
              int(proc.image_processor(images=[crop])["image_grid_thw"][0].prod()) // merge]
    assert counts == [34 * 46 // 4, 35]
    agent_ids = tool_model.adapter.tokenizer(agent_text, add_special_tokens=False)["input_ids"]
    assert trl_ids == _expand(agent_ids, tool_model.adapter.image_token_id, counts)


# ====================================================================================================================
# rl/evaluate.py
# ====================================================================================================================
def test_summarize_eval_on_records():
    records = [
        {"kind": "fine", "correct": True, "tool_calls": 2, "latency_s": 1.0, "generated_tokens": 40},
        {"kind": "fine", "correct": False, "tool_calls": 0, "latency_s": 0.5, "generated_tokens": 10},
        {"kind": "fine", "correct": True, "tool_calls": 1, "latency_s": 0.5, "generated_tokens": 30, "error": ""},
        {"kind": "coarse", "correct": True, "tool_calls": 1, "latency_s": 0.25, "generated_tokens": 4},
        {"kind": "coarse", "correct": None, "tool_calls": None, "latency_s": 0.25, "generated_tokens": 6,
         "error": "RuntimeError: boom"},
    ]
    s = summarize_eval(records, 7)
    assert (s["step"], s["n"], s["n_fine"], s["errors"]) == (7, 5, 3, 1)
    assert s["accuracy"] == pytest.approx(3 / 5)
    assert s["accuracy_fine"] == pytest.approx(2 / 3) and s["accuracy_coarse"] == pytest.approx(1 / 2)
    assert s["call_rate_fine"] == pytest.approx(2 / 3) and s["call_rate_coarse"] == pytest.approx(1 / 2)
    assert s["tool_calls"] == pytest.approx(4 / 5) and s["latency_s"] == pytest.approx(0.5)
    assert s["generated_tokens"] == pytest.approx(18)

    only_fine = summarize_eval(records[:1], 0)
    assert only_fine["accuracy_coarse"] is None and only_fine["call_rate_coarse"] is None
    empty = summarize_eval([], 3)
    assert (empty["n"], empty["accuracy"], empty["errors"]) == (0, None, 0)


def test_policy_compare_args(tmp_path):
    d = tmp_path / "policy"
    base = "zoomworld-tiny"
    assert policy_compare_args(RecipeArguments(environment="zoom"), d, base) == {"model": base, "policy": str(d)}
    assert policy_compare_args(RecipeArguments(environment="crop"), d, base) == {"model": base,
                                                                                 "crop_policy": str(d)}
    assert policy_compare_args(RecipeArguments(environment="none"), d, base) == {"model": str(d)}
    # a custom eval agent: the deepeyes agents still take the crop policy, any other runs the policy as the model
    assert policy_compare_args(RecipeArguments(environment="crop", eval_agent="deepeyes@256"), d, base) == {
        "model": base, "crop_policy": str(d)}
    assert policy_compare_args(RecipeArguments(environment="crop", eval_agent="crop@qwen3vl"), d, base) == {
        "model": str(d)}
    assert policy_compare_args(RecipeArguments(environment="zoom", eval_agent="plain@256"), d, base) == {
        "model": str(d)}
    assert policy_compare_args(RecipeArguments(environment="none", eval_agent="qzoom-tool"), d, base) == {
        "model": str(d)}


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_progress_writes_a_png(tmp_path):
    logs = [{"step": i, "reward": 0.1 * i, "tools/call_frequency": 0.5, "rollouts/call_rate_fine": 0.8,
             "rollouts/call_rate_coarse": 0.1} for i in range(1, 8)]
    logs += [{"step": 8, "reward": float("nan")}, {"step": 8, "train_runtime": 3.0}]  # skipped, not plotted
    records = [{"kind": "fine", "correct": True, "tool_calls": 1}, {"kind": "coarse", "correct": False}]
    evals = [summarize_eval(records, 0), summarize_eval(records[:1], 8)]
    out = plot_progress(logs, evals, tmp_path / "progress.png", "GRPO test")
    assert out == tmp_path / "progress.png" and _is_png(out)
    assert _is_png(plot_progress(logs[:2], [], tmp_path / "no_evals.png", "no evals"))
    assert _is_png(plot_progress([], [], tmp_path / "nothing.png", "nothing yet"))


def test_read_history(tmp_path):
    assert read_history(tmp_path / "missing") == []
    lines = [summarize_eval([{"kind": "fine", "correct": True}], s) for s in (0, 5)]
    (tmp_path / "history.jsonl").write_text(json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n",
                                            encoding="utf-8")
    assert read_history(tmp_path) == lines


def test_replot_redraws_the_progress_plot_from_the_last_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        replot(tmp_path)
    logs = [{"step": s, "reward": 0.1 * s, "tools/call_frequency": 1.0, "rollouts/call_rate_coarse": 1 - s / 10}
            for s in range(1, 11)]
    for step, upto in ((5, 5), (10, 10)):  # the latest checkpoint holds the longest history
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"log_history": logs[:upto]}))
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "history.jsonl").write_text(json.dumps(summarize_eval([], 0) | {"n": 3}) + "\n")
    path = replot(tmp_path)
    assert path == tmp_path / "grpo_progress.png" and path.read_bytes()[:4] == b"\x89PNG"


def test_compare_takes_a_policy_as_its_model(tmp_path):
    """The no-tool recipe's held-out run: `compare --model POLICY` (a delta on a base), its alphabet the base's."""
    from qzoom_agent.bench import runner

    cfg = runner.CompareConfig("zoomworld:hr", ["plain@256"], 2, 0, str(tmp_path), model="zoomworld-tiny-tool")
    summary = runner.run_compare(cfg)
    records = [json.loads(line) for line in (tmp_path / runner.RESULTS).read_text().splitlines()]
    assert len(records) == 2 and summary["agents"]["plain@256"]["n"] == 2
    run = json.loads((tmp_path / runner.RUN).read_text())
    assert run["args"]["alphabet"] == "0123456789" and run["args"]["model"].endswith("policy")  # the policy's own
    other = runner.CompareConfig("zoomworld:hr", ["plain@256"], 2, 0, str(tmp_path), model="zoomworld-tiny")
    with pytest.raises(ValueError, match="other arguments"):  # another model (its base) is another run
        runner.run_compare(other)
