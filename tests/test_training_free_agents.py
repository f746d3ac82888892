"""The training-free baselines ViCrop (rel-att) and ZoomEye: the attention map, the window search, the image tree,
the best-first search on a stub scorer, cost counts checked against what the HF model actually ran, and end-to-end
runs on the bundled model."""

from __future__ import annotations

import doctest
import functools
import random

import numpy as np
import pytest
import torch
from tiny_models import QUESTION, make_image, make_model

from qzoom_agent.backbones import ImageInputs
from qzoom_agent.bench import vicrop_agent, zoomeye_agent
from qzoom_agent.bench.agents import AgentResult
from qzoom_agent.bench.vicrop_agent import Ledger, ViCropAgent, adaptive_window, map_to_source_box
from qzoom_agent.bench.zoomeye_agent import (
    ZoomEyeAgent,
    best_first_search,
    build_tree,
    split_box,
    visual_cue,
)

FAMILIES = ("qwen2_5_vl", "qwen3_vl", "llava")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny() -> dict:
    torch.manual_seed(0)
    return {family: make_model(family) for family in FAMILIES}


@pytest.fixture(scope="module")
def bundled():
    from qzoom_agent.model import QZoomModel

    return QZoomModel.from_pretrained("zoomworld-tiny")


def test_doctests():
    for module in (vicrop_agent, zoomeye_agent):
        assert doctest.testmod(module).failed == 0


# ---- ViCrop --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_attention_map_has_the_grid_shape_and_is_finite(tiny, family):
    qm = tiny[family]
    agent = ViCropAgent(qm, 64, "vicrop", att_layer=1)
    view = qm.adapter.prepare_image(make_image(), min_tokens=16, max_tokens=64)
    ledger = Ledger()
    att = agent.relative_attention(view, QUESTION, ledger)
    assert att.shape == view.grid and np.isfinite(att).all() and (att >= 0).all()
    assert ledger.forward_passes == 2 and ledger.vision_encodes == 2
    assert qm.adapter.text_config._attn_implementation == "sdpa"  # restored

    # the hooked row is the stock eager forward's attention (output_attentions) of the last token at that layer
    ids = vicrop_agent.chat_ids(qm.adapter, [view], QUESTION)
    with vicrop_agent.eager_text_attention(qm.adapter), torch.inference_mode():
        row = agent.attention_row(view, QUESTION, Ledger())
        out = qm.adapter.model(**qm.adapter.hf_inputs(ids, [view]), output_attentions=True)
    assert qm.adapter.text_config._attn_implementation == "sdpa"
    at = (ids[0] == qm.adapter.image_token_id).nonzero().flatten()
    ref = out.attentions[1][0, :, -1, at].mean(0).reshape(view.grid).numpy()
    np.testing.assert_allclose(row, ref, rtol=1e-5, atol=1e-7)


def test_window_search_finds_a_hot_spot():
    rng = np.random.default_rng(0)
    att = rng.uniform(0.9, 1.1, (20, 30))  # 300 x 200 px image, 10 px cells
    att[12:14, 20:22] += 50.0  # hot spot at x 200..220, y 120..140
    x1, y1, x2, y2 = adaptive_window(att, (300, 200), base=40)
    assert 0 <= x1 < x2 <= 300 and 0 <= y1 < y2 <= 200
    assert x1 <= 200 and x2 >= 220 and y1 <= 120 and y2 >= 140  # holds the spot
    assert 40 <= x2 - x1 <= 80 and 40 <= y2 - y1 <= 80  # base x r, r in [1, 2]
    # a spot in the corner: the window slides back inside the image
    att2 = np.ones((20, 30))
    att2[0, 29] = 100.0
    x1, y1, x2, y2 = adaptive_window(att2, (300, 200), base=40)
    assert x2 == 300 and y1 == 0 and x1 <= 290 and y2 >= 10
    # a window as large as the map: the whole image
    assert adaptive_window(att, (300, 200), base=400) == (0.0, 0.0, 300.0, 200.0)


def test_window_on_a_padded_canvas_maps_back_to_the_source():
    att = np.ones((10, 10))
    att[4:6, 4:6] = 50.0  # the centre of a 400 x 400 canvas holding a 400 x 200 source at y = 100
    view = ImageInputs(torch.zeros(1), None, (10, 10), (112, 112), (400, 200), canvas=(0, 100, 400, 400))
    box = map_to_source_box(att, view, base=80)
    assert box is not None and box.x2 <= 400 and box.y2 <= 200
    assert box.x1 <= 160 and box.x2 >= 240 and box.y1 <= 60 and box.y2 >= 140


