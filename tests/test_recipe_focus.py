"""The focus loss: target-token masks on every view, the loss's value on known maps, and training with it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qzoom_agent.recipes.zoomworld_tiny.answer_config import AnswerConfig
from qzoom_agent.recipes.zoomworld_tiny.answer_data import AnswerDataConfig, encode_example, make_batch, make_example
from qzoom_agent.recipes.zoomworld_tiny.focus import focus_losses, focus_mask
from qzoom_agent.recipes.zoomworld_tiny.joint import batch_loss, config_key, train_step
from qzoom_agent.recipes.zoomworld_tiny.joint_run import build_joint_run
from qzoom_agent.recipes.zoomworld_tiny.model import ZoomWorldTinySizes
from qzoom_agent.zoomworld import generate

torch.set_num_threads(2)
ALPHABET = "0123456789"
DATA = AnswerDataConfig(mix={"oracle": 0.4, "dense": 0.2, "coarse": 0.2, "tile": 0.2}, oracle_tokens=(16, 64),
                        coarse_tokens=(16, 64), tile_side_tokens=(2, 6))


def test_mask_marks_the_cells_a_box_touches():
    # a 280 x 140 px window on a 5 x 10 grid: 28 px per cell, no scaling
    mask = focus_mask((100, 200, 380, 340), (100 + 30, 200 + 10, 100 + 60, 200 + 20), (5, 10)).reshape(5, 10)
    assert mask.dtype == torch.bool
    assert mask.nonzero().tolist() == [[0, 1], [0, 2]]  # x 30-60 touches columns 1 and 2, y 10-20 row 0
    # in a window twice as large squeezed onto the same grid (56 px a cell), x 30-50 touches one column
    squeezed = focus_mask((100, 200, 660, 480), (130, 210, 150, 220), (5, 10)).reshape(5, 10)
    assert squeezed.nonzero().tolist() == [[0, 0]]
    assert not focus_mask((0, 0, 100, 100), (200, 200, 250, 250), (2, 2)).any()  # outside the window
    with pytest.raises(ValueError, match="non-empty window"):
        focus_mask((0, 0, 0, 100), (0, 0, 1, 1), (2, 2))


def test_loss_is_minus_log_of_the_target_share_over_image_tokens():
    # one layer, two heads, a 6-token sequence whose tokens 1..4 are the image; rows 4 and 5 predict the answer
    att = torch.zeros(1, 2, 6, 6)
    att[0, 0, 4] = torch.tensor([0.5, 0.1, 0.1, 0.2, 0.1, 0.0])  # head 0: image share on tokens 2,3 = 0.3/0.5
    att[0, 1, 4] = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.0])  # head 1: all of it on token 3
    att[0, :, 5] = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2, 0.0])  # both heads: 2 of 4 image tokens
    positions, mask = torch.tensor([1, 2, 3, 4]), torch.tensor([False, True, True, False])
    out = focus_losses((att,), [positions], [(4, 6)], [mask], [0])
    # row 4: mean over heads of [.1 .1 .2 .1] and [0 0 1 0] -> [.05 .05 .6 .05], share .65 / .75
    want = -(math.log(0.65 / 0.75) + math.log(0.5)) / 2
    assert out.shape == (1,) and abs(float(out[0]) - want) < 1e-5
    # examples without a target (or an empty one) drop out
    assert focus_losses((att,), [positions], [(4, 6)], [None], [0]).numel() == 0
    assert focus_losses((att,), [positions], [(4, 6)], [torch.zeros(4, dtype=torch.bool)], [0]).numel() == 0


def test_every_source_carries_a_mask_over_its_target():
    examples = [make_example(DATA, ALPHABET, i) for i in range(24)]
    assert {ex.source for ex in examples} == {"oracle", "dense", "coarse", "tile"}
    assert all(ex.focus is not None for ex in examples)
    # a coarse scene: the mask covers the large object's cells on the encoded grid
    sample = generate("hr", 3, alphabet=ALPHABET, mix={"color": 1.0}, size_range=(1024, 1024))
    mask = focus_mask((0, 0, *sample.image.size), tuple(sample.target_box), (8, 8)).reshape(8, 8)
    w, h = sample.image.size
    x1, y1, x2, y2 = (np.asarray(sample.target_box) * 8 / np.array([w, h, w, h])).tolist()
    assert mask[int((y1 + y2) / 2), int((x1 + x2) / 2)]  # the object's centre cell
    assert mask.sum() <= (int(x2) - int(x1) + 1) * (int(y2) - int(y1) + 1)


def test_encoded_masks_match_the_image_grid(tiny_phase1):
    run = build_joint_run(AnswerConfig(steps=4, batch_size=2, warmup_steps=1, data=DATA), tiny_phase1 / "phase1")
    for i in range(8):
        enc = encode_example(run.adapter, make_example(DATA, ALPHABET, i))
        assert enc.focus.shape == (enc.image.n_tokens,) and enc.focus.any()


def test_locate_examples_supervise_only_where_to_look(tiny_phase1):
    data = DATA.model_copy(update={"mix": {"locate": 1.0}, "locate_tokens": (16, 48),
                                   "locate_size_range": (1024, 1536)})
    run = build_joint_run(AnswerConfig(steps=4, batch_size=2, warmup_steps=1, data=data), tiny_phase1 / "phase1")
    ex = make_example(data, ALPHABET, 0)
    assert ex.source == "locate" and ex.budget[1] <= 48
    enc = encode_example(run.adapter, ex)
    assert enc.input_ids.shape[0] == enc.prompt_len and (enc.labels == -100).all()  # no answer appended
    assert enc.focus.any()
    batch = make_batch(run.adapter, data, ALPHABET, 0, 2)
    with torch.no_grad():
        losses = batch_loss(run, batch, 0.0, focus_weight=1.0, focus_layers=[0, 1])
    # nothing to answer, but the last prompt token's attention is supervised
    assert float(losses["answer"]) == 0.0 and float(losses["focus"]) > 0


def test_training_with_focus_moves_attention_onto_the_target(tiny_phase1):
    cfg = AnswerConfig(steps=30, batch_size=4, warmup_steps=1, lr=1e-2, vision_lr_scale=0.0, aux_weight=0.0,
                       focus_weight=1.0, focus_layers=[0, 1], data=DATA)
    run = build_joint_run(cfg, tiny_phase1 / "phase1")
    batch = make_batch(run.adapter, cfg.data, ALPHABET, 0, 4)
    assert batch.focus is not None and len(batch.prompt_lens) == 4
    with torch.no_grad():
        before = batch_loss(run, batch, 0.0, focus_weight=1.0, focus_layers=[0, 1])
    assert float(before["focus"]) > 0 and float(before["total"]) > float(before["answer"])
    for _ in range(8):
        train_step(run, batch, cfg)
    with torch.no_grad():
        after = batch_loss(run, batch, 0.0, focus_weight=1.0, focus_layers=[0, 1])
        off = batch_loss(run, batch, 0.0)
    assert float(after["focus"]) < float(before["focus"])
    assert float(off["focus"]) == 0.0 and abs(float(off["answer"]) - float(after["answer"])) < 1e-5
    # training switched the LM to eager attention per step only
    assert run.model.model.language_model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="exceed"):
        batch_loss(run, batch, 0.0, focus_weight=1.0, focus_layers=[5])


def test_focus_config_is_validated_and_keeps_old_run_keys():
    sizes = ZoomWorldTinySizes()
    base = AnswerConfig(steps=10, batch_size=2, warmup_steps=1)
    assert config_key(sizes, base, ALPHABET) == config_key(sizes, base.model_copy(update={"focus_layers": [1]}),
                                                             ALPHABET)
    on = base.model_copy(update={"focus_weight": 0.5})
    assert config_key(sizes, on, ALPHABET) != config_key(sizes, base, ALPHABET)
    with pytest.raises(ValueError, match="0-indexed"):
        AnswerConfig(steps=10, batch_size=2, warmup_steps=1, focus_layers=[-1])
    with pytest.raises(ValueError):
        AnswerConfig(steps=10, batch_size=2, warmup_steps=1, focus_weight=-1.0)
