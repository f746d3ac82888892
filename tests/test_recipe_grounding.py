"""Phase 4 (grounding in the DeepEyes format): examples, label masking, the training loop and its held-out set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from qzoom_agent.tools.deepeyes import parse_zoom_call, to_source_box

from qzoom_agent.boxes import roi_hit
from qzoom_agent.recipes.zoomworld_tiny.answer_data import END_TOKEN, IGNORE, AnswerDataConfig
from qzoom_agent.recipes.zoomworld_tiny.grounding import (
    GroundingConfig,
    grounding_eval_set,
    load_grounding_config,
    run_grounding,
)
from qzoom_agent.recipes.zoomworld_tiny.grounding_data import (
    MIN_WINDOW,
    GroundingDataConfig,
    encode_policy,
    grounding_kind,
    make_grounding_batch,
    policy_example,
    view_box,
    widen,
)
from qzoom_agent.recipes.zoomworld_tiny.joint import CHECKPOINT_FILE, METRICS_FILE, batch_loss
from qzoom_agent.recipes.zoomworld_tiny.joint_run import build_joint_run
from qzoom_agent.recipes.zoomworld_tiny.model import ZoomWorldTinySizes
from qzoom_agent.recipes.zoomworld_tiny.warmup import DEFAULT_CONFIG
from qzoom_agent.zoomworld import SPLITS

torch.set_num_threads(2)
SMALL = ZoomWorldTinySizes(vision_hidden=32, vision_depth=2, hidden=32, layers=2, intermediate=64)
ALPHABET = "0123456789"
DATA = GroundingDataConfig(view_tokens=(48, 96), size_range=(1024, 1280),
                           answers=AnswerDataConfig(mix={"oracle": 1.0, "coarse": 1.0}, oracle_tokens=(16, 32),
                                                    coarse_tokens=(16, 32)))


@pytest.fixture(scope="module")
def phase3(tiny_phase1, tmp_path_factory) -> Path:
    """A run folder whose phase3/ is the shared tiny phase-1 model (phase 4 needs only a model and a probe)."""
    out = tmp_path_factory.mktemp("run")
    shutil.copytree(tiny_phase1 / "phase1", out / "phase3")
    return out


def test_zoom_example_supervises_only_the_call_and_the_answer(phase3):
    run = build_joint_run(GroundingConfig(steps=2, warmup_steps=1), phase3 / "phase3")
    adapter = run.adapter
    kind, rng = next(grounding_kind(DATA, i) for i in range(50) if grounding_kind(DATA, i)[0] == "zoom")
    ex = policy_example(DATA, ALPHABET, 123, rng, zoom=True)
    enc = encode_policy(adapter, ex)
    assert len(enc.images) == 2
    assert int((enc.input_ids == adapter.image_token_id).sum()) == sum(im.n_tokens for im in enc.images)
    supervised = adapter.tokenizer.decode(enc.input_ids[enc.labels != IGNORE])
    call_text, answer = supervised.split(END_TOKEN)[:2]
    assert answer == ex.sample.answer and supervised.endswith(END_TOKEN)
    call = parse_zoom_call(call_text)
    # the call's box, read back in the policy's frame, holds the whole target: a hit by construction
    box = to_source_box(call.bbox, "absolute", enc.images[0].resized_size, enc.images[0].source_size)
    assert roi_hit(box, ex.sample.target_box, max_area=(1 + 2 * DATA.margin[1] + 0.5) ** 2)
    assert call.bbox == tuple(float(v) for v in view_box(ex.window, enc.images[0]))
    # nothing of the prompt or the tool turn is supervised: the image tokens never are
    assert not bool((enc.labels[enc.input_ids == adapter.image_token_id] != IGNORE).any())


def test_batches_mix_kinds_and_train(phase3):
    cfg = GroundingConfig(steps=2, warmup_steps=1, lr=3e-3, data=DATA)
    run = build_joint_run(cfg, phase3 / "phase3")
    kinds = {grounding_kind(DATA, i)[0] for i in range(40)}
    assert kinds == {"zoom", "direct", "answer"}
    batch = make_grounding_batch(run.adapter, DATA, ALPHABET, 0, 6)
    assert batch.inputs["image_grid_thw"].shape[0] == len(batch.n_tokens) >= 6
    with torch.no_grad():
        before = float(batch_loss(run, batch, 0.0)["answer"])
    for _ in range(3):
        loss = batch_loss(run, batch, 0.0)
        run.apply(loss["total"], 1.0)
    with torch.no_grad():
        assert float(batch_loss(run, batch, 0.0)["answer"]) < before


def test_phase4_trains_resumes_and_reports_grounding(phase3, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(phase3 / "phase3", out / "phase3")
    cfg = GroundingConfig(steps=2, batch_size=2, warmup_steps=1, checkpoint_every=1, eval_every=2, eval_items=2,
                          view_tokens=64, data=DATA)
    first = run_grounding(cfg, out, alphabet=ALPHABET, sizes=SMALL, max_steps=1)
    assert first["step"] == 1 and torch.load(out / "phase4" / CHECKPOINT_FILE, weights_only=True)["step"] == 1
    last = run_grounding(cfg, out, alphabet=ALPHABET, sizes=SMALL)
    assert last["step"] == 2
    rows = [json.loads(r) for r in (out / "phase4" / METRICS_FILE).read_text().splitlines()]
    assert {"ground_hit", "ground_call_rate", "ground_fine_acc", "oracle_read_acc", "coarse_acc"} <= set(rows[-1])
    assert (out / "phase4" / "model" / "config.json").is_file()


def test_held_out_grounding_set_is_val_and_fine():
    lo, hi = SPLITS["val"]
    samples = grounding_eval_set(DATA, ALPHABET, 4)
    assert all(lo <= s.seed < hi for s in samples) and all(s.kind == "fine" for s in samples)
    assert {s.variant for s in samples} == {"hr", "doc"}


def test_recipe_has_a_valid_grounding_section():
    sizes, cfg, alphabet = load_grounding_config(DEFAULT_CONFIG)
    assert sizes == ZoomWorldTinySizes() and alphabet and cfg.view_tokens == 576 and cfg.aux_weight == 0.0
    with pytest.raises(ValueError, match="mix"):
        GroundingDataConfig(mix={"zoom": 1.0, "think": 1.0})


@pytest.mark.parametrize("box, size", [((10, 10, 20, 18), (1000, 800)), ((990, 0, 1000, 5), (1000, 800)),
                                       ((100, 100, 400, 300), (1000, 800)), ((0, 0, 5, 5), (40, 1000))])
def test_call_windows_are_widened_to_a_croppable_size_inside_the_image(box, size):
    out = widen(box, size, MIN_WINDOW)
    assert 0 <= out[0] <= box[0] and 0 <= out[1] <= box[1]
    assert box[2] <= out[2] <= size[0] and box[3] <= out[3] <= size[1]
    assert out[2] - out[0] == min(max(box[2] - box[0], MIN_WINDOW), size[0])
    assert out[3] - out[1] == min(max(box[3] - box[1], MIN_WINDOW), size[1])


def test_zero_vision_scale_freezes_the_tower(phase3):
    cfg = GroundingConfig(steps=2, warmup_steps=1, lr=3e-3, vision_lr_scale=0.0, data=DATA)
    run = build_joint_run(cfg, phase3 / "phase3")
    visual = {k: v.clone() for k, v in run.model.model.visual.state_dict().items()}
    lm = run.model.lm_head.weight.clone()
    run.apply(batch_loss(run, make_grounding_batch(run.adapter, DATA, ALPHABET, 0, 3), 0.0)["total"], 1.0)
    assert all(torch.equal(v, run.model.model.visual.state_dict()[k]) for k, v in visual.items())
    assert not torch.equal(lm, run.model.lm_head.weight)


def test_export_ships_the_latest_base_phase_unless_phase_4_is_asked_for(tmp_path):
    from qzoom_agent.recipes.zoomworld_tiny.export import latest_model

    for phase in (1, 3, 4):
        (tmp_path / f"phase{phase}" / "model").mkdir(parents=True)
        (tmp_path / f"phase{phase}" / "model" / "config.json").write_text("{}")
    assert latest_model(tmp_path) == tmp_path / "phase3" / "model"
    assert latest_model(tmp_path, 4) == tmp_path / "phase4" / "model"
    with pytest.raises(FileNotFoundError, match="phase2"):
        latest_model(tmp_path, 2)