# ---- ZoomEye: tree and search --------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(1000, 700), (2000, 500), (333, 1001), (451, 300), (17, 9)])
def test_tree_splits_cover_every_patch_exactly(size):
    root, depth = build_tree(size, patch_size=100, split=4, max_depth=5)
    assert root.box == (0, 0, *size)
    stack, deepest = [root], 0
    while stack:
        node = stack.pop()
        deepest = max(deepest, node.depth)
        x1, y1, x2, y2 = node.box
        if not node.children:
            assert max(x2 - x1, y2 - y1) < 100 or node.depth == 5 or min(x2 - x1, y2 - y1) < 4
            continue
        assert len(node.children) == 4 and all(c.depth == node.depth + 1 for c in node.children)
        cover = np.zeros((y2 - y1, x2 - x1), dtype=int)
        for c in node.children:
            assert x1 <= c.box[0] < c.box[2] <= x2 and y1 <= c.box[1] < c.box[3] <= y2
            cover[c.box[1] - y1 : c.box[3] - y1, c.box[0] - x1 : c.box[2] - x1] += 1
        assert (cover == 1).all()  # a partition: no gap, no overlap
        stack.extend(node.children)
    assert depth == deepest
    assert split_box((0, 0, 100, 300)) == [(0, 0, 100, 75), (0, 75, 100, 150), (0, 150, 100, 225), (0, 225, 100, 300)]


def _stub(priorities: dict[int, float], answering: dict[int, float] | None = None):
    calls = []

    def confidence(node, kind):
        calls.append((node.box, kind))
        if kind == "answering":
            return (answering or {}).get(id(node), -1.0)
        return priorities[id(node)]

    return confidence, calls


def _nodes(root):
    out, stack = [], [root]
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node.children)
    return out


def test_best_first_pops_by_priority_and_lowers_the_threshold():
    root, depth = build_tree((800, 800), patch_size=250, split=4, max_depth=5)
    assert depth == 2
    rng = random.Random(0)
    prio = {id(n): rng.uniform(-1, 1) for n in _nodes(root)}
    confidence, calls = _stub(prio)
    found = best_first_search(root, depth, confidence, threshold=0.6)
    assert found.best is None
    # nothing passes: limit 3 * depth = 6, thresholds 0.5 (limit 8), 0.4 (10), 0.2 (12), 0.0 (14), -0.2 < 0: stop
    assert len(found.popped) == 14 and found.threshold == pytest.approx(-0.2)
    frontier = [root]
    for node in found.popped:  # every pop is the best node of the frontier at that time
        assert node in frontier
        if node is not root:
            assert node.priority == max(n.priority for n in frontier)
            assert node.priority == pytest.approx(prio[id(node)])  # w * p + (1 - w) * p
        frontier.remove(node)
        frontier.extend(node.children)
    assert sum(kind == "answering" for _, kind in calls) == 14
    scored = sum(n.priority is not None for n in _nodes(root))
    assert sum(kind != "answering" for _, kind in calls) == 2 * scored  # existence + latent, once per node


def test_best_first_stops_at_the_threshold_and_takes_the_best_after_lowering():
    root, depth = build_tree((800, 800), patch_size=250, split=4, max_depth=5)
    prio = {id(n): 0.0 for n in _nodes(root)}
    prio[id(root.children[2])] = 0.9
    target = root.children[2].children[1]
    prio[id(target)] = 0.8
    confidence, _ = _stub(prio, {id(target): 0.7})
    found = best_first_search(root, depth, confidence, threshold=0.6)
    assert found.best is target and found.popped[:3] == [root, root.children[2], target]
    confidence, _ = _stub(prio, {id(target): 0.45})  # passes only once the threshold is down to 0.4
    found = best_first_search(root, depth, confidence, threshold=0.6)
    assert found.best is target and len(found.popped) == 8 and found.threshold == pytest.approx(0.4)


def test_visual_cue_rule_on_zoomworld_questions():
    assert visual_cue("What is written on the green tag?\n(A) x\n(B) y\nAnswer with the option's letter.") == \
        "green tag"
    assert visual_cue("Is the cyan tag to the left or to the right of the red tag?") == "cyan tag"
    assert visual_cue("What color is the large hexagon?") == "large hexagon"
    assert visual_cue("Describe this.") == "Describe this"


# ---- costs: what the agents report is what the model ran ---------------------------------------------------------
class Counter:
    """Counts, from the HF model itself: forward calls, visual tokens in their inputs, images through the vision
    tower and tokens x decoder layers run."""

    def __init__(self, qm) -> None:
        self.model, a = qm.adapter.model, qm.adapter
        self.calls = self.visual = self.images = self.layer_tokens = 0
        forward = self.model.forward

        @functools.wraps(forward)  # generate reads the forward's signature
        def counted(*args, **kwargs):
            self.calls += 1
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.visual += int((ids == a.image_token_id).sum())
            return forward(*args, **kwargs)

        self.model.forward = counted
        tower = getattr(self.model.model, "visual", None) or self.model.model.vision_tower

        def encoded(module, args, kwargs):
            thw = kwargs.get("grid_thw")
            self.images += int(thw.shape[0]) if thw is not None else int((args[0] if args else
                                                                           kwargs["pixel_values"]).shape[0])

        def layer(module, args, kwargs):
            self.layer_tokens += int((args[0] if args else kwargs["hidden_states"]).shape[1])

        self.hooks = [tower.register_forward_pre_hook(encoded, with_kwargs=True)]
        self.hooks += [m.register_forward_pre_hook(layer, with_kwargs=True) for m in a.layers]

    def close(self) -> None:
        del self.model.forward
        for h in self.hooks:
            h.remove()

    def check(self, r: AgentResult) -> None:
        assert (r.forward_passes, r.visual_tokens, r.vision_encodes, r.layer_tokens) == \
            (self.calls, self.visual, self.images, self.layer_tokens)


