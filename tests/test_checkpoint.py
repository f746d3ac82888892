"""Saving and loading Q-Zoom heads: our adapter format and official full-model checkpoints."""

from __future__ import annotations

import json
import logging
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qzoom_agent import checkpoint as ckpt
from qzoom_agent import checkpoint_official as official
from qzoom_agent.backbones import BackboneAdapter, adapter_class_for
from qzoom_agent.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    is_adapter_dir,
    load_adapter,
    load_heads,
    save_adapter,
)
from qzoom_agent.checkpoint_official import (
    HEAD_MODULES,
    OFFICIAL_INDEX,
    OFFICIAL_WEIGHTS,
    is_official_checkpoint,
    load_official,
    write_official_checkpoint,
)
from qzoom_agent.config import QZoomConfig
from qzoom_agent.heads import QZoomHeads
from qzoom_agent.tiny import FAMILIES, build_tiny

K, T = 2, 2


@cache
def _model(family: str, hidden: int = 64, layers: int | None = None, seed: int = 0):
    return build_tiny(family, hidden=hidden, layers=layers, seed=seed)


def adapter_for(family: str, **kwargs) -> BackboneAdapter:
    model, tok = _model(family, **kwargs)
    cls = adapter_class_for(model.config)
    return cls(model, tok, cls.default_image_processor(model.config))


def trained_heads(adapter: BackboneAdapter, seed: int = 1) -> QZoomHeads:
    """Heads from the base whose weights were moved, so they differ from a fresh from_base copy."""
    heads = QZoomHeads.from_base(adapter, K, T)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return heads


def config_for(**kwargs) -> QZoomConfig:
    fields = dict(twig_K=K, twig_T=T, gate_threshold=0.3, reuse_src_pos=False, min_tokens=16, max_tokens=64)
    return QZoomConfig(**{**fields, **kwargs})


def assert_same_heads(a: QZoomHeads, b: QZoomHeads) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def gate_logit(adapter: BackboneAdapter, heads: QZoomHeads) -> torch.Tensor:
    h = torch.randn(1, 10, adapter.hidden_size, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(10)[None] if adapter.family == "llava" else torch.arange(10).view(1, 1, -1).expand(3, 1, -1)
    with torch.no_grad():
        return heads.gate_logit(h, adapter.rotary(h, pos), None)


def px(adapter: BackboneAdapter) -> int:
    return int(adapter.px_per_token)


# ---- adapter format ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_round_trip(tmp_path: Path, family: str) -> None:
    src = adapter_for(family)
    heads, config = trained_heads(src), config_for()
    out = save_adapter(heads, config, tmp_path / "adapter", base_model="tiny/" + family)
    assert is_adapter_dir(out) and not is_official_checkpoint(out)
    meta = json.loads((out / ADAPTER_CONFIG).read_text())
    assert (meta["format"], meta["version"], meta["base_model"]) == ("qzoom-adapter", 1, "tiny/" + family)

    dst = adapter_for(family, seed=1)  # another model of the same shape: its from_base heads differ
    assert not torch.equal(QZoomHeads.from_base(dst, K, T).twig_layers[0].mlp.up_proj.weight,
                           heads.twig_layers[0].mlp.up_proj.weight)
    loaded, loaded_config = load_adapter(out, dst)
    assert_same_heads(heads, loaded)
    assert loaded_config == config
    assert loaded.branch_layer == K and loaded.T == T
    assert torch.equal(gate_logit(src, heads), gate_logit(dst, loaded))
    loaded2, _ = load_heads(out, dst)  # dispatch
    assert_same_heads(heads, loaded2)


def test_adapter_file_holds_only_head_keys(tmp_path: Path) -> None:
    adapter = adapter_for("qwen2_5_vl")
    heads = trained_heads(adapter)
    out = save_adapter(heads, config_for(), tmp_path)
    with safe_open(str(out / ADAPTER_WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(heads.state_dict())
    assert all(k.split(".")[0] in HEAD_MODULES for k in keys)
    assert not any(k.startswith("layers.") or "embed_tokens" in k or "visual" in k for k in keys)
    assert {"high_res_head.weight", "high_res_head.bias", "twig_layers.0.self_attn.q_proj.weight"} <= keys
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_interrupted_save_keeps_the_good_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = adapter_for("qwen2_5_vl")
    good = trained_heads(adapter, seed=1)
    save_adapter(good, config_for(), tmp_path)

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)  # half a file, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(trained_heads(adapter, seed=2), config_for(gate_threshold=0.9), tmp_path)
    monkeypatch.undo()
    loaded, config = load_adapter(tmp_path, adapter)
    assert_same_heads(good, loaded)
    assert config.gate_threshold == 0.3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])


