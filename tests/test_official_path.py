"""The released inference path end to end on tiny models: Qwen3-VL's query sinks, SD-RPN's LLaVA path (square
padding, several RoIs at contiguous positions, twig_norm, no RoPE in the twig), heads without a gate, presets."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import QUESTION, make_image, make_model

from qzoom_agent import roi_official
from qzoom_agent.backbones import VisualFeatures
from qzoom_agent.boxes import Box, box_to_cells, crop
from qzoom_agent.cli import main
from qzoom_agent.model import QZoomModel
from qzoom_agent.perception import Located
from qzoom_agent.presets import get_preset, preset_names
from qzoom_agent.tiny import make_tiny


@pytest.mark.parametrize("threshold", [0.3, 0.5])
def test_qwen3_official_rule_masks_the_sinks_the_first_token_finds(threshold):
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb

    qm = make_model("qwen3_vl", twig_K=3, roi_threshold=threshold)
    a = qm.adapter
    with torch.no_grad():  # sharper keys, so that some visual tokens look like sinks to the first token
        qm.heads.twig_layers[-1].self_attn.k_proj.weight.mul_(4.0)
    with torch.inference_mode():
        p = qm.perceive(make_image(), QUESTION, roi="always", budget=(16, 64))
        fp = p.state
        start, end = fp.prompt.image_start, fp.prompt.image_end
        states = qm.heads.twig_states(fp.hidden_k, fp.rotary, fp.mask)
        first = qm.heads.first_token_scores(a, states, fp.rotary, start, end)
        # head 0 of the first token against the visual keys, built here from the HF layer itself
        attn = qm.heads.twig_layers[-1].self_attn
        x = qm.heads.twig_layers[-1].input_layernorm(states)
        d = attn.head_dim
        q = attn.q_norm(attn.q_proj(x).view(1, x.shape[1], -1, d)).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(x).view(1, x.shape[1], -1, d)).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *fp.rotary)
        manual = (q[0, 0, 0] @ k[0, 0, start:end].T) / math.sqrt(d)
    assert torch.allclose(first, manual, atol=1e-5)
    keep = roi_official.qwen3_sink_keep(first.reshape(p.grid))
    assert 0 < int((~keep).sum()) < keep.numel()
    geometry = dict(threshold=threshold, grid=p.grid, resized_size=p.resized_size, source_size=p.image_size)
    expected = roi_official.qwen_regions(p.roi_logits.float(), keep=keep, **geometry)
    got = [(b.as_tuple(), c) for b, c in zip(p.boxes, p.cells, strict=True)]
    assert [(b.as_tuple(), c) for b, c in expected] == got
    unmasked = roi_official.qwen_regions(p.roi_logits.float(), keep=None, **geometry)
    if threshold == 0.3:
        assert p.boxes  # a zoom goes through the mask
    else:
        assert not p.boxes and unmasked  # the sinks alone were over the threshold: masking them means no zoom


def test_llava_view_is_padded_to_a_square_and_crops_are_stretched():
    a = make_model("llava").adapter
    view = a.prepare_image(make_image(451, 300), min_tokens=16, max_tokens=1000)
    assert view.canvas == (0, 75, 451, 451) and view.source_size == (451, 300)
    # the padding rows hold the processor's mean colour: about zero once normalised
    assert view.pixel_values[0, :, 0, :].abs().max() < 0.02
    assert view.pixel_values[0, :, view.pixel_values.shape[2] // 2, :].abs().max() > 0.5  # the image itself
    gh, _ = view.grid
    # the image's top edge lies 75 / 451 of the way down the square: its first row of cells is below row 0
    r0, _, r1, _ = box_to_cells(Box(0, 0, 451, 300), view.grid, view.resized_size, view.source_size, view.canvas)
    assert r0 == math.floor(75 * gh / 451) and r1 == math.ceil(375 * gh / 451)
    roi = a.prepare_roi(make_image(200, 100), min_tokens=16, max_tokens=1000)
    assert roi.canvas is None and roi.source_size == (200, 100)


def test_llava_splices_every_box_at_contiguous_positions():
    qm = make_model("llava")
    a = qm.adapter
    img = make_image()
    boxes = [Box(10, 20, 150, 120), Box(200, 150, 400, 290)]
    with torch.inference_mode():
        fp = qm.prefill(img, QUESTION, budget=(16, 1000))
        src = fp.prompt.image
        cells = [box_to_cells(b, src.grid, src.resized_size, src.source_size, src.canvas) for b in boxes]
        pre = qm.zoom(fp, Located(None, boxes, cells))
        logits, n_roi = pre.logits, pre.roi_tokens
        rois = [a.prepare_roi(crop(img, b), min_tokens=16, max_tokens=1000) for b in boxes]
        fp2 = qm.prefill(img, QUESTION, budget=(16, 1000))
        splice = a.splice_roi(fp2.prompt, fp2.positions, rois, cells, qm.reuse_src_pos)
        # the stock HF forward on the spliced ids, all three images in order, plain positions
        hf = a.model(**a.hf_inputs(splice.input_ids, [src, *rois])).logits[:, -1]
    assert qm.reuse_src_pos is False  # SD-RPN's contiguous positions by default
    assert n_roi == sum(r.n_tokens for r in rois) == 2 * src.n_tokens
    assert torch.equal(splice.positions, torch.arange(splice.input_ids.shape[1])[None])
    assert (logits - hf).abs().max().item() <= 1e-4  # prefix reuse with two RoIs is exact


def test_llava_twig_norm_and_no_rope():
    qm = make_model("llava", twig_norm=True, twig_rope=False)
    heads, a = qm.heads, qm.adapter
    assert heads.twig_norm is not None and torch.all(heads.twig_norm.weight == 1)
    with torch.no_grad():
        heads.twig_norm.weight.fill_(2.0)
    with torch.inference_mode():
        fp = qm.prefill(make_image(), QUESTION, budget=(16, 1000))
        start, end = fp.prompt.image_start, fp.prompt.image_end
        raw = fp.hidden_k
        for layer in heads.twig_layers[:-1]:
            raw = layer(raw, attention_mask=fp.mask, position_embeddings=fp.rotary)
        states = heads.twig_states(fp.hidden_k, fp.rotary, fp.mask)
        scores = heads.roi_scores(a, states, fp.rotary, start, end, rope=False)
        last = heads.twig_layers[-1]
        x = last.input_layernorm(states)
        d = last.self_attn.head_dim
        q = last.self_attn.q_proj(x[:, -1]).view(-1, d)
        k = last.self_attn.k_proj(x[0, start:end]).view(end - start, -1, d)
        k = k.repeat_interleave(q.shape[0] // k.shape[1], dim=1)  # grouped-query attention
        manual = torch.einsum("hd,nhd->nh", q, k).mean(1) / math.sqrt(d)  # no rotary embedding at all
        normed = heads.twig_norm(raw)
        roped = heads.roi_scores(a, states, fp.rotary, start, end, rope=True)
        summed = heads.roi_scores(a, states, fp.rotary, start, end, rope=False, multi_head=False)
    assert torch.allclose(states, normed)
    assert torch.allclose(scores, manual, atol=1e-5)
    assert not torch.allclose(scores, roped)  # the flag matters on a model with RoPE
    assert torch.allclose(summed, manual * math.sqrt(d) * q.shape[0], atol=1e-4)  # roi_multi_head False


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_heads_without_a_gate_zoom_whenever_the_twig_finds_a_box(family):
    qm = make_model(family, gate=False, roi_threshold=0.01)  # every blurred sigmoid is above 0.01: a box
    assert not qm.heads.has_gate
    budget = (16, 1000) if family == "llava" else (16, 64)
    with torch.inference_mode():
        p = qm.perceive(make_image(), QUESTION, roi="auto", budget=budget)
        ans = qm.answer(make_image(), QUESTION, mode="auto", budget=budget, max_new_tokens=2)
    assert p.gate_score is None and p.roi_logits is not None and p.boxes
    assert ans.gate_score is None and ans.zoomed and ans.roi_tokens > 0


def test_own_box_rules_refuse_the_padded_llava_view():
    qm = make_model("llava", roi_mode="enclosing")
    with pytest.raises(ValueError, match="roi_mode 'official'"):
        qm.perceive(make_image(), QUESTION, roi="always", budget=(16, 1000))


def test_presets(tmp_path):
    assert get_preset("hr", "qwen2_5_vl").overrides() == {"roi_threshold": 0.04, "gate_threshold": 0.02,
                                                          "min_tokens": 512, "max_tokens": 4096}
    assert get_preset("doc", "qwen3_vl").overrides() == {"roi_threshold": 0.15, "gate_threshold": 0.10,
                                                         "min_tokens": 256, "max_tokens": 576}
    assert get_preset("vstar", "llava").overrides() == {"roi_threshold": 0.15}
    assert {"doc", "chart", "ocr", "hr", "vstar", "docvqa"} <= set(preset_names())
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        get_preset("nope", "qwen2_5_vl")
    path = make_tiny(tmp_path / "m", "qwen2_5_vl")
    qm = QZoomModel.from_pretrained(path, preset="ocr", gate_threshold=0.5)  # an explicit field wins
    c = qm.config
    assert (c.roi_threshold, c.gate_threshold, c.min_tokens, c.max_tokens) == (0.15, 0.5, 128, 576)
    img = tmp_path / "x.png"
    make_image(64, 48).save(img)
    assert main(["ask", str(img), "Q?", "--model", str(path), "--preset", "nope"]) == 2
    assert main(["ask", str(img), "Q?", "--model", str(path), "--preset", "hr", "--max-tokens", "64",
                 "--max-new-tokens", "1", "--json"]) == 0


def test_visual_features_of_several_rois_come_out_in_order():
    a = make_model("llava").adapter
    rois = [a.prepare_roi(make_image(120, 80, seed=s), min_tokens=16, max_tokens=1000) for s in (1, 2)]
    with torch.inference_mode():
        both = a.encode_image(rois)
        each = VisualFeatures.cat([a.encode_image([r]) for r in rois])
    assert torch.allclose(both.embeds, each.embeds, atol=1e-5)