def run_counted(qm, agent) -> AgentResult:
    """Run ``agent`` on the test image with `Counter` hooks on ``qm``, and check its reported costs against them."""
    counter = Counter(qm)
    try:
        r = agent.run(make_image(), QUESTION)
    finally:
        counter.close()
    counter.check(r)
    return r


@pytest.mark.parametrize("family", FAMILIES)
def test_vicrop_costs_are_what_ran(tiny, family):
    qm = tiny[family]
    agent = ViCropAgent(qm, 64, "vicrop", att_layer=1, zoom=2.0)
    r = run_counted(qm, agent)
    assert r.zooms == 1 and r.tool_calls == 0 and agent.last_error is None
    x1, y1, x2, y2 = r.bbox
    assert 0 <= x1 < x2 <= 451 and 0 <= y1 < y2 <= 300  # the adaptive box lies inside the image
    assert r.vision_encodes == 4  # the view twice for attention, then view + crop for the answer


@pytest.mark.parametrize("family", FAMILIES)
def test_zoomeye_costs_are_what_ran(tiny, family):
    qm = tiny[family]
    agent = ZoomEyeAgent(qm, 64, "zoomeye", max_depth=1)
    r = run_counted(qm, agent)
    assert agent.last_error is None and r.tool_calls == 0
    assert r.forward_passes == (r.vision_encodes - 1) + r.generated_tokens  # probes, then one answer image
    assert 0 <= r.zooms <= 4


def test_failures_fall_back_to_the_global_view(tiny, monkeypatch):
    qm = tiny["qwen2_5_vl"]
    vicrop, zoomeye = ViCropAgent(qm, 64, "vicrop"), ZoomEyeAgent(qm, 64, "zoomeye")

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(vicrop, "relative_attention", broken)
    monkeypatch.setattr(zoomeye, "search", broken)
    for agent in (vicrop, zoomeye):
        r = agent.run(make_image(), QUESTION)
        assert r.zooms == 0 and r.bbox is None and "boom" in agent.last_error
        assert r.vision_encodes == 1 and r.forward_passes == r.generated_tokens


def test_bad_arguments_raise_value_error(tiny):
    qm = tiny["qwen2_5_vl"]
    for kwargs in ({"att_layer": 99}, {"att_layer": -1}, {"zoom": 0.5}, {"generic_prompt": " "}):
        with pytest.raises(ValueError):
            ViCropAgent(qm, 64, "v", **kwargs)
    with pytest.raises(ValueError, match="tokens"):
        ViCropAgent(qm, 0, "v")
    for kwargs in ({"split": 5}, {"answer_threshold": 2.0}, {"lower_threshold": 0.9, "answer_threshold": 0.5},
                   {"max_pops": 0}, {"max_depth": -1}, {"cue": "green tag"}, {"zoom": float("nan")}):
        with pytest.raises(ValueError):
            ZoomEyeAgent(qm, 64, "z", **kwargs)
    # the reference's answering threshold by family
    assert ZoomEyeAgent(qm, 64, "z").answer_threshold == 0.95
    assert ZoomEyeAgent(tiny["llava"], 64, "z").answer_threshold == 0.6


# ---- end to end on the bundled model -------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [ViCropAgent, ZoomEyeAgent])
def test_end_to_end_on_the_bundled_model(bundled, cls):
    from qzoom_agent.zoomworld import sample

    s = sample("hr", "test", 0)
    agent = cls(bundled, 256, cls.__name__, **({"max_depth": 1} if cls is ZoomEyeAgent else {}))  # a short search
    r = agent.run(s.image, s.question)
    assert isinstance(r, AgentResult) and isinstance(r.answer, str) and agent.last_error is None
    for value in (r.visual_tokens, r.forward_passes, r.generated_tokens, r.vision_encodes, r.layer_tokens, r.zooms):
        assert isinstance(value, int) and value >= 0
    assert r.latency_s > 0 and r.forward_passes > r.generated_tokens and r.tool_calls == 0
    assert r.bbox is None or (len(r.bbox) == 4 and all(isinstance(v, int) for v in r.bbox))
