"""Stage 3 (gate): the consistency rule, balancing, budget picks, AUC and a tiny end-to-end run."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from qzoom_agent.model import QZoomModel
from qzoom_agent.scoring import auc
from qzoom_agent.tiny import make_tiny
from qzoom_agent.train.stage3 import STAGE_DIR, Stage3Config, load_stage3_config, run_stage3
from qzoom_agent.train.stage3_labels import EASY, TRANSITION, GateSample, agree, balance, classify, pick

torch.set_num_threads(2)
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train" / "stage3_zoomworld_tiny.yaml"


@pytest.mark.parametrize("correct, top_agree, expected", [
    ([False, False, True, True, True], True, "transition"),
    ([False, True, True], True, "transition"),
    ([True, True, True, True], True, "easy"),
    ([True, False, True, True], True, "non_monotonic"),
    ([False, False, False, True], True, "hallucinated"),  # only the top budget is right
    ([True, True, True, True], False, "unstable"),  # the two highest budgets disagree
])
def test_consistency_rule(correct, top_agree, expected):
    assert classify(correct, top_agree) == expected


def test_agreement_is_normalised_containment():
    assert agree("Red.", "red") and agree("the left", "left") and not agree("3", "5") and not agree("", "")


def test_balance_keeps_every_transition_and_as_many_easy():
    samples = [GateSample(i, TRANSITION if i < 3 else EASY, (False, True, True)) for i in range(10)]
    kept = balance(samples, seed=0)
    assert sum(s.category == TRANSITION for s in kept) == 3 and sum(s.category == EASY for s in kept) == 3
    assert balance(samples, seed=0) == kept


def test_picks_follow_the_label_rule():
    rng = random.Random(0)
    transition = GateSample(0, TRANSITION, (False, False, False, True, True))
    picks = [pick(transition, rng) for _ in range(400)]
    positives = [p for p in picks if p is not None and p[1] == 1]
    assert {b for b, _ in positives} == {1, 2}  # the two highest wrong budgets
    assert 0.85 < len(positives) / len(picks) < 0.95
    assert all(p is None or p[1] == 1 for p in picks)  # no right budget below the top two: no label 0
    easy = GateSample(1, EASY, (True, True, True, True))
    assert all(pick(easy, rng) in ((0, 0), (1, 0)) for _ in range(50))
    assert pick(GateSample(2, "non_monotonic", (True, False, True)), rng) is None


def test_auc():
    assert auc([0.9, 0.1], [1, 0]) == 1.0 and auc([0.1, 0.9], [1, 0]) == 0.0
    assert auc([0.4, 0.4, 0.6], [1, 0, 0]) == 0.25 and auc([0.3], [1]) is None


def test_stage3_trains_only_the_gate(tmp_path):
    base = make_tiny(tmp_path / "model", "qwen2_5_vl")  # with untrained heads in model/qzoom
    (base / "zoomworld.json").write_text(json.dumps({"alphabet": "0123456789"}))
    cfg = Stage3Config(model=str(base), qzoom=str(base / "qzoom"), budgets=[16, 32, 48, 64], samples=6,
                       size_range=(1024, 1024), eval_tokens=32, eval_items=3, steps=3, batch_size=2,
                       warmup_steps=1, max_new_tokens=2, checkpoint_every=1)
    stage = tmp_path / "run" / STAGE_DIR
    stage.mkdir(parents=True)
    patterns = [[False, False, True, True], [False, True, True, True], [True] * 4, [True] * 4,
                [True, False, True, True], [False] * 4]  # 2 transitions, 2 easy, 1 non-monotonic, 1 dropped
    rows = [{"index": i, "kind": "fine", "answers": ["7" if c else "x" for c in p], "correct": p}
            for i, p in enumerate(patterns)]
    (stage / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # the answer cache
    before = QZoomModel.from_pretrained(base)
    m = run_stage3(cfg, tmp_path / "run")
    assert m["step"] == 3 and m["transition"] == 2 and m["easy"] == 2 and m["kept"] == 4
    assert json.loads((stage / "label_stats.json").read_text())["non_monotonic"] == 1
    after = QZoomModel.from_pretrained(base, qzoom=stage / "qzoom")
    old, new = before.heads.state_dict(), after.heads.state_dict()
    changed = {k for k in new if not torch.equal(new[k], old[k])}
    assert changed and all(k.startswith(("high_res_layers.", "high_res_head.")) for k in changed)
    for k, v in after.adapter.model.state_dict().items():
        assert torch.equal(v, before.adapter.model.state_dict()[k]), k
    rows_out = [json.loads(r) for r in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [r["when"] for r in rows_out] == ["before", "after"]
    assert 0.0 <= rows_out[-1]["coarse_skipped"] <= 1.0 and 0.0 <= rows_out[-1]["fine_zoomed"] <= 1.0


def test_zoom_rungs_top_the_ladder_with_forced_zoom_answers(tmp_path):
    from qzoom_agent.config import budget_for
    from qzoom_agent.train.common import stage_question
    from qzoom_agent.train.stage3 import answer_at_budgets

    base = make_tiny(tmp_path / "model", "qwen2_5_vl")
    cfg = Stage3Config(model=str(base), qzoom=str(base / "qzoom"), budgets=[16, 32], zoom_budgets=[16, 32],
                       samples=2, size_range=(1024, 1024), max_new_tokens=3, alphabet="0123456789")
    assert cfg.rungs == [(16, "never"), (32, "never"), (16, "always"), (32, "always")]
    qz = QZoomModel.from_pretrained(base)
    qz.config = qz.config.model_copy(update={"gate_threshold": 2.0})  # the gate never fires on its own
    path = tmp_path / "answers.jsonl"
    rows = answer_at_budgets(qz, cfg, "0123456789", path)
    assert [len(r["answers"]) for r in rows] == [4, 4]
    s = stage_question(cfg, "0123456789", "train", 1)
    for (b, mode), got in zip(cfg.rungs, rows[1]["answers"], strict=True):
        ans = qz.answer(s.image, s.question, mode=mode, budget=budget_for(b), max_new_tokens=3)
        assert ans.text == got and ans.zoomed == (mode == "always" and ans.bbox is not None)
    with pytest.raises(ValueError, match="holds answers at 4 rungs and the config has 3"):
        answer_at_budgets(qz, cfg.model_copy(update={"zoom_budgets": [], "budgets": [8, 16, 32]}), "0123456789",
                          path)


@pytest.mark.parametrize("fields, message", [
    ({"budgets": [64, 32, 128]}, "budgets must be distinct ascending"),
    ({"budgets": [64, 128]}, "the ladder needs >= 3 rungs"),
    ({"budgets": [], "zoom_budgets": [64, 128, 256]}, "one plain budget at least"),
    ({"budgets": [64, 128], "zoom_budgets": [256]}, "zoom_budgets needs two values or none"),
])
def test_bad_ladders(fields, message):
    with pytest.raises(ValueError, match=message):
        Stage3Config(qzoom="q", **fields)


def test_shipped_stage3_config_is_valid():
    cfg = load_stage3_config(CONFIG)
    assert cfg.budgets == sorted(cfg.budgets) and cfg.qzoom.endswith("stage1/qzoom")


def test_doctests():
    import doctest

    from qzoom_agent.train import stage3, stage3_labels

    for module in (stage3, stage3_labels):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_stage3_resumed_run_equals_an_uninterrupted_one(tmp_path):
    base = make_tiny(tmp_path / "model", "qwen2_5_vl")
    (base / "zoomworld.json").write_text(json.dumps({"alphabet": "0123456789"}))
    cfg = Stage3Config(model=str(base), qzoom=str(base / "qzoom"), budgets=[16, 32, 48, 64], samples=4,
                       size_range=(1024, 1024), eval_tokens=32, eval_items=1, steps=3, batch_size=2,
                       warmup_steps=1, max_new_tokens=2, checkpoint_every=1)
    patterns = [[False, False, True, True], [False, True, True, True], [True] * 4, [True] * 4]
    rows = [{"index": i, "kind": "fine", "answers": ["7" if c else "x" for c in p], "correct": p}
            for i, p in enumerate(patterns)]
    for run in ("whole", "split"):
        (tmp_path / run / STAGE_DIR).mkdir(parents=True)
        (tmp_path / run / STAGE_DIR / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_stage3(cfg, tmp_path / "whole")
    assert run_stage3(cfg, tmp_path / "split", max_steps=2)["step"] == 2
    assert run_stage3(cfg, tmp_path / "split")["step"] == 3
    a = QZoomModel.from_pretrained(base, qzoom=tmp_path / "whole" / STAGE_DIR / "qzoom").heads.state_dict()
    b = QZoomModel.from_pretrained(base, qzoom=tmp_path / "split" / STAGE_DIR / "qzoom").heads.state_dict()
    start = QZoomModel.from_pretrained(base).heads.state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a)  # it trained
    assert all(torch.equal(a[k], b[k]) for k in a)