def test_adapter_missing_files(tmp_path: Path) -> None:
    adapter = adapter_for("llava")
    out = save_adapter(trained_heads(adapter), config_for(), tmp_path / "a")
    (out / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="weights not found"):
        load_adapter(out, adapter)
    with pytest.raises(FileNotFoundError, match="adapter config not found"):
        load_adapter(tmp_path / "nowhere", adapter)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_heads(tmp_path / "nowhere", adapter)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a Q-Zoom adapter"):
        load_heads(tmp_path / "empty", adapter)


def test_adapter_wrong_format(tmp_path: Path) -> None:
    adapter = adapter_for("llava")
    out = save_adapter(trained_heads(adapter), config_for(), tmp_path)
    (out / ADAPTER_CONFIG).write_text(json.dumps({"format": "peft", "qzoom": {}}))
    with pytest.raises(ValueError, match="not a Q-Zoom adapter config"):
        load_adapter(out, adapter)


def test_adapter_key_mismatch(tmp_path: Path) -> None:
    adapter = adapter_for("qwen3_vl")
    out = save_adapter(trained_heads(adapter), config_for(), tmp_path)
    state = load_file(str(out / ADAPTER_WEIGHTS))
    del state["twig_layers.1.mlp.down_proj.weight"]
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(out / ADAPTER_WEIGHTS))
    with pytest.raises(ValueError, match="missing keys: twig_layers.1.mlp.down_proj.weight") as err:
        load_adapter(out, adapter)
    assert "unexpected keys: extra.weight" in str(err.value)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_adapter_shape_mismatch(tmp_path: Path, family: str) -> None:
    out = save_adapter(trained_heads(adapter_for(family)), config_for(), tmp_path)
    with pytest.raises(ValueError, match="shape mismatch.*trained for another backbone"):
        load_adapter(out, adapter_for(family, hidden=96))


def test_adapter_branch_does_not_fit(tmp_path: Path) -> None:
    out = save_adapter(trained_heads(adapter_for("qwen2_5_vl")), config_for(), tmp_path)
    with pytest.raises(ValueError, match="exceeds the 3 decoder layers"):
        load_adapter(out, adapter_for("qwen2_5_vl", layers=3))
    meta = json.loads((out / ADAPTER_CONFIG).read_text())
    meta["qzoom"]["twig_K"] = 1
    (out / ADAPTER_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="too early"):
        load_adapter(out, adapter_for("qwen3_vl"))  # deepstack: K >= 2


# ---- official checkpoints ------------------------------------------------------------------------------------
OFFICIAL_CASES = [
    (family, layout, shards)
    for family in ("qwen2_5_vl", "qwen3_vl")
    for layout in ("old", "language_model")
    for shards in (1, 3)
] + [("llava", "language_model", 1), ("llava", "language_model", 3)]


