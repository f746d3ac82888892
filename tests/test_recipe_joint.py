"""Phase-2 answer training: data, prompts and labels, batched loss, training, checkpoint/resume, held-out seeds."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from qzoom_agent.model import QZoomModel
from qzoom_agent.recipes.zoomworld_tiny.answer_config import AnswerConfig, load_answer_config
from qzoom_agent.recipes.zoomworld_tiny.answer_data import (
    END_TOKEN,
    IGNORE,
    AnswerDataConfig,
    collate,
    encode_example,
    make_batch,
    make_example,
    tile_window,
)
from qzoom_agent.recipes.zoomworld_tiny.joint import (
    CHECKPOINT_FILE,
    METRICS_FILE,
    PHASE_DIR,
    answer_losses,
    batch_loss,
    run_joint,
    train_step,
)
from qzoom_agent.recipes.zoomworld_tiny.joint_eval import eval_seeds
from qzoom_agent.recipes.zoomworld_tiny.joint_run import build_joint_run
from qzoom_agent.recipes.zoomworld_tiny.model import ZoomWorldTinySizes
from qzoom_agent.recipes.zoomworld_tiny.warmup import DEFAULT_CONFIG
from qzoom_agent.zoomworld import SPLITS

torch.set_num_threads(2)
# two LM layers: QZoomModel's default config needs at least 2
SMALL = ZoomWorldTinySizes(vision_hidden=32, vision_depth=2, hidden=32, layers=2, intermediate=64)
ALPHABET = "0123456789"
# small budgets keep the tests fast; the code paths are the same as at 256 tokens
DATA = AnswerDataConfig(mix={"oracle": 0.4, "dense": 0.2, "coarse": 0.2, "tile": 0.2}, oracle_tokens=(16, 64),
                        coarse_tokens=(16, 64), tile_side_tokens=(2, 6))


def small_config(**overrides) -> AnswerConfig:
    base = dict(steps=4, batch_size=3, warmup_steps=1, checkpoint_every=2, eval_every=2, eval_items=2, data=DATA)
    return AnswerConfig(**{**base, **overrides})


def _copy_phase1(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "phase1", dst / "phase1")
    return dst


def test_examples_are_deterministic_and_mixed():
    a, b = make_example(DATA, ALPHABET, 5), make_example(DATA, ALPHABET, 5)
    assert (a.question, a.answer, a.source, a.budget) == (b.question, b.answer, b.source, b.budget)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    examples = [make_example(DATA, ALPHABET, i) for i in range(20)]
    assert {ex.source for ex in examples} == set(DATA.mix)
    dense = next(ex for ex in examples if ex.source == "dense")
    assert dense.question.startswith("What is written on the ") and set(dense.answer) <= set(ALPHABET)
    assert dense.dense is not None


def test_prompt_and_label_masking(tiny_phase1):
    adapter = build_joint_run(small_config(), tiny_phase1 / "phase1").adapter
    tok = adapter.tokenizer
    for i in range(6):
        ex = make_example(DATA, ALPHABET, i)
        enc = encode_example(adapter, ex)
        image = adapter.prepare_image(ex.image, min_tokens=ex.budget[0], max_tokens=ex.budget[1])
        prompt = adapter.build_prompt(image, ex.question).input_ids[0]
        assert torch.equal(enc.input_ids[: enc.prompt_len], prompt)  # the inference prompt, unchanged
        sup = enc.labels != IGNORE
        assert not sup[: enc.prompt_len].any() and sup[enc.prompt_len :].all()
        assert tok.decode(enc.labels[sup].tolist()) == ex.answer + END_TOKEN
        assert tok.decode(enc.labels[sup].tolist(), skip_special_tokens=True) == ex.answer
        if ex.dense is not None:
            assert enc.dense.char.shape[0] == enc.image.n_tokens


def test_batched_loss_is_mean_of_example_losses(tiny_phase1):
    run = build_joint_run(small_config(), tiny_phase1 / "phase1")
    run.model.eval()
    examples = [make_example(DATA, ALPHABET, i) for i in range(5)]
    encoded = [encode_example(run.adapter, ex) for ex in examples]
    assert len({e.input_ids.shape[0] for e in encoded}) > 1  # padding is exercised
    with torch.no_grad():
        batched = batch_loss(run, collate(run.adapter, encoded, [ex.source for ex in examples]), 0.0)["answer"]
        single = [batch_loss(run, collate(run.adapter, [e], [ex.source]), 0.0)["answer"]
                  for e, ex in zip(encoded, examples, strict=True)]
    assert abs(float(batched) - float(torch.stack(single).mean())) < 1e-4


def test_answer_losses_ignore_unsupervised():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4, IGNORE], [IGNORE, 1, IGNORE, IGNORE, IGNORE]])
    out = answer_losses(logits, labels)
    want0 = torch.nn.functional.cross_entropy(logits[0, 1:3], torch.tensor([3, 4]))
    want1 = torch.nn.functional.cross_entropy(logits[1, 0:1], torch.tensor([1]))
    assert torch.allclose(out, torch.stack([want0, want1]))


def test_training_reduces_loss_and_moves_the_lm(tiny_phase1):
    cfg = small_config(lr=1e-2, steps=20, warmup_steps=1, vision_lr_scale=0.0)
    run = build_joint_run(cfg, tiny_phase1 / "phase1")
    batch = make_batch(run.adapter, cfg.data, ALPHABET, 0, 4)
    head = run.model.lm_head.weight.detach().clone()
    tower = {k: v.clone() for k, v in run.model.model.visual.state_dict().items()}
    with torch.no_grad():
        before = float(batch_loss(run, batch, 1.0)["answer"])
    for _ in range(6):
        train_step(run, batch, cfg)
    with torch.no_grad():
        after = float(batch_loss(run, batch, 1.0)["answer"])
    assert after < before
    assert not torch.equal(head, run.model.lm_head.weight)
    # vision_lr_scale=0 freezes the tower (and the decoupled weight decay, which AdamW scales by the LR)
    assert all(torch.equal(tower[k], v) for k, v in run.model.model.visual.state_dict().items())


def test_scene_aux_labels_every_view_and_trains_the_new_probe_heads(tiny_phase1):
    data = DATA.model_copy(update={"scene_aux": True, "min_glyph_px": 4.0})
    weights = {"present": 1.0, "char": 1.0, "colour": 1.0, "shape": 1.0, "index": 1.0}
    cfg = small_config(data=data, aux_weights=weights, lr=1e-2)
    run = build_joint_run(cfg, tiny_phase1 / "phase1")  # phase 1's narrower probe loads into the wider one
    assert set(run.probe(torch.zeros(1, run.probe.proj.in_features))) == set(weights)
    examples = [make_example(data, ALPHABET, i) for i in range(12)]
    encoded = [encode_example(run.adapter, ex) for ex in examples]
    assert {ex.source for ex in examples} == set(DATA.mix)
    for enc in encoded:  # every source carries targets on its own token grid
        assert enc.dense is not None and enc.dense.present.shape[0] == enc.image.n_tokens
    coarse = [enc for ex, enc in zip(examples, encoded, strict=True) if ex.source == "coarse"]
    assert any((enc.dense.shape != -100).any() for enc in coarse)  # the large object's shape is labelled
    batch = collate(run.adapter, encoded, [ex.source for ex in examples])
    assert batch.dense_rows == list(range(12))
    shape_head = run.probe.proj.weight[-5:].detach().clone()
    with torch.no_grad():
        before = float(batch_loss(run, batch, 1.0, weights)["aux"])
    for _ in range(4):
        train_step(run, batch, cfg)
    with torch.no_grad():
        after = float(batch_loss(run, batch, 1.0, weights)["aux"])
    assert after < before and not torch.equal(shape_head, run.probe.proj.weight[-5:])
    with pytest.raises(ValueError, match="aux_weights"):
        small_config(aux_weights={"present": 1.0, "size": 1.0})


def test_checkpoint_resume_and_export(tiny_phase1, tmp_path):
    cfg = small_config()
    split, whole = _copy_phase1(tiny_phase1, tmp_path / "split"), _copy_phase1(tiny_phase1, tmp_path / "whole")
    first = run_joint(cfg, split, alphabet=ALPHABET, sizes=SMALL, max_steps=2)
    assert first["step"] == 2
    assert torch.load(split / PHASE_DIR / CHECKPOINT_FILE, weights_only=True)["step"] == 2
    last = run_joint(cfg, split, alphabet=ALPHABET, sizes=SMALL)
    ref = run_joint(cfg, whole, alphabet=ALPHABET, sizes=SMALL)
    assert last["step"] == ref["step"] == 4
    a = torch.load(split / PHASE_DIR / CHECKPOINT_FILE, weights_only=True)["model"]
    b = torch.load(whole / PHASE_DIR / CHECKPOINT_FILE, weights_only=True)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    rows = [json.loads(r) for r in (split / PHASE_DIR / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and {"oracle_read_acc", "coarse_acc"} <= set(rows[-1])
    qz = QZoomModel.from_pretrained(split / PHASE_DIR / "model", qzoom=False)
    ex = make_example(DATA, ALPHABET, 0)
    assert isinstance(qz.answer(ex.image, ex.question, mode="never", budget=(4, 64), max_new_tokens=3).text, str)


def test_eval_seeds_come_from_val():
    lo, hi = SPLITS["val"]
    seeds = eval_seeds(50)
    assert all(lo <= s < hi for group in seeds.values() for s in group)
    assert not set(seeds["oracle_read"]) & set(seeds["coarse"])
    with pytest.raises(ValueError):
        make_example(AnswerDataConfig(mix={"dense": 1.0}), ALPHABET, 0, split="val")


def test_default_config_has_answer_section():
    sizes, cfg, alphabet = load_answer_config(DEFAULT_CONFIG)
    assert sizes == ZoomWorldTinySizes() and cfg.betas == (0.9, 0.98) and alphabet
    assert cfg.aux_at(0) == 1.0 and cfg.aux_at(int(0.9 * cfg.steps)) == 0.0
    with pytest.raises(ValueError):
        AnswerConfig(steps=10, warmup_steps=10)


@pytest.mark.parametrize("seed", range(40))
def test_tile_window_holds_the_target_inside_the_image(seed):
    rng = random.Random(seed)
    size = (rng.randint(50, 3000), rng.randint(50, 3000))
    w, h = rng.randint(1, min(96, size[0])), rng.randint(1, min(96, size[1]))
    x, y = rng.randint(0, size[0] - w), rng.randint(0, size[1] - h)
    side = (rng.randint(100, 1200), rng.randint(100, 1200))
    x1, y1, x2, y2 = tile_window(rng, size, (x, y, x + w, y + h), side)
    assert 0 <= x1 < x2 <= size[0] and 0 <= y1 < y2 <= size[1]
    assert (x2 - x1, y2 - y1) == (min(side[0], size[0]), min(side[1], size[1]))
    assert x1 <= x and x + w <= x2 and y1 <= y and y + h <= y2


def test_tiles_are_native_scale_windows_no_larger_than_their_cap():
    cfg = AnswerDataConfig(mix={"tile": 1.0}, tile_scale=(1.0, 1.0), tile_side_tokens=(4, 6))
    for i in range(4):
        ex = make_example(cfg, ALPHABET, i)
        assert ex.source == "tile" and 112 <= min(ex.image.size) and max(ex.image.size) <= 168
        assert ex.budget[1] >= (ex.image.width // 28) * (ex.image.height // 28)
