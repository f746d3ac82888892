"""`qzoom-agent bench-scale`: the real architectures' configs, the CPU size, a tiny run's outputs, and bad input."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from qzoom_agent.bench import scale, scale_report, scale_run
from qzoom_agent.bench.scale_archs import ARCHS, REAL, arch_spec, hf_config, parameter_counts
from qzoom_agent.checks import UsageError
from qzoom_agent.cli import main
from qzoom_agent.config import budget_for
from qzoom_agent.tokenization import build_char_tokenizer

ROW_KEYS = {"budget", "grid", "roi_tokens", "prompt_tokens", "spliced_tokens", "plain_prefill_s", "plain_answer_s",
            "plain_engine_s",
            "qzoom_rate0_s", "qzoom_rate05_s", "qzoom_rate1_s", "decode_per_token_s", "gate_extra_s", "twig_extra_s",
            "twig_gate_extra_s", "roi_pass_extra_s", "rate0_perceive_s", "rate0_look_s", "rate0_decode_s",
            "rate1_perceive_s", "rate1_zoom_s", "rate1_decode_s", "rounds_s", "attn"}


def _no_flash(monkeypatch):
    """Make flash-attn absent whatever is installed, so the skip is exercised everywhere."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale")
    mp = pytest.MonkeyPatch()
    _no_flash(mp)
    try:
        cfg = scale.ScaleConfig(arch="qwen2_5_vl_7b", size="tiny", budgets=(64, 256), rounds=2, new_tokens=3,
                                device="cpu", out=str(out))
        result = scale.run_scale(cfg)
    finally:
        mp.undo()
    return result, out


def test_real_configs_parse_into_hf_configs():
    c7 = hf_config(arch_spec("qwen2_5_vl_7b", "full"), build_char_tokenizer("qwen2_5_vl"))
    t, v = c7.text_config, c7.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (3584, 28, 28, 4)
    assert (t.intermediate_size, t.vocab_size, t.rope_parameters["mrope_section"]) == (18944, 152064, [16, 24, 24])
    assert (v.depth, v.hidden_size, v.patch_size, v.spatial_merge_size) == (32, 1280, 14, 2)
    assert (v.fullatt_block_indexes, v.out_hidden_size) == ([7, 15, 23, 31], 3584)
    c4 = hf_config(arch_spec("qwen3_vl_4b", "full"), build_char_tokenizer("qwen3_vl"))
    t, v = c4.text_config, c4.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (
        2560, 36, 32, 8, 128)
    assert t.rope_parameters["mrope_section"] == [24, 20, 20] and t.rope_parameters["mrope_interleaved"]
    assert (v.depth, v.hidden_size, v.patch_size, v.deepstack_visual_indexes) == (24, 1024, 16, [5, 11, 17])
    assert (arch_spec("qwen2_5_vl_7b", "full").twig_K, arch_spec("qwen3_vl_4b", "full").twig_K) == (18, 24)
    # the 7B's decoder holds about 6.5 B of its 8.3 B parameters
    assert 6.4e9 < parameter_counts(arch_spec("qwen2_5_vl_7b", "full"))["decoder"] < 6.6e9


@pytest.mark.parametrize("arch", ARCHS)
def test_medium_keeps_the_architecture_at_cpu_size(arch):
    full, medium = arch_spec(arch, "full"), arch_spec(arch, "medium")
    t, real_t = medium.config["text_config"], REAL[arch]["text_config"]
    assert medium.hidden >= 1024 and medium.layers >= 16
    assert t["num_attention_heads"] < real_t["num_attention_heads"]
    head_dim = lambda c: c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]  # noqa: E731
    assert head_dim(t) == head_dim(real_t)  # so the real M-RoPE sections still fit
    assert medium.config["vision_config"]["depth"] < full.config["vision_config"]["depth"]
    assert medium.config["vision_config"]["hidden_size"] < full.config["vision_config"]["hidden_size"]
    assert medium.twig_K + medium.twig_T <= medium.layers
    assert abs(medium.twig_K / medium.layers - full.twig_K / full.layers) < 0.05
    config = hf_config(medium, build_char_tokenizer(medium.family))
    assert config.text_config.hidden_size == medium.hidden


