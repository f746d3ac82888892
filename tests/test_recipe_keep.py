"""The keep loss: the frozen tower probe read off the language model's image-token states."""

from __future__ import annotations

import pytest
import torch

from qzoom_agent.recipes.zoomworld_tiny.answer_config import AnswerConfig
from qzoom_agent.recipes.zoomworld_tiny.answer_data import AnswerDataConfig, make_batch
from qzoom_agent.recipes.zoomworld_tiny.dense_probe import dense_losses
from qzoom_agent.recipes.zoomworld_tiny.joint import batch_loss, config_key, image_positions, train_step
from qzoom_agent.recipes.zoomworld_tiny.joint_run import build_joint_run
from qzoom_agent.recipes.zoomworld_tiny.keep import keep_losses
from qzoom_agent.recipes.zoomworld_tiny.model import ZoomWorldTinySizes

torch.set_num_threads(2)
ALPHABET = "0123456789"
DATA = AnswerDataConfig(mix={"oracle": 0.3, "dense": 0.3, "coarse": 0.4}, oracle_tokens=(16, 64),
                        coarse_tokens=(16, 64), scene_aux=True)
WEIGHTS = {"present": 1.0, "char": 1.0, "colour": 1.0}


def _config(**kw) -> AnswerConfig:
    return AnswerConfig(steps=30, batch_size=4, warmup_steps=1, lr=1e-2, vision_lr_scale=0.0, aux_weight=0.0,
                        aux_weights=WEIGHTS, keep_weight=1.0, keep_layers=[1], data=DATA, **kw)


def test_keep_loss_is_the_probe_loss_on_layer_inputs_and_leaves_the_probe_alone(tiny_phase1):
    run = build_joint_run(_config(), tiny_phase1 / "phase1")
    batch = make_batch(run.adapter, DATA, ALPHABET, 0, 4)
    assert batch.dense is not None and batch.dense_rows
    out = run.model(**batch.inputs, output_hidden_states=True)
    positions = image_positions(batch.inputs["input_ids"], run.model.config.image_token_id)
    got = keep_losses(out.hidden_states, positions, batch.dense_rows, batch.dense, run.probe, [1], WEIGHTS)
    feats = torch.cat([out.hidden_states[1][r, positions[r]] for r in batch.dense_rows])
    assert feats.shape[0] == batch.dense.present.shape[0]  # one target per visual token of the rows with targets
    want = dense_losses(run.probe(feats), batch.dense, WEIGHTS)["total"]
    assert float(got.detach()) > 0 and abs(float(got.detach()) - float(want.detach())) < 1e-5
    got.backward()
    assert run.probe.proj.weight.grad is None  # the probe is read, not trained
    layer0 = run.adapter.layers[0]
    assert float(layer0.mlp.down_proj.weight.grad.abs().sum()) > 0  # layer 0 wrote what layer 1 reads
    with pytest.raises(ValueError, match="keep_layers"):
        keep_losses(out.hidden_states, positions, batch.dense_rows, batch.dense, run.probe, [0], WEIGHTS)


def test_training_with_the_keep_loss_lowers_it(tiny_phase1):
    cfg = _config()
    run = build_joint_run(cfg, tiny_phase1 / "phase1")
    batch = make_batch(run.adapter, DATA, ALPHABET, 0, 4)
    with torch.no_grad():
        before = batch_loss(run, batch, 0.0, WEIGHTS, keep_weight=1.0, keep_layers=[1])
    assert float(before["keep"]) > 0 and float(before["total"]) > float(before["answer"])
    for _ in range(8):
        train_step(run, batch, cfg)
    with torch.no_grad():
        after = batch_loss(run, batch, 0.0, WEIGHTS, keep_weight=1.0, keep_layers=[1])
        off = batch_loss(run, batch, 0.0, WEIGHTS)
    assert float(after["keep"]) < float(before["keep"])
    assert float(off["keep"]) == 0.0 and abs(float(off["total"]) - float(off["answer"])) < 1e-6


def test_keep_config_is_validated_and_keeps_old_run_keys():
    sizes = ZoomWorldTinySizes()
    base = AnswerConfig(steps=10, batch_size=2, warmup_steps=1)
    assert config_key(sizes, base, ALPHABET) == config_key(sizes, base.model_copy(update={"keep_layers": [2]}),
                                                             ALPHABET)
    assert config_key(sizes, base.model_copy(update={"keep_weight": 0.5}), ALPHABET) != config_key(
        sizes, base, ALPHABET)
    with pytest.raises(ValueError, match="from 1 on"):
        AnswerConfig(steps=10, batch_size=2, warmup_steps=1, keep_layers=[0])
    with pytest.raises(ValueError, match="per-token targets"):  # nothing for the probe to read
        AnswerConfig(steps=10, batch_size=2, warmup_steps=1, keep_weight=1.0,
                     data=AnswerDataConfig(mix={"oracle": 1.0}))