@pytest.mark.parametrize(("family", "layout", "shards"), OFFICIAL_CASES)
def test_official_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, family, layout, shards) -> None:
    src = adapter_for(family)
    heads, config = trained_heads(src), config_for()
    out = write_official_checkpoint(src.model, heads, config, tmp_path, layout=layout, shards=shards,
                                    px_per_token=px(src))
    assert is_official_checkpoint(out) and not is_adapter_dir(out)
    prefix = "model." if layout == "old" else "model.language_model."
    if shards == 1:
        with safe_open(str(out / OFFICIAL_WEIGHTS), framework="pt") as f:
            keys = set(f.keys())
    else:
        weight_map = json.loads((out / OFFICIAL_INDEX).read_text())["weight_map"]
        keys = set(weight_map)
        last = "model-00003-of-00003.safetensors"
        assert {weight_map[k] for k in keys if k.startswith(prefix + "twig_layers.")} == {last}
    assert prefix + "high_res_head.weight" in keys and "lm_head.weight" in keys
    if layout == "old":
        assert "model.layers.0.input_layernorm.weight" in keys
        assert not any(k.startswith("model.language_model.") for k in keys)
    else:
        assert "model.language_model.layers.0.input_layernorm.weight" in keys

    opened: list[str] = []
    real_open = official.safe_open

    def spy(filename, *args, **kwargs):
        opened.append(Path(filename).name)
        return real_open(filename, *args, **kwargs)

    monkeypatch.setattr(official, "safe_open", spy)
    dst = adapter_for(family, seed=1)
    loaded, loaded_config = load_official(out, dst)
    if shards > 1:
        assert opened == [last]  # the index picks the one shard with head keys
    assert_same_heads(heads, loaded)
    assert (loaded_config.twig_K, loaded_config.twig_T) == (K, T)
    assert loaded_config.gate_threshold == pytest.approx(0.3)
    assert loaded_config.reuse_src_pos is False and loaded_config.roi_mode == "official"
    # the view budget is the task's, not the training min/max_pixels the checkpoint records (16-64 tokens here)
    assert (loaded_config.min_tokens, loaded_config.max_tokens) == (256, 576)
    assert loaded_config.twig_rope is (family != "llava") and loaded_config.gate
    assert_same_heads(heads, load_heads(out, dst)[0])


def _edit_config(out: Path, edit) -> None:
    cfg = json.loads((out / "config.json").read_text())
    edit(cfg)
    (out / "config.json").write_text(json.dumps(cfg))


OFFICIAL_KEYS = ("enable_twig", "twig_K", "twig_T", "roi_source", "roi_loss", "roi_multi_head", "enable_high_res",
                 "high_res_K", "high_res_T", "high_res_thresh", "reuse_src_pos", "min_pixels", "max_pixels")


def test_official_keys_in_text_config(tmp_path: Path) -> None:
    src = adapter_for("qwen3_vl")
    heads = trained_heads(src)
    out = write_official_checkpoint(src.model, heads, config_for(), tmp_path, shards=3, px_per_token=32)

    def move(cfg):
        cfg["text_config"].update({k: cfg.pop(k) for k in OFFICIAL_KEYS})

    _edit_config(out, move)
    assert is_official_checkpoint(out)
    loaded, config = load_official(out, adapter_for("qwen3_vl", seed=1))
    assert_same_heads(heads, loaded)
    assert (config.twig_K, config.min_tokens, config.max_tokens, config.reuse_src_pos) == (K, 256, 576, False)


def test_official_defaults_when_keys_are_absent(tmp_path: Path) -> None:
    src = adapter_for("qwen2_5_vl")
    out = write_official_checkpoint(src.model, trained_heads(src), config_for(reuse_src_pos=True), tmp_path)

    def strip(cfg):
        for key in ("reuse_src_pos", "high_res_thresh", "min_pixels", "max_pixels", "high_res_K", "high_res_T",
                    "roi_multi_head"):
            del cfg[key]

    _edit_config(out, strip)
    _, config = load_official(out, src)
    # the released modules' defaults: reuse_src_pos False, gate 0.1, RoI 0.1, unscaled single-head scores
    assert (config.reuse_src_pos, config.gate_threshold, config.roi_threshold) == (False, 0.1, 0.1)
    assert (config.roi_multi_head, config.roi_mode, config.gate) == (False, "official", True)
    assert (config.min_tokens, config.max_tokens) == (256, 576)
    _edit_config(out, lambda cfg: cfg.update(min_pixels=100 * 28 * 28, max_pixels=40 * 28 * 28 + 5,
                                             roi_conf_thresh=0.07, roi_multi_head=True))
    _, config = load_official(out, src)
    assert (config.min_tokens, config.max_tokens) == (256, 576)
    assert (config.roi_threshold, config.roi_multi_head) == (0.07, True)