def test_grid_and_image_hit_the_budget_exactly():
    assert scale.grid_for(576) == (24, 24) and scale.grid_for(2048) == (32, 64)
    with pytest.raises(UsageError, match="577"):
        scale.grid_for(577)
    for factor, budget, source_scale in ((28, 576, 1.0), (32, 2048, 2.0)):
        image = scale_run.synthetic_image(scale.grid_for(budget), factor, source_scale, 0)
        from qzoom_agent.images import fit_to_token_budget

        lo, hi = budget_for(budget)
        w, h = fit_to_token_budget(*image.size, factor=factor, min_tokens=lo, max_tokens=hi)
        assert (w // factor) * (h // factor) == budget
    box = scale_run.roi_box(image)
    assert box.width * 2 == image.width and box.height * 2 == image.height


def test_tiny_run_writes_every_output(tiny_run):
    result, out = tiny_run
    saved = json.loads((out / "scale.json").read_text())
    assert [r["budget"] for r in saved["rows"]] == [64, 256]
    for row in saved["rows"]:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["grid"][0] * row["grid"][1] == row["budget"]
        for key in ("plain_prefill_s", "plain_answer_s", "plain_engine_s", "qzoom_rate0_s", "qzoom_rate1_s",
                    "decode_per_token_s"):
            assert row[key] > 0, key
        assert row["qzoom_rate0_s"] <= row["qzoom_rate05_s"] <= row["qzoom_rate1_s"] or \
            row["qzoom_rate1_s"] <= row["qzoom_rate05_s"] <= row["qzoom_rate0_s"]
        # the quarter-area RoI holds a quarter of the budget, raised to min(256, budget)
        assert row["roi_tokens"] == max(row["budget"] // 4, budget_for(row["budget"])[0])
        assert row["spliced_tokens"] - row["prompt_tokens"] == row["roi_tokens"] + 2  # its start and end tokens
        assert all(len(v) == 2 for v in row["rounds_s"].values())
    assert saved["dtype"] == "float32" and saved["device"] == "cpu" and saved["attention"] == ["sdpa"]
    assert saved["machine"]["torch"] == torch.__version__ and saved["error"] is None
    speed = saved["ratios"]["sdpa"]
    assert (speed["qzoom_budget_used"], speed["plain_budget_used"]) == (64, 256)  # 576 / 4096 were not measured
    assert speed["speedup"]["rate1"] == pytest.approx(
        saved["rows"][1]["plain_answer_s"] / saved["rows"][0]["qzoom_rate1_s"])
    assert speed["speedup_engine"]["rate0"] == pytest.approx(  # like for like: the plain model on the same engine
        saved["rows"][1]["plain_engine_s"] / saved["rows"][0]["qzoom_rate0_s"])
    assert speed["overhead_same_budget"]["64"]["rate1"] == pytest.approx(
        saved["rows"][0]["qzoom_rate1_s"] / saved["rows"][0]["plain_engine_s"])
    text = (out / "scale.md").read_text()
    for column, _, _ in scale_report.COLUMNS:
        assert f"| {column} " in text or f"| {column} |" in text, column
    png = (out / "bench_scale.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_flash_attention_absence_is_reported(tiny_run, monkeypatch):
    result, out = tiny_run
    assert "not installed" in result["attention_skipped"]["flash_attention_2"]
    assert "flash_attention_2 skipped: the flash-attn package is not installed" in (out / "scale.md").read_text()
    _no_flash(monkeypatch)
    assert scale.attention_plan("auto", cuda=True) == (["sdpa"], {
        "flash_attention_2": "the flash-attn package is not installed"})
    with pytest.raises(UsageError, match="no attention implementation can run"):
        scale.attention_plan("flash_attention_2", cuda=True)


@pytest.mark.parametrize(("args", "message"), [
    (["--arch", "llama"], "invalid choice"),
    (["--budgets", "256,abc"], "--budgets must be positive integers"),
    (["--budgets", "577"], "does not tile a near-square grid"),
    (["--new-tokens", "1"], "--new-tokens must be at least 2"),
    (["--attn", "eager"], "--attn must be auto or a comma list"),
    (["--device", "cuda"], "torch sees no CUDA device"),
    (["--device", "tpu"], "--device must be auto, cpu or cuda"),
    (["--source-scale", "0.5"], "--source-scale must be at least 1"),
])
def test_bad_input_exits_2_with_one_line(capsys, monkeypatch, args, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench-scale", "--size", "tiny", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_out_of_memory_names_the_budget_and_keeps_the_rows(tmp_path, monkeypatch):
    real = scale_run.measure_on_device

    def run_or_fail(qm, budget, *args, **kwargs):
        if budget == 256:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(qm, budget, *args, **kwargs)

    monkeypatch.setattr(scale_run, "measure_on_device", run_or_fail)
    cfg = scale.ScaleConfig(arch="qwen3_vl_4b", size="tiny", budgets=(64, 256), rounds=1, new_tokens=2,
                            device="cpu", attn="sdpa", out=str(tmp_path))
    with pytest.raises(UsageError, match="out of memory at budget 256 tokens") as err:
        scale.run_scale(cfg)
    assert "1 rows measured before it" in str(err.value)
    saved = json.loads((tmp_path / "scale.json").read_text())
    assert [r["budget"] for r in saved["rows"]] == [64] and "256" in saved["error"]
    assert saved["rows"][0]["qzoom_rate1_s"] > 0  # Qwen3-VL's deepstack path ran too


def test_weights_larger_than_memory_are_refused_before_building(capsys, monkeypatch):
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 2**30 // 4096}  # a machine with 1 GiB of RAM
    monkeypatch.setattr(scale_run.os, "sysconf", lambda name: pages[name])
    monkeypatch.setattr(scale_run, "build_model", lambda *a, **k: pytest.fail("built a model that cannot fit"))
    assert main(["bench-scale", "--size", "medium", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "qwen2_5_vl_7b at size medium needs about 2 GiB" in err and "than the 1 GiB of cpu" in err, err
