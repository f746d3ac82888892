"""The Q-Zoom inference path against plain Hugging Face forwards, on tiny models of all three families."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import QUESTION, make_image, make_model

from qzoom_agent import boxes as box_lib
from qzoom_agent.model import QZoomModel
from qzoom_agent.perception import Located

FAMILIES = ["qwen2_5_vl", "qwen3_vl", "llava"]


def hf_inputs(qm: QZoomModel, ids: torch.Tensor, images) -> dict:
    return qm.adapter.hf_inputs(ids, images)


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_from_layer_k_reproduces_full_forward(family):
    qm = make_model(family)
    a = qm.adapter
    with torch.inference_mode():
        fp = qm.prefill(make_image(), QUESTION, budget=(16, 64))
        ref = a.model(**hf_inputs(qm, fp.prompt.input_ids, [fp.prompt.image])).logits
        hidden = qm.runner.run(2, a.num_layers, fp.hidden_k, fp.rotary, fp.mask, fp.cache)
        ours = a.lm_head(a.norm(hidden))
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-4


def _from_scratch_logits(qm: QZoomModel, splice, visual, extra_token: int | None = None) -> torch.Tensor:
    """All layers over the whole spliced sequence, no cache: the reference the reuse path must match."""
    a = qm.adapter
    ids, pos = splice.input_ids, splice.positions
    if extra_token is not None:
        ids = torch.cat([ids, torch.tensor([[extra_token]])], 1)
        pos = torch.cat([pos, a.next_position(pos)], -1)
    hidden = a.embed(ids, visual)
    rotary = a.rotary(hidden, pos)
    mask = qm.runner.causal_mask(hidden, None)
    hidden = qm.runner.run(0, a.num_layers, hidden, rotary, mask, None, a.image_mask(ids), visual)
    return qm.runner.logits(hidden[:, -1:])


@pytest.mark.parametrize("reuse_src_pos", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_reuse_matches_from_scratch_forward(family, reuse_src_pos):
    qm = make_model(family, reuse_src_pos=reuse_src_pos)
    a = qm.adapter
    image = make_image()
    box = box_lib.Box(60, 40, 260, 200)
    with torch.inference_mode():
        fp = qm.prefill(image, QUESTION, budget=(16, 64))
        src_visual = fp.visual
        src = fp.prompt.image
        cells = box_lib.box_to_cells(box, src.grid, src.resized_size, image.size, src.canvas)
        pre = qm.zoom(fp, Located(None, [box], [cells]))
        reuse_logits, next_pos, n_roi = pre.logits, pre.next_position, pre.roi_tokens
        # One decode step from the reused cache as well, so the cache itself is checked, not only the logits.
        token = int(reuse_logits.argmax(-1))
        step_hidden = a.embed_tokens(torch.tensor([[token]]))
        step_hidden = qm.runner.run(0, a.num_layers, step_hidden, a.rotary(step_hidden, next_pos), None, pre.cache)
        reuse_step = qm.runner.logits(step_hidden)

        # Rebuild the spliced sequence independently and run it from scratch.
        fp2 = qm.prefill(image, QUESTION, budget=(16, 64))
        roi_in = a.prepare_roi(box_lib.crop(image, box), min_tokens=16, max_tokens=64)
        splice = a.splice_roi(fp2.prompt, fp2.positions, [roi_in], [cells], reuse_src_pos)
        from qzoom_agent.backbones import VisualFeatures

        visual = VisualFeatures.cat([src_visual, a.encode_image([roi_in])])
        ref = _from_scratch_logits(qm, splice, visual)
        ref_step = _from_scratch_logits(qm, splice, visual, extra_token=token)
        if not reuse_src_pos:
            # Plain two-image positions: the stock HF forward on the spliced ids must agree too.
            hf = a.model(**hf_inputs(qm, splice.input_ids, [fp2.prompt.image, roi_in])).logits[:, -1]
            assert (hf - ref).abs().max().item() <= 1e-4
        # Handed the splice's own positions (source-aligned or plain), the stock forward gives the zoom's logits.
        stock = a.model(**hf_inputs(qm, splice.input_ids, [fp2.prompt.image, roi_in]),
                        position_ids=splice.positions).logits[:, -1]
        plain = a.positions(splice.input_ids, [fp2.prompt.image, roi_in]).float()
    assert torch.equal(splice.positions.float(), plain) != reuse_src_pos  # aligned positions are not the plain ones
    assert (stock - reuse_logits).abs().max().item() <= 1e-4
    assert n_roi == roi_in.n_tokens
    assert (reuse_logits - ref).abs().max().item() <= 1e-4
    assert (reuse_step - ref_step).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_source_aligned_positions_follow_the_design(family):
    qm = make_model(family)
    a = qm.adapter
    image = make_image()
    with torch.inference_mode():
        fp = qm.prefill(image, QUESTION, budget=(16, 64))
        roi_in = a.prepare_image(image.crop((0, 0, 200, 150)), min_tokens=16, max_tokens=64)
        splice = a.splice_roi(fp.prompt, fp.positions, [roi_in], [(1, 2, 4, 6)], True)
    p, pos = fp.prompt.image_end, splice.positions[:, 0]
    end = fp.positions[0, 0, p]  # source <|vision_end|>
    t0 = fp.positions[0, 0, fp.prompt.image_start]
    gh, gw = roi_in.grid
    roi = pos[:, splice.roi_start : splice.roi_end]
    assert torch.all(roi[0] == end + 2)  # a new frame right after the RoI start token
    assert pos[:, p + 1].tolist() == [float(end + 1)] * 3
    assert roi[1].min() == t0 + 1 and roi[1].max() == t0 + 3  # rows 1..3 of the source
    assert roi[2].min() == t0 + 2 and roi[2].max() == t0 + 5  # cols 2..5 of the source
    shift = max(gh, gw) + 2
    assert torch.equal(pos[:, splice.roi_end + 1 :], fp.positions[:, 0, p + 1 :].float() + shift)


@pytest.mark.parametrize("family", FAMILIES)
def test_never_mode_matches_hf_generate(family):
    qm = make_model(family)
    a = qm.adapter
    image = make_image(seed=3)
    with torch.inference_mode():
        fp = qm.prefill(image, QUESTION, budget=(16, 64))
        out = a.model.generate(**hf_inputs(qm, fp.prompt.input_ids, [fp.prompt.image]), max_new_tokens=8,
                               do_sample=False)
    expected = a.tokenizer.decode(out[0, fp.prompt.input_ids.shape[1] :], skip_special_tokens=True).strip()
    ans = qm.answer(image, QUESTION, mode="never", max_new_tokens=8, budget=(16, 64))
    assert ans.text == expected
    assert ans.gate_score is None and not ans.zoomed
    assert ans.forward_passes == 1 + ans.generated_tokens - 1


@pytest.mark.parametrize("family", FAMILIES)
def test_heads_start_as_copies_of_base_layers(family):
    qm = make_model(family)
    base = qm.adapter.layers
    for i in range(qm.config.twig_T):
        ref = base[qm.config.twig_K + i].state_dict()
        for branch in (qm.heads.twig_layers[i], qm.heads.high_res_layers[i]):
            got = branch.state_dict()
            assert got.keys() == ref.keys()
            assert all(torch.equal(got[k], ref[k]) for k in ref)
            pairs = zip(branch.parameters(), base[qm.config.twig_K + i].parameters(), strict=True)
            assert all(p.data_ptr() != q.data_ptr() for p, q in pairs)  # copies, not shared tensors


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_roi_scores_live_on_the_merged_grid(family):
    qm = make_model(family)
    p = qm.perceive(make_image(), QUESTION, roi="always", budget=(16, 64))
    thw = p.state.prompt.image.image_grid_thw[0]
    merge = qm.adapter.merge
    assert p.roi_logits.shape == (int(thw[1]) // merge, int(thw[2]) // merge) == p.grid


@pytest.mark.parametrize("family", FAMILIES)
def test_twig_scores_at_init_are_the_base_attention_logits(family):
    """At init the twig equals base layers K..K+T-1, so its scores are layer K+T-1's pre-softmax attention of the
    last token over the visual tokens, averaged over heads: the log attention weights up to one constant."""
    qm = make_model(family, attn="eager")
    a = qm.adapter
    image = make_image(seed=5)
    with torch.inference_mode():
        p = qm.perceive(image, QUESTION, roi="always", budget=(16, 64))
        prompt = p.state.prompt
        out = a.model(**hf_inputs(qm, prompt.input_ids, [prompt.image]), output_attentions=True)
    att = out.attentions[qm.config.twig_K + qm.config.twig_T - 1][0, :, -1, prompt.image_start : prompt.image_end]
    diff = p.roi_logits.flatten() - att.log().mean(0)
    assert diff.std().item() < 1e-4


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_answer_resumes_from_perception(family):
    """perceive() then answer(perception=p) gives what a fresh answer() gives, without a second prefill."""
    qm = make_model(family, roi_threshold=0.3)
    image = make_image(seed=7)
    fresh = qm.answer(image, QUESTION, mode="always", max_new_tokens=6, budget=(16, 64))
    p = qm.perceive(image, QUESTION, roi="always", budget=(16, 64))
    resumed = qm.answer(image, QUESTION, mode="always", max_new_tokens=6, perception=p)
    assert resumed.text == fresh.text and resumed.bbox == fresh.bbox and resumed.zoomed == fresh.zoomed
    assert resumed.gate_score == pytest.approx(fresh.gate_score, abs=1e-6)
    assert resumed.forward_passes == fresh.forward_passes
    assert resumed.layer_tokens == fresh.layer_tokens > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_a_perception_is_never_consumed(family):
    """Answering, zooming and looking work on forks: the same perception gives the same logits every time, in any
    order; before the steps were public, a second answer from one perception read a cache the zoom had cut."""
    qm = make_model(family, roi_threshold=0.3)
    image = make_image(seed=7)
    p = qm.perceive(image, QUESTION, roi="always", budget=(16, 64))
    assert p.boxes, "the test needs a zoom"
    zoomed = [qm.zoom(p).logits for _ in range(2)]
    direct = qm.look(p).logits
    modes = ("always", "never", "always")
    answers = [qm.answer(image, QUESTION, mode=m, max_new_tokens=4, perception=p) for m in modes]
    assert torch.equal(zoomed[0], zoomed[1]) and torch.equal(zoomed[0], qm.zoom(p).logits)
    assert torch.equal(direct, qm.look(p).logits)
    assert not torch.allclose(direct, zoomed[0])
    assert answers[0] == dataclasses.replace(answers[2], latency_s=answers[0].latency_s)
    fresh = qm.answer(image, QUESTION, mode="never", max_new_tokens=4, budget=(16, 64))
    assert answers[1].text == fresh.text and not answers[1].zoomed
    with pytest.raises(ValueError, match="perceive this question first"):
        qm.answer(image, "another question?", perception=p)
    with pytest.raises(ValueError, match="holds no prefill"):
        qm.zoom(dataclasses.replace(p, state=None))


def test_plain_model_refuses_zoom_modes():
    qm = make_model("qwen2_5_vl")
    qm.heads = None
    with pytest.raises(ValueError, match="needs Q-Zoom heads"):
        qm.answer(make_image(), QUESTION, mode="auto")
    with pytest.raises(ValueError, match="mode must be"):
        qm.answer(make_image(), QUESTION, mode="sometimes")
    assert qm.answer(make_image(), QUESTION, mode="never", max_new_tokens=2, budget=(16, 64)).gate_score is None


def test_roi_min_side_tokens_grows_the_box_around_the_same_peak():
    """QZoomConfig.roi_min_side_tokens reaches the box rule: the peak box grows to that many tokens a side."""
    qm = make_model("qwen2_5_vl", roi_mode="peak", roi_peak_ratio=1.0, roi_threshold=0.01)
    image = make_image(seed=3)
    small = qm.perceive(image, QUESTION, roi="always", budget=(16, 64))
    qm.config.roi_min_side_tokens = 3.0
    large = qm.perceive(image, QUESTION, roi="always", budget=(16, 64))
    (a,), (b,) = small.boxes, large.boxes
    cell_w = small.image_size[0] / small.grid[1]
    cell_h = small.image_size[1] / small.grid[0]
    assert a.width <= 1.01 * cell_w + 1 and a.height <= 1.01 * cell_h + 1  # one peak cell
    assert b.width >= 3 * cell_w - 1 and b.height >= 3 * cell_h - 1
    assert b.x1 <= a.x1 and b.y1 <= a.y1 and b.x2 >= a.x2 and b.y2 >= a.y2
    with pytest.raises(ValueError):
        qm.config.roi_min_side_tokens = -1.0


MCQ = QUESTION + "\n(A) 35\n(B) 49\n(C) 39\n(D) 89\nAnswer with the option's letter."


@pytest.mark.parametrize("family", FAMILIES)
def test_stem_query_scores_like_the_stem_asked_alone(family):
    """A stem query reuses the image prefix below K and gives the twig scores of the stem asked as the question;
    the gate still reads the whole question."""
    qm = make_model(family)
    image = make_image(seed=5)
    alone = qm.perceive(image, QUESTION, roi="always", budget=(16, 64))
    explicit = qm.perceive(image, MCQ, roi="always", budget=(16, 64), roi_query=QUESTION)
    whole = qm.perceive(image, MCQ, roi="always", budget=(16, 64))
    assert torch.allclose(explicit.roi_logits, alone.roi_logits, atol=1e-5)
    assert not torch.allclose(whole.roi_logits, alone.roi_logits, atol=1e-3)  # the options move the query token
    assert explicit.gate_score == pytest.approx(whole.gate_score, abs=1e-6)
    qm.config.roi_query = "stem"
    by_config = qm.perceive(image, MCQ, roi="always", budget=(16, 64))
    assert torch.equal(by_config.roi_logits, explicit.roi_logits) and by_config.boxes == explicit.boxes
    with pytest.raises(ValueError, match="roi_query"):
        qm.perceive(image, MCQ, roi="always", budget=(16, 64), roi_query=" ")


def test_stem_query_leaves_the_first_pass_cache_alone():
    """The query pass works on a copy of the cache: the answer resumes from the first pass as without it."""
    qm = make_model("qwen2_5_vl", roi_threshold=0.3, roi_query="stem")
    image = make_image(seed=7)
    plain = qm.perceive(image, MCQ, roi="never", budget=(16, 64))
    stem = qm.perceive(image, MCQ, roi="always", budget=(16, 64))
    for i in range(qm.config.twig_K):
        a, b = plain.state.cache.layers[i], stem.state.cache.layers[i]
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    fresh = qm.answer(image, MCQ, mode="always", max_new_tokens=6, budget=(16, 64))
    resumed = qm.answer(image, MCQ, mode="always", max_new_tokens=6, perception=stem)
    assert resumed.text == fresh.text and resumed.bbox == fresh.bbox == stem.box


def test_stem_query_without_a_shared_prefix_runs_in_full():
    """When the query prompt does not share the first pass's tokens up to the image, it runs from the start."""
    qm = make_model("qwen2_5_vl")
    image = make_image(seed=5)
    alone = qm.perceive(image, QUESTION, roi="always", budget=(16, 64))
    fp = qm.prefill(image, MCQ, budget=(16, 64))
    fp.hidden_k = torch.zeros_like(fp.hidden_k)  # a shared prefix would carry this into the twig ...
    assert not torch.allclose(qm.locate(fp, QUESTION).logits, alone.roi_logits, atol=1e-3)
    ids = fp.prompt.input_ids.clone()
    ids[0, 0] += 1  # ... but now the first pass's tokens no longer match the query prompt's
    fp.prompt = dataclasses.replace(fp.prompt, input_ids=ids)
    assert torch.allclose(qm.locate(fp, QUESTION).logits, alone.roi_logits, atol=1e-5)


def test_cache_keyword_follows_the_signature():
    from qzoom_agent.engine import cache_keyword

    def new_style(hidden, cache=None, use_cache=False): ...
    def old_style(hidden, past_key_values=None, use_cache=False): ...
    assert cache_keyword(new_style) == "cache"
    assert cache_keyword(old_style) == "past_key_values"


@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_passes_the_cache_under_the_installed_name(family, recwarn):
    """No deprecation warning for the KV-cache argument from the layers or the mask (transformers renamed it)."""
    qm = make_model(family, roi_threshold=0.3)
    qm.answer(make_image(seed=3), QUESTION, mode="always", max_new_tokens=3, budget=(16, 64))
    renamed = [w for w in recwarn if "past_key_values" in str(w.message)]
    assert not renamed, str(renamed[0].message)