def test_official_without_gate_runs_the_twig_every_time(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = adapter_for("qwen2_5_vl")
    heads = trained_heads(src)
    out = write_official_checkpoint(src.model, heads, config_for(), tmp_path / "stage1", layout="old")
    state = load_file(str(out / OFFICIAL_WEIGHTS))
    save_file({k: v for k, v in state.items() if "high_res" not in k}, str(out / OFFICIAL_WEIGHTS))
    _edit_config(out, lambda cfg: cfg.update(enable_high_res=False))
    loaded, config = load_official(out, src)
    assert not loaded.has_gate and not config.gate and loaded.high_res_layers is None
    assert set(loaded.state_dict()) == {k for k in heads.state_dict() if k.startswith("twig_layers.")}
    assert torch.equal(loaded.twig_layers[1].self_attn.o_proj.weight, heads.twig_layers[1].self_attn.o_proj.weight)
    with pytest.raises(ValueError, match="no gate"):
        gate_logit(src, loaded)

    # gate weights that the config disables are not used, and the loader says so
    out = write_official_checkpoint(src.model, heads, config_for(), tmp_path / "disabled")
    _edit_config(out, lambda cfg: cfg.update(enable_high_res=False))
    with caplog.at_level(logging.WARNING, logger="qzoom_agent.checkpoint_official"):
        loaded, config = load_official(out, src)
    assert not loaded.has_gate and "not used: model.language_model.high_res" in caplog.text


def test_official_unknown_head_keys_are_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = adapter_for("qwen2_5_vl")
    heads = trained_heads(src)
    out = write_official_checkpoint(src.model, heads, config_for(), tmp_path)
    state = load_file(str(out / OFFICIAL_WEIGHTS))
    state["model.language_model.roi_proj.weight"] = torch.zeros(2, 2)
    save_file(state, str(out / OFFICIAL_WEIGHTS))
    with caplog.at_level(logging.WARNING, logger="qzoom_agent.checkpoint_official"):
        loaded, _ = load_official(out, src)
    assert "1 head tensor(s) not used: model.language_model.roi_proj.weight" in caplog.text
    assert_same_heads(heads, loaded)
    caplog.clear()
    out = write_official_checkpoint(src.model, heads, config_for(), tmp_path / "clean")
    with caplog.at_level(logging.WARNING, logger="qzoom_agent.checkpoint_official"):
        load_official(out, src)
    assert "not used" not in caplog.text  # a clean checkpoint warns about nothing


def test_sdrpn_llava_checkpoint_with_twig_norm(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """SD-RPN's LLaVA layout: model.twig_layers.* and model.twig_norm.weight, no gate, roi_super_type v1."""
    src = adapter_for("llava")
    heads = QZoomHeads.from_base(src, K, T, gate=False, twig_norm=True)
    with torch.no_grad():
        heads.twig_norm.weight.uniform_(0.5, 1.5)
        heads.twig_layers[0].mlp.up_proj.weight.add_(0.1)
    cfg = config_for(gate=False, twig_norm=True)
    for layout, shards in (("old", 1), ("old", 2), ("language_model", 1)):
        out = write_official_checkpoint(src.model, heads, cfg, tmp_path / f"{layout}{shards}", layout=layout,
                                        shards=shards, px_per_token=px(src),
                                        extra_keys={"roi_super_type": "v1", "reuse_src_pos": None, "min_pixels": None,
                                                    "max_pixels": None})
        keys = set(official._weight_files(out))
        prefix = "model." if layout == "old" else "model.language_model."
        assert prefix + "twig_norm.weight" in keys and not any("high_res" in k for k in keys)
        loaded, config = load_official(out, adapter_for("llava", seed=1))
        assert_same_heads(heads, loaded)  # twig_norm included: nothing skipped
        assert (config.twig_norm, config.twig_rope, config.gate, config.reuse_src_pos) == (True, False, False, False)
        assert config.roi_threshold == 0.15  # SD-RPN's LLaVA module
    # twig_norm weights of a checkpoint that does not use them (roi_super_type lazy) are reported, not loaded
    _edit_config(out, lambda c: c.update(roi_super_type="lazy"))
    with caplog.at_level(logging.WARNING, logger="qzoom_agent.checkpoint_official"):
        loaded, config = load_official(out, adapter_for("llava", seed=1))
    assert loaded.twig_norm is None and not config.twig_norm and "twig_norm.weight" in caplog.text


def test_official_errors(tmp_path: Path) -> None:
    src = adapter_for("qwen2_5_vl")
    heads = trained_heads(src)

    out = write_official_checkpoint(src.model, heads, config_for(), tmp_path / "gate_k")
    _edit_config(out, lambda cfg: cfg.update(high_res_K=1))
    with pytest.raises(ValueError, match="share one branch point"):
        load_official(out, src)

    out = write_official_checkpoint(src.model, heads, config_for(), tmp_path / "no_twig")
    (out / "config.json").write_text(json.dumps(src.model.config.to_dict()))
    with pytest.raises(ValueError, match="no Q-Zoom twig"):
        load_official(out, src)

    out = write_official_checkpoint(src.model, heads, config_for(), tmp_path / "no_weights")
    (out / OFFICIAL_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_official(out, src)

    out = write_official_checkpoint(src.model, heads, config_for(), tmp_path / "missing_key", shards=3)
    last = out / "model-00003-of-00003.safetensors"
    state = load_file(str(last))
    del state["model.language_model.twig_layers.0.self_attn.k_proj.bias"]
    save_file(state, str(last))  # the index still lists the key: reported as missing all the same
    with pytest.raises(ValueError, match="missing keys: twig_layers.0.self_attn.k_proj.bias"):
        load_official(out, src)
    index = json.loads((out / OFFICIAL_INDEX).read_text())
    del index["weight_map"]["model.language_model.twig_layers.0.self_attn.k_proj.bias"]
    (out / OFFICIAL_INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="missing keys: twig_layers.0.self_attn.k_proj.bias"):
        load_official(out, src)
    (out / "model-00003-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="weight shard not found"):
        load_official(out, src)

    out = write_official_checkpoint(src.model, heads, config_for(), tmp_path / "shape")
    with pytest.raises(ValueError, match="trained for another backbone"):
        load_official(out, adapter_for("qwen2_5_vl", hidden=96))
    with pytest.raises(ValueError, match="exceeds the 3 decoder layers"):
        load_official(out, adapter_for("qwen2_5_vl", layers=3))


@pytest.mark.parametrize("layout", ["language_model", "old"])
def test_official_checkpoint_loads_as_a_whole_model(tmp_path, layout):
    """A released Q-Zoom model directory is both the base model and the heads: from_pretrained finds them."""
    from PIL import Image

    from qzoom_agent.backbones import adapter_class_for
    from qzoom_agent.config import QZoomConfig
    from qzoom_agent.heads import QZoomHeads
    from qzoom_agent.model import QZoomModel

    model, tok = build_tiny("qwen2_5_vl", seed=4)
    cls = adapter_class_for(model.config)
    processor = cls.default_image_processor(model.config)
    adapter = cls(model, tok, processor)
    heads = QZoomHeads.from_base(adapter, 2, 2)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.01 * torch.randn_like(p))
    cfg = QZoomConfig(twig_K=2, twig_T=2, gate_threshold=0.0, min_tokens=16, max_tokens=64)
    out = write_official_checkpoint(model, heads, cfg, tmp_path / "official", layout=layout)
    tok.save_pretrained(out)
    processor.save_pretrained(out)

    qm = QZoomModel.from_pretrained(out)
    assert qm.heads is not None and (qm.config.twig_K, qm.config.gate_threshold) == (2, 0.0)
    loaded = qm.heads.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in heads.state_dict().items())
    base = qm.adapter.model.state_dict()
    assert all(torch.equal(base[k], v) for k, v in model.state_dict().items())  # the base weights load too
    ans = qm.answer(Image.new("RGB", (300, 200), (9, 99, 199)), "Color?", mode="auto", max_new_tokens=2)
    assert ans.gate_score is not None and ans.zoomed == (ans.bbox is not None)
