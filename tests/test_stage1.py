"""Stage 1 (SD-RPN twig): pseudo-label rules, attention capture, head ranking and a tiny end-to-end run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from qzoom_agent.backbones import ImageInputs
from qzoom_agent.boxes import Box, box_to_cells
from qzoom_agent.cli import main
from qzoom_agent.model import QZoomModel
from qzoom_agent.tiny import make_tiny
from qzoom_agent.train.stage1 import (
    STAGE_DIR,
    Stage1Config,
    load_stage1_config,
    question,
    run_stage1,
    twig_inputs,
    twig_loss,
)
from qzoom_agent.train.stage1_eval import peak_on_target, size_bucket, target_side_tokens
from qzoom_agent.train.stage1_labels import (
    IGNORE,
    LabelRule,
    box_labels,
    head_agreement,
    pseudo_labels,
    response_attention,
    select_heads,
)

torch.set_num_threads(2)
RULE = LabelRule()
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train" / "stage1_zoomworld_tiny.yaml"


def _view(grid=(8, 10), source=(1000, 800)) -> ImageInputs:
    gh, gw = grid
    return ImageInputs(pixel_values=torch.zeros(1), image_grid_thw=None, grid=grid, resized_size=(gw * 28, gh * 28),
                       source_size=source)


def test_peaked_map_gives_foreground_background_and_ignored_cells():
    g = torch.full((12, 12), 1e-4)
    g[5:7, 5:7] = 0.05
    g[4, 5] = 0.02  # above 25% of the peak: foreground too
    g[9, 9] = 0.008  # weak but above 5%: neither foreground nor background
    labels = pseudo_labels(g, RULE)
    assert (labels[5:7, 5:7] == 1).all() and labels[4, 5] == 1
    assert labels[9, 9] == IGNORE  # outside the box but too strong to be background
    assert labels[0, 0] == 0 and labels[11, 0] == 0
    assert labels[3, 5] == IGNORE  # inside the blurred foreground box, not foreground


def test_whole_sample_is_ignored_when_attention_is_spread_or_weak():
    spread = torch.rand(10, 10) * 0.01 + 0.01  # every cell above 25% of the peak: the box covers everything
    assert (pseudo_labels(spread, RULE) == IGNORE).all()
    weak = torch.zeros(10, 10)
    weak[3, 3] = 1e-3  # below min_peak
    assert (pseudo_labels(weak, RULE) == IGNORE).all()
    assert (pseudo_labels(torch.full((4, 4), float("nan")), RULE) == IGNORE).all()


def test_sink_tokens_never_become_labels():
    g = torch.full((10, 10), 1e-4)
    g[0, 0] = 0.5  # a sink that would dominate
    g[6, 6] = 0.05
    sink = torch.zeros(10, 10, dtype=torch.bool)
    sink[0, 0] = True
    labels = pseudo_labels(g, RULE, sink)
    assert labels[6, 6] == 1 and labels[0, 0] == IGNORE
    assert pseudo_labels(g, RULE)[6, 6] != 1  # without the sink mask the sink is the only foreground


def test_box_labels_and_head_agreement_follow_the_box_cells():
    view = _view()
    box = (300, 200, 420, 330)
    r0, c0, r1, c1 = box_to_cells(Box(*box), view.grid, view.resized_size, view.source_size)
    labels = box_labels(box, view)
    assert labels.sum() == (r1 - r0) * (c1 - c0) and (labels[r0:r1, c0:c1] == 1).all()
    # its own seed: the noise outside the box must not depend on what earlier tests drew from the global RNG
    maps = torch.rand(2, 3, *view.grid, generator=torch.Generator().manual_seed(0)) * 1e-3
    maps[1, 2, r0:r1, c0:c1] = 1.0  # layer 1, head 2 looks at the box
    share = head_agreement(maps, box, view)
    assert share.shape == (2, 3) and share.argmax() == 1 * 3 + 2 and share[1, 2] > 0.99
    assert torch.allclose(select_heads(maps, {1: [2]}), maps[1, 2])
    with pytest.raises(ValueError, match="outside"):
        select_heads(maps, {2: [0]})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = make_tiny(tmp_path_factory.mktemp("s1") / "model", "qwen2_5_vl", with_heads=False)
    (path / "zoomworld.json").write_text(json.dumps({"alphabet": "0123456789"}))
    return path


def test_response_attention_is_a_distribution_over_the_image(tiny_dir):
    qz = QZoomModel.from_pretrained(tiny_dir, qzoom=False)
    cfg = Stage1Config(model=str(tiny_dir), budget=(16, 64), size_range=(1024, 1024))
    s = question(cfg, "0123456789", "train", 0)
    att = response_attention(qz, s.image, s.question, (16, 64), max_new_tokens=3)
    text = qz.adapter.model.config.text_config
    assert att.maps.shape == (text.num_hidden_layers, text.num_attention_heads, *att.image.grid)
    total = att.maps.sum((-1, -2))
    assert (att.maps >= 0).all() and (total > 0).all() and (total <= 1 + 1e-5).all()
    # the same answer given explicitly gives the same maps (teacher forcing is deterministic)
    again = response_attention(qz, s.image, s.question, (16, 64), answer=att.answer)
    assert torch.allclose(again.maps, att.maps, atol=1e-6)


def test_stage1_trains_only_the_twig_and_resumes(tiny_dir, tmp_path):
    cfg = Stage1Config(model=str(tiny_dir), budget=(16, 64), size_range=(1024, 1024), samples=4, rank_samples=2,
                       eval_items=2, steps=4, batch_size=2, warmup_steps=1, save_every=2, checkpoint_every=2,
                       label_overlays=2, rule=LabelRule(fg_ratio=0.9, max_area_ratio=1.0, min_peak=0.0))
    base = QZoomModel.from_pretrained(tiny_dir, qzoom=False)
    before = {k: v.clone() for k, v in base.adapter.model.state_dict().items()}
    first = run_stage1(cfg, tmp_path, max_steps=2)
    assert first["step"] == 2
    stage = tmp_path / STAGE_DIR
    labels = torch.load(stage / "labels.pt", weights_only=False)
    assert len(labels["records"]) == 4 and labels["heads"]
    assert len(list((stage / "overlays").glob("*.png"))) == 2
    ranking = json.loads((stage / "head_ranking.json").read_text())["ranking"]
    assert all(0 <= r["share_on_target"] <= 1 for r in ranking)
    last = run_stage1(cfg, tmp_path)  # resumes at step 2 with the cached labels and ranking
    assert last["step"] == 4 and 0 <= last["roi_hit"] <= 1 and last["n"] == 2
    for key in ("roi_hit_by_family", "roi_hit_by_size"):  # the breakdowns account for every question, hits included
        groups = last[key]
        assert sum(g["n"] for g in groups.values()) == 2
        assert sum(g["hit"] * g["n"] for g in groups.values()) == pytest.approx(last["roi_hit"] * 2)
    assert 0 <= last["roi_top1"] <= 1 and sum(g["n"] for g in last["roi_top1_by_family"].values()) == 2
    order = ["<0.5", "0.5-1", "1-2", ">=2"]  # smallest first
    assert [k for k in order if k in last["roi_hit_by_size"]] == list(last["roi_hit_by_size"])
    rows = [json.loads(r) for r in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [r["when"] for r in rows] == ["before", "after", "after"]

    trained = QZoomModel.from_pretrained(tiny_dir, qzoom=stage / "qzoom")
    for k, v in trained.adapter.model.state_dict().items():  # the base model is untouched
        assert torch.equal(v, before[k]), k
    fresh = QZoomModel.from_pretrained(tiny_dir, qzoom=False)
    fresh.config = trained.config
    torch.manual_seed(cfg.seed)
    fresh.init_heads()
    changed = {k for k, v in trained.heads.state_dict().items() if not torch.equal(v, fresh.heads.state_dict()[k])}
    assert changed and all(k.startswith("twig_layers.") for k in changed)  # the gate is untouched


def test_twig_loss_terms(tiny_dir):
    qz = QZoomModel.from_pretrained(tiny_dir, qzoom=False)
    qz.init_heads()
    cfg = Stage1Config(model=str(tiny_dir), budget=(16, 64), size_range=(1024, 1024))
    s = question(cfg, "0123456789", "train", 1)
    x = twig_inputs(qz, s, cfg.budget)
    labels = box_labels(tuple(s.target_box), qz.adapter.prepare_image(s.image, min_tokens=16, max_tokens=64))
    labels[0, 0] = IGNORE
    with torch.no_grad():  # only values are compared here
        logits = qz.heads.roi_logits(qz.adapter, x.hidden_k, x.rotary, x.mask, x.image_start, x.image_end)
        flat, keep = labels.flatten(), labels.flatten() != IGNORE
        z, y = logits[keep], flat[keep].float()
        plain = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="sum")
        fg = -torch.nn.functional.logsigmoid(z)[y == 1].sum()
        listwise = -(torch.log_softmax(z, 0)[y == 1]).mean() * keep.sum()
        assert float(twig_loss(qz, x, labels)) == pytest.approx(float(plain), rel=1e-5)
        assert float(twig_loss(qz, x, labels, pos_weight=3.0)) == pytest.approx(float(plain + 2 * fg), rel=1e-5)
        assert float(twig_loss(qz, x, labels, rank_weight=0.5)) == pytest.approx(float(plain + 0.5 * listwise),
                                                                                 rel=1e-5)
        assert float(twig_loss(qz, x, labels)) == pytest.approx(float(twig_loss(qz, twig_inputs(qz, s, cfg.budget),
                                                                                   labels)))  # cached == fresh
        with pytest.raises(RuntimeError, match="labels of grid"):
            twig_loss(qz, x, labels[:-1])


def test_shipped_stage1_config_is_valid():
    cfg = load_stage1_config(CONFIG)
    assert cfg.label_source == "attention" and cfg.heads == "auto" and cfg.total_steps > 0
    box = load_stage1_config(CONFIG.with_name("stage1_zoomworld_tiny_box.yaml"))
    assert box.label_source == "box" and box.rank_weight > 0 and box.cache_features


def test_size_buckets_and_target_side_in_tokens():
    assert [size_bucket(x) for x in (0.0, 0.49, 0.5, 0.99, 1.0, 1.99, 2.0, 50.0)] == [
        "<0.5", "<0.5", "0.5-1", "0.5-1", "1-2", "1-2", ">=2", ">=2"]
    assert size_bucket(3.0, edges=(1.0, 4.0)) == "1-4"
    # a 2000 x 1000 image on a 20 x 40 grid: 50 px a token across, 50 px down
    assert target_side_tokens([0, 0, 100, 25], (20, 40), (2000, 1000)) == pytest.approx(2.0)
    assert target_side_tokens([10, 10, 35, 160], (20, 40), (2000, 1000)) == pytest.approx(3.0)  # the taller side
    # the same box on a coarser grid is fewer tokens
    assert target_side_tokens([0, 0, 100, 25], (10, 20), (2000, 1000)) == pytest.approx(1.0)


def test_peak_on_target_uses_the_top_kept_token():
    # a 400 x 200 image on a 20 x 20 grid (a 560 x 560 view): a token is 20 px across and 10 px down
    geometry = dict(grid=(20, 20), resized_size=(560, 560), source_size=(400, 200))
    logits = torch.zeros(20, 20)
    logits[5, 7] = 3.0  # the cell spanning x 140-160, y 50-60
    assert peak_on_target(logits, (145, 52, 150, 58), **geometry, sink_min_tokens=256)
    assert peak_on_target(logits.flatten(), (150, 55, 190, 80), **geometry, sink_min_tokens=256)  # flat scores too
    assert not peak_on_target(logits, (160, 52, 200, 58), **geometry, sink_min_tokens=256)  # the next cell over
    assert not peak_on_target(logits, (145, 60, 150, 70), **geometry, sink_min_tokens=256)  # the next row
    logits[0, 0] = 9.0  # higher, but in the sink strip that the box rule masks on a grid over 256 tokens
    assert peak_on_target(logits, (145, 52, 150, 58), **geometry, sink_min_tokens=256)
    assert not peak_on_target(logits, (145, 52, 150, 58), **geometry, sink_min_tokens=400)  # no mask: 400 tokens
    assert peak_on_target(logits, (0, 0, 1, 1), **geometry, sink_min_tokens=400)


def test_cli_prints_the_roi_hit_breakdowns(tiny_dir, tmp_path, capsys):
    config = tmp_path / "stage1.yaml"
    config.write_text(yaml.safe_dump({"stage1": {
        "model": str(tiny_dir), "budget": [16, 64], "size_range": [1024, 1024], "samples": 2, "eval_items": 2,
        "steps": 1, "batch_size": 2, "warmup_steps": 0, "label_overlays": 0, "label_source": "box"}}))
    assert main(["train", "stage1", "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "RoI hit rate" in out
    by_family = next(line for line in out.splitlines() if "RoI hit by family" in line)
    by_size = next(line for line in out.splitlines() if "RoI hit by target side in tokens" in line)
    assert re.search(r"(read|mcq|relpos|count) \d\.\d\d \(\d\)", by_family)
    assert re.search(r"(<0\.5|0\.5-1|1-2|>=2) \d\.\d\d \(\d\)", by_size)
    top1 = next(line for line in out.splitlines() if "top token on the target" in line)
    assert re.search(r"target \d\.\d\d, by family: (read|mcq|relpos|count) \d\.\d\d", top1)
