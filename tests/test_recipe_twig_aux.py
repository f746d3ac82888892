"""Stage 1's twig colour probes (the recipe's twig_aux.py): targets, loss, gradients, and a tiny run that resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qzoom_agent.model import QZoomModel
from qzoom_agent.recipes.zoomworld_tiny.dense_crops import COLOURS, IGNORE_INDEX
from qzoom_agent.recipes.zoomworld_tiny.twig_aux import TwigAuxProbe, aux_targets
from qzoom_agent.tiny import make_tiny
from qzoom_agent.train.stage1 import STAGE_DIR, Stage1Config, load_stage1_config, run_stage1, twig_inputs, twig_loss
from qzoom_agent.train.stage1_labels import box_labels
from qzoom_agent.zoomworld import sample

torch.set_num_threads(2)
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train" / "stage1_zoomworld_tiny_box_aux.yaml"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = make_tiny(tmp_path_factory.mktemp("aux") / "model", "qwen2_5_vl", with_heads=False)
    (path / "zoomworld.json").write_text(json.dumps({"alphabet": "0123456789"}))
    return path


def _read_sample(index: int = 3):
    return sample("hr", "val", index, alphabet="0123456789", mix={"read": 1.0})


def test_targets_name_the_asked_tag_colour_and_only_tag_tokens():
    s = _read_sample()
    t = aux_targets(s, (20, 24))
    assert t.present.shape == t.colour.shape == (480,)
    asked = s.question.split(" the ")[1].split(" tag")[0]
    assert COLOURS[t.asked] == asked
    assert (t.present == 1).any() and (t.present == 0).any()
    labelled = t.colour != IGNORE_INDEX
    assert labelled.any() and bool((t.present[labelled] == 1).all())  # objects' colours are left out
    panel_colours = {COLOURS.index(p["colour"]) for p in s.panels}
    assert set(t.colour[labelled].tolist()) <= panel_colours
    count = sample("hr", "val", 0, alphabet="0123456789", mix={"count": 1.0})
    assert aux_targets(count, (20, 24)).asked == IGNORE_INDEX  # no single asked tag


def test_probe_loss_is_the_sum_of_its_terms_and_trains_the_twig_only(tiny_dir):
    qz = QZoomModel.from_pretrained(tiny_dir, qzoom=False)
    qz.init_heads()
    s = _read_sample()
    x = twig_inputs(qz, s, (16, 64))
    t = aux_targets(s, x.grid)
    probe = TwigAuxProbe(qz.adapter.hidden_size)
    states = qz.heads.twig_states(x.hidden_k, x.rotary, x.mask)
    loss = probe.loss(states, x.image_start, x.image_end, t)
    out = probe.tokens(states[0, x.image_start:x.image_end])
    valid = t.present >= 0
    expected = (torch.nn.functional.binary_cross_entropy_with_logits(out[valid, 0], t.present[valid])
                + torch.nn.functional.cross_entropy(out[:, 1:], t.colour, ignore_index=IGNORE_INDEX)
                + torch.nn.functional.cross_entropy(probe.query(states[0, -1])[None], torch.tensor([t.asked])))
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    loss.backward()
    first = qz.heads.twig_layers[0]
    assert first.self_attn.q_proj.weight.grad is not None and first.self_attn.q_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in qz.adapter.model.parameters())  # the base is frozen by construction
    assert all(p.grad is None for p in qz.heads.high_res_layers.parameters())
    with pytest.raises(RuntimeError, match="aux targets"):
        probe.loss(states, x.image_start, x.image_end - 1, t)


def test_twig_loss_reuses_given_states(tiny_dir):
    qz = QZoomModel.from_pretrained(tiny_dir, qzoom=False)
    qz.init_heads()
    s = _read_sample()
    x = twig_inputs(qz, s, (16, 64))
    labels = box_labels(tuple(s.target_box), qz.adapter.prepare_image(s.image, min_tokens=16, max_tokens=64))
    with torch.no_grad():
        states = qz.heads.twig_states(x.hidden_k, x.rotary, x.mask)
        assert float(twig_loss(qz, x, labels, states=states)) == pytest.approx(float(twig_loss(qz, x, labels)))


def test_aux_config_is_validated_and_shipped_variant_loads():
    with pytest.raises(ValueError, match="twig_T >= 2"):
        Stage1Config(aux_weight=1.0, twig_T=1)
    with pytest.raises(ValueError):
        Stage1Config(aux_weight=-1.0)
    with pytest.raises(ValueError, match="roi_tokens"):
        Stage1Config(roi_tokens=(64, 16))
    cfg = load_stage1_config(CONFIG)
    assert cfg.label_source == "box" and cfg.aux_weight > 0 and cfg.roi_mode == "peak"


def test_stage1_with_probes_checkpoints_them_and_resumes(tiny_dir, tmp_path):
    cfg = Stage1Config(model=str(tiny_dir), budget=(16, 64), size_range=(1024, 1024), samples=4, eval_items=2,
                       steps=4, batch_size=2, warmup_steps=1, save_every=2, checkpoint_every=2, label_overlays=0,
                       label_source="box", aux_weight=1.0, twig_T=2, twig_K=1, roi_mode="peak", roi_peak_ratio=0.4,
                       roi_tokens=(4, 16), roi_min_side=1.5)
    with pytest.raises(ValueError, match="needs an auxiliary loss"):  # stage 1 itself knows no dataset's probes
        run_stage1(cfg, tmp_path / "no-aux", max_steps=1)
    assert not (tmp_path / "no-aux").exists()
    first = run_stage1(cfg, tmp_path, max_steps=2, aux=TwigAuxProbe)
    state = torch.load(tmp_path / STAGE_DIR / "checkpoint.pt", weights_only=True)
    assert first["step"] == 2 and "aux" in state and state["aux"]["tokens.weight"].shape[0] == 1 + len(COLOURS)
    with pytest.raises(ValueError, match="written with aux_weight > 0"):  # the probe's state cannot be dropped
        run_stage1(cfg.model_copy(update={"aux_weight": 0.0}), tmp_path)
    last = run_stage1(cfg, tmp_path, aux=TwigAuxProbe)  # resumes with the probe's state
    assert last["step"] == 4
    trained = QZoomModel.from_pretrained(tiny_dir, qzoom=tmp_path / STAGE_DIR / "qzoom")
    assert not any(k.startswith("tokens.") or k.startswith("query.") for k in trained.heads.state_dict())
    c = trained.config  # the box rule and crop budget travel with the adapter
    assert (c.roi_mode, c.roi_peak_ratio, c.roi_min_tokens, c.roi_max_tokens) == ("peak", 0.4, 4, 16)
    assert c.roi_min_side_tokens == 1.5
