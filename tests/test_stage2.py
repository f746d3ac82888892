"""Stage 2 (targeted post-SFT): the spliced-sequence loss, judges, and what a run may change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qzoom_agent.boxes import Box
from qzoom_agent.model import QZoomModel
from qzoom_agent.perception import Located
from qzoom_agent.tiny import make_tiny
from qzoom_agent.train.judges import exact_judge, make_judge, normalized_judge
from qzoom_agent.train.stage2 import (
    STAGE_DIR,
    LoraSettings,
    Stage2Config,
    load_stage2_config,
    question,
    roi_answer_loss,
    run_stage2,
)

torch.set_num_threads(2)
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train" / "stage2_zoomworld_tiny.yaml"
BUDGET = (16, 64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = make_tiny(tmp_path_factory.mktemp("s2") / "model", "qwen2_5_vl")
    (path / "zoomworld.json").write_text(json.dumps({"alphabet": "0123456789"}))
    return path


def test_judges():
    assert exact_judge("q", " 42 ", "42") and not exact_judge("q", "42.", "42")
    assert normalized_judge("q", "42.", "42") and normalized_judge("q", "(B)", "B", ["1", "2", "3", "4"])
    assert make_judge("normalized") is normalized_judge
    with pytest.raises(ValueError, match="unknown judge"):
        make_judge("gpt-4")


@pytest.mark.parametrize("reuse_src_pos", [True, False])
def test_roi_loss_scores_the_same_sequence_the_zoom_answers_from(tiny, reuse_src_pos):
    """The cache-free training pass over the spliced sequence gives the logits of inference's zoom re-prefill."""
    qz = QZoomModel.from_pretrained(tiny, reuse_src_pos=reuse_src_pos)
    cfg = Stage2Config(model=str(tiny), qzoom=str(tiny / "qzoom"), size_range=(1024, 1024))
    s = question(cfg, "0123456789", "train", 1)
    box = [100, 120, 400, 380]
    cells = (2, 1, 6, 5)  # the mask cells the box came from: they, not the box, place source-aligned positions
    with torch.inference_mode():
        fp = qz.prefill(s.image, s.question, budget=BUDGET)
        logits = qz.zoom(fp, Located(None, [Box(*box)], [cells])).logits
    end = qz.adapter.tokenizer.convert_tokens_to_ids("<|im_end|>")
    expected = -torch.log_softmax(logits[0].float(), -1)[end]
    with torch.no_grad():
        loss = roi_answer_loss(qz, s, box, "", BUDGET, reuse_src_pos, list(cells))  # "" is just <|im_end|>
        default = roi_answer_loss(qz, s, box, "", BUDGET, reuse_src_pos)  # cells the box overlaps instead
    assert torch.allclose(loss, expected, atol=1e-4)
    assert torch.equal(loss, default) != reuse_src_pos  # only source-aligned positions depend on the cells


def test_mining_judges_direct_and_zoomed_answers(tiny, tmp_path):
    from qzoom_agent.train.stage2 import mine

    qz = QZoomModel.from_pretrained(tiny)
    cfg = Stage2Config(model=str(tiny), qzoom=str(tiny / "qzoom"), budget=BUDGET, samples=2, size_range=(1024, 1024),
                       max_new_tokens=2)
    path = tmp_path / "mined.jsonl"
    rows = mine(qz, cfg, "0123456789", normalized_judge, path)
    assert [r["index"] for r in rows] == [0, 1] and len(path.read_text().splitlines()) == 2
    for r in rows:
        s = question(cfg, "0123456789", "train", r["index"])
        assert r["direct_right"] == normalized_judge(s.question, r["direct"], s.answer, s.options)
        assert r["hard"] == (r["direct_right"] and not r["roi_right"] and r["box"] is not None)
    assert mine(qz, cfg, "0123456789", normalized_judge, path) == rows  # cached: nothing answered again


def _mined(stage: Path, n: int) -> None:
    rows = [{"index": i, "direct": "1", "roi": "2", "box": [50 * i, 60, 50 * i + 300, 400], "direct_right": True,
             "roi_right": False, "hard": i != 1} for i in range(n)]
    stage.mkdir(parents=True)
    (stage / "mined.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("lora", [None, LoraSettings(r=2, alpha=4, dropout=0.0)])
def test_stage2_changes_only_the_llm_layers(tiny, tmp_path, lora):
    cfg = Stage2Config(model=str(tiny), qzoom=str(tiny / "qzoom"), budget=BUDGET, samples=4,
                       size_range=(1024, 1024), eval_items=2, steps=2, batch_size=2, warmup_steps=1, lr=1e-2,
                       max_new_tokens=2, lora=lora)
    _mined(tmp_path / "run" / STAGE_DIR, 4)  # the mining cache: 3 hard cases
    before = QZoomModel.from_pretrained(tiny)
    m = run_stage2(cfg, tmp_path / "run")
    assert m["step"] == 2 and m["hard"] == 3 and {"acc_never", "acc_always", "acc_auto"} <= set(m)
    out = tmp_path / "run" / STAGE_DIR / "model"
    after = QZoomModel.from_pretrained(out)
    old, new = before.adapter.model.state_dict(), after.adapter.model.state_dict()
    assert set(old) == set(new)  # LoRA is merged away: a plain HF model remains
    changed = {k for k in new if not torch.equal(new[k], old[k])}
    assert changed and all(".language_model.layers." in k for k in changed), sorted(changed)[:5]
    for k, v in after.heads.state_dict().items():  # twig and gate frozen
        assert torch.equal(v, before.heads.state_dict()[k]), k
    assert (out / "zoomworld.json").is_file()


def test_shipped_stage2_config_is_valid():
    cfg = load_stage2_config(CONFIG)
    assert cfg.judge == "normalized" and cfg.lora is None


def test_stage2_resumed_run_equals_an_uninterrupted_one(tiny, tmp_path):
    cfg = Stage2Config(model=str(tiny), qzoom=str(tiny / "qzoom"), budget=BUDGET, samples=4,
                       size_range=(1024, 1024), eval_items=1, steps=3, batch_size=2, warmup_steps=1, lr=1e-2,
                       max_new_tokens=2, checkpoint_every=1)
    for run in ("whole", "split"):
        _mined(tmp_path / run / STAGE_DIR, 4)
    run_stage2(cfg, tmp_path / "whole")
    assert run_stage2(cfg, tmp_path / "split", max_steps=1)["step"] == 1
    assert run_stage2(cfg, tmp_path / "split")["step"] == 3  # from the step-1 checkpoint: weights and AdamW state
    a = QZoomModel.from_pretrained(tmp_path / "whole" / STAGE_DIR / "model").adapter.model.state_dict()
    b = QZoomModel.from_pretrained(tmp_path / "split" / STAGE_DIR / "model").adapter.model.state_dict()
    base = QZoomModel.from_pretrained(tiny).adapter.model.state_dict()
    assert any(not torch.equal(a[k], base[k]) for k in a)  # it trained
    assert all(torch.equal(a[k], b[k]) for k in a)
