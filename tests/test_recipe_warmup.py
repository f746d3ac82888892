"""Phase-1 vision warm-up: dense crops and targets, token order, trainer, checkpoint and resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qzoom_agent.model import QZoomModel
from qzoom_agent.recipes.zoomworld_tiny.dense_crops import (
    CHAR_CLASSES,
    COLOURS,
    EVAL_FREE_OFFSET,
    IGNORE_INDEX,
    SEED_RANGES,
    TOKEN_PX,
    DenseCrop,
    DenseCropConfig,
    Tag,
    crop_seed,
    dense_targets,
    render_dense_crop,
    tag_positions,
)
from qzoom_agent.recipes.zoomworld_tiny.dense_probe import dense_losses, encode_crops, vision_tokens
from qzoom_agent.recipes.zoomworld_tiny.model import ZoomWorldTinySizes, build_zoomworld_tiny
from qzoom_agent.recipes.zoomworld_tiny.run_state import CheckpointMismatchError
from qzoom_agent.recipes.zoomworld_tiny.warmup import (
    CHECKPOINT_FILE,
    DEFAULT_CONFIG,
    PHASE_DIR,
    WarmupConfig,
    build_run,
    load_train_config,
    run_warmup,
    train_batch,
    train_step,
)
from qzoom_agent.train.common import read_config
from qzoom_agent.zoomworld.render import PALETTE

torch.set_num_threads(2)
SMALL = ZoomWorldTinySizes(vision_hidden=32, vision_depth=2, hidden=32, layers=1, intermediate=64)


def small_config(**overrides) -> WarmupConfig:
    base = dict(steps=6, batch_size=3, warmup_steps=2, checkpoint_every=3, eval_every=3, eval_images=4,
                crops=DenseCropConfig(max_side_tokens=4))
    return WarmupConfig(**{**base, **overrides})


def _centre(box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def test_dense_crop_is_deterministic():
    a, b = render_dense_crop(7, 0.4), render_dense_crop(7, 0.4)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    for field in ("present", "char", "colour"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(np.asarray(render_dense_crop(8, 0.4).image), np.asarray(a.image))


def test_dense_targets_on_hand_made_tags():
    # a 3x4-token panel, and a one-glyph panel whose glyph centre is at (70, 126): cell row 4, col 2
    tags = [Tag((0, 0, 84, 112), "red", "AB", 24, [("A", (10, 10, 27, 34)), ("B", (38, 10, 55, 34))], []),
            Tag((56, 105, 84, 140), "blue", "7", 20, [("7", (63, 116, 77, 136))], [])]
    present, char, colour = dense_targets(tags, 5, 6)
    assert present.shape == char.shape == colour.shape == (5, 6)
    assert (present[:4, :3] == 1).all() and (colour[:4, :3] == COLOURS.index("red")).all()
    assert (present[:, 4:] == 0).all() and (colour[:, 4:] == IGNORE_INDEX).all()
    assert present[3, 2] == 1 and present[4, 2] == 1 and colour[4, 2] == COLOURS.index("blue")  # 28/28, 28x35
    assert char[0, 0] == CHAR_CLASSES.index("A") and char[0, 1] == CHAR_CLASSES.index("B")
    assert char[4, 2] == CHAR_CLASSES.index("7") and (char != IGNORE_INDEX).sum() == 3
    # a panel covering a quarter of a cell is ignored, not called background
    present, _, colour = dense_targets([Tag((0, 0, 14, 14), "green", "", 8, [], [])], 2, 2)
    assert present[0, 0] == -1 and colour[0, 0] == IGNORE_INDEX and (present.ravel()[1:] == 0).all()
    # two glyph centres in one cell: no single right answer
    _, char, _ = dense_targets([Tag((0, 0, 56, 56), "red", "AB", 10, [("A", (2, 2, 9, 12)), ("B", (14, 2, 21, 12))],
                                    [])], 2, 2)
    assert (char == IGNORE_INDEX).all()


@pytest.mark.parametrize("progress", [0.0, 1.0])
def test_rendered_crop_targets_match_its_tags(progress):
    offsets = []
    for seed in range(12):
        crop = render_dense_crop(seed, progress)
        rows, cols = crop.grid
        assert (crop.image.height, crop.image.width) == (rows * TOKEN_PX, cols * TOKEN_PX)
        assert 56 <= crop.image.width <= 224 and 56 <= crop.image.height <= 224
        pixels = np.asarray(crop.image)
        touched = np.zeros((rows, cols), bool)
        for tag in crop.tags:
            x1, y1, x2, y2 = tag.box
            assert tuple(pixels[y1 + 1, x1 + 1]) == PALETTE[tag.colour]  # the panel is drawn where recorded
            r1, c1, r2, c2 = -(-y1 // TOKEN_PX), -(-x1 // TOKEN_PX), y2 // TOKEN_PX, x2 // TOKEN_PX
            assert (crop.present[r1:r2, c1:c2] == 1).all()  # cells wholly inside the panel
            assert (crop.colour[r1:r2, c1:c2] == COLOURS.index(tag.colour)).all()
            touched[y1 // TOKEN_PX:-(-y2 // TOKEN_PX), x1 // TOKEN_PX:-(-x2 // TOKEN_PX)] = True
            for ch, gbox in tag.glyphs:
                cx, cy = _centre(gbox)
                r, c = int(cy // TOKEN_PX), int(cx // TOKEN_PX)
                shared = sum(int(_centre(g)[1] // TOKEN_PX) == r and int(_centre(g)[0] // TOKEN_PX) == c
                             for t in crop.tags for _, g in t.glyphs) > 1
                assert crop.char[r, c] == (IGNORE_INDEX if shared else CHAR_CLASSES.index(ch))
                offsets.append((cx % TOKEN_PX - TOKEN_PX / 2, cy % TOKEN_PX - TOKEN_PX / 2))
                assert (pixels[gbox[1]:gbox[3], gbox[0]:gbox[2]] != PALETTE[tag.colour]).any()  # ink is there
        assert (crop.present[~touched] == 0).all()
        assert (crop.colour[~touched] == IGNORE_INDEX).all() and (crop.char[~touched] == IGNORE_INDEX).all()
    offsets = np.array(offsets)
    if progress == 0.0:  # every glyph centred on a token centre (within the font's rounding)
        assert np.abs(offsets).max() <= 1.5
    else:  # free placement: centres spread over the whole token
        assert offsets.std(0).min() > 5


def test_curriculum_sizes():
    cfg = DenseCropConfig()
    assert cfg.size_range(0.0) == cfg.size_range(0.1) == (24, 30)
    assert cfg.size_range(0.7) == cfg.size_range(1.0) == (16, 40)
    assert cfg.ramp(0.4) == pytest.approx(0.5)
    sizes = {t.size for s in range(30) for t in render_dense_crop(s, 0.0).tags}
    assert min(sizes) >= 24 and max(sizes) <= 30
    digits = DenseCropConfig(alphabet="0123456789")
    assert all(t.text.isdigit() for s in range(10) for t in render_dense_crop(s, 1.0, digits).tags)
    with pytest.raises(ValueError, match="alphabet"):
        DenseCropConfig(alphabet="ab")


def test_target_raster_order_matches_vision_tower_output():
    """Brightening one token cell changes the vision tower's output row r * cols + c the most.

    A 5x7-token image spans several 4x4-token attention windows, so the window-ordered sequence inside the tower
    differs from raster order: a missing reverse permutation (or a transposed grid) would fail here.
    """
    model, _, processor = build_zoomworld_tiny(0, **SMALL.model_dump())
    rows, cols = 5, 7
    base = np.random.default_rng(0).integers(60, 120, (rows * TOKEN_PX, cols * TOKEN_PX, 3), dtype=np.uint8)
    zeros = np.zeros((rows, cols))

    def tokens(pixels: np.ndarray) -> torch.Tensor:
        crop = DenseCrop(Image.fromarray(pixels), zeros.astype(np.float32), zeros.astype(np.int64),
                         zeros.astype(np.int64), [])
        with torch.no_grad():
            return vision_tokens(model, encode_crops([crop], processor))

    ref = tokens(base)
    assert ref.shape[0] == rows * cols
    for r, c in [(0, 0), (0, 5), (1, 4), (2, 6), (4, 1), (4, 6)]:
        lit = base.copy()
        lit[r * TOKEN_PX:(r + 1) * TOKEN_PX, c * TOKEN_PX:(c + 1) * TOKEN_PX] = 255
        assert int((tokens(lit) - ref).norm(dim=-1).argmax()) == r * cols + c


def test_zoomworld_tiny_default_size_and_init():
    model, tok, processor = build_zoomworld_tiny(0)
    n = sum(p.numel() for p in model.parameters())
    assert 3.5e6 < n < 3.75e6  # the doc's config A: 3.62 M
    vision_w = model.model.visual.blocks[0].mlp.up_proj.weight.detach()
    text_w = model.model.language_model.layers[0].mlp.up_proj.weight.detach()
    assert float(vision_w.std()) == pytest.approx(128**-0.5, rel=0.1)  # 1/sqrt(width), not HF's 0.02
    assert float(text_w.std()) == pytest.approx(256**-0.5, rel=0.1)
    assert sum(model.config.text_config.rope_parameters["mrope_section"]) == 256 // 4 // 2
    assert model.config.text_config.rope_parameters["rope_theta"] == 1e6
    assert processor.merge_size * processor.patch_size == TOKEN_PX
    small, _, _ = build_zoomworld_tiny(0, hidden=32, layers=1, intermediate=32, vision_hidden=16, vision_depth=1,
                                       rope_theta=100.0)
    assert small.config.text_config.rope_parameters["rope_theta"] == 100.0
    assert small.config.vision_config.rope_parameters["rope_theta"] != 100.0  # the tower's own rotary is untouched


def test_repo_config_loads_and_bad_config_is_one_line(tmp_path: Path):
    sizes, cfg = load_train_config(DEFAULT_CONFIG)
    assert sizes == ZoomWorldTinySizes() and cfg.batch_size == 16 and cfg.lr == 3e-3
    bad = tmp_path / "bad.yaml"
    bad.write_text("warmup:\n  lr: -1\n")
    with pytest.raises(ValueError, match="lr") as err:
        load_train_config(bad)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupConfig(steps=10, warmup_steps=10)


def test_config_extends_replaces_whole_sections(tmp_path: Path):
    (tmp_path / "base.yaml").write_text("model: {hidden: 64}\nwarmup: {steps: 500, lr: 1.0e-3}\n"
                                        "tiles: {steps: 9, batch_size: 2}\n")
    (tmp_path / "variant.yaml").write_text("extends: base.yaml\ntiles: {steps: 7}\n")
    data = read_config(tmp_path / "variant.yaml")
    assert data == {"model": {"hidden": 64}, "warmup": {"steps": 500, "lr": 1.0e-3}, "tiles": {"steps": 7}}
    sizes, cfg = load_train_config(tmp_path / "variant.yaml")
    assert sizes.hidden == 64 and cfg.steps == 500
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nwarmup: {}\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ValueError, match="extends itself"):
        read_config(tmp_path / "a.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ValueError, match="mapping"):
        read_config(tmp_path / "list.yaml")
    # the repo's phase-3 variant keeps the main recipe's model and phases 1-2
    variant = DEFAULT_CONFIG.with_name("scene_aux.yaml")
    main, other = read_config(DEFAULT_CONFIG), read_config(variant)
    assert {k: other[k] for k in ("model", "warmup", "answer")} == {k: main[k] for k in ("model", "warmup", "answer")}
    assert other["tiles"]["data"]["scene_aux"] and not main["tiles"]["data"].get("scene_aux", False)


def test_seed_ranges_are_disjoint_and_enforced():
    (a0, a1), (b0, b1) = SEED_RANGES["train"], SEED_RANGES["eval"]
    assert a1 <= b0 or b1 <= a0
    assert crop_seed("eval", EVAL_FREE_OFFSET) < b1
    with pytest.raises(ValueError):
        crop_seed("train", a1 - a0)
    with pytest.raises(ValueError, match="seed range"):
        WarmupConfig(steps=10**9, batch_size=16)


def test_training_moves_only_vision_and_probe_and_fits_a_fixed_batch():
    cfg = small_config(steps=20)
    run = build_run(cfg, SMALL)
    batch = train_batch(cfg, run.processor, 0)
    frozen = {k: v.clone() for k, v in run.model.named_parameters() if not k.startswith("model.visual.")}
    visual = {k: v.clone() for k, v in run.model.model.visual.named_parameters()}
    weights = cfg.loss_weights.model_dump()

    def loss() -> float:
        with torch.no_grad():
            return float(dense_losses(run.probe(vision_tokens(run.model, batch)), batch.targets, weights)["total"])

    before = loss()
    for _ in range(8):
        train_step(run, batch, cfg)
    assert loss() < 0.8 * before
    assert all(torch.equal(v, dict(run.model.named_parameters())[k]) for k, v in frozen.items())
    assert all(not torch.equal(v, dict(run.model.model.visual.named_parameters())[k]) for k, v in visual.items())
    assert run.scheduler.get_last_lr()[0] == pytest.approx(cfg.lr * cfg.lr_factor(8))


def test_character_position_head_trains_in_phase1(tmp_path: Path):
    cfg = small_config(loss_weights={"index": 1.0}, crops=DenseCropConfig(max_side_tokens=4, size_start=(24, 24)))
    run = build_run(cfg, SMALL)
    batch = train_batch(cfg, run.processor, 0)
    crops = [render_dense_crop(crop_seed("train", i), 0.0, cfg.crops) for i in range(cfg.batch_size)]
    want = np.concatenate([tag_positions(c.tags, *c.grid).ravel() for c in crops])
    assert np.array_equal(batch.targets.index.numpy(), want)
    assert (want >= 1).any()  # some tag has a second character: the head has two classes to tell apart
    assert ((want != -100) == (batch.targets.char.numpy() != -100)).all()  # labelled exactly where chars are
    losses = dense_losses(run.probe(vision_tokens(run.model, batch)), batch.targets, cfg.loss_weights.model_dump())
    assert float(losses["index"].detach()) > 0 and run.probe.sizes["index"] == 3
    out = run_warmup(cfg, tmp_path / "run", sizes=SMALL)
    assert "index_acc_free" in out  # the held-out evaluation reports the new head
    assert "index" not in build_run(small_config(), SMALL).probe(torch.zeros(1, 32))  # off by default


def test_checkpoint_resume_continues_exactly(tmp_path: Path):
    cfg = small_config()
    first = run_warmup(cfg, tmp_path / "split", sizes=SMALL, max_steps=3)
    assert first["step"] == 3 and 0 <= first["char_acc_free"] <= 1
    ckpt = tmp_path / "split" / PHASE_DIR / CHECKPOINT_FILE
    saved = torch.load(ckpt, weights_only=True)
    resumed = build_run(cfg, SMALL)
    resumed.restore(ckpt, saved["config_key"])
    assert resumed.step == 3 and resumed.scheduler.last_epoch == 3
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(cfg.lr * cfg.lr_factor(3))  # no warm-up restart
    state = resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(state[i]["exp_avg"], s["exp_avg"]) for i, s in saved["optimizer"]["state"].items())

    run_warmup(cfg, tmp_path / "split", sizes=SMALL)
    run_warmup(cfg, tmp_path / "whole", sizes=SMALL)
    split = torch.load(ckpt, weights_only=True)
    whole = torch.load(tmp_path / "whole" / PHASE_DIR / CHECKPOINT_FILE, weights_only=True)
    assert split["step"] == whole["step"] == 6
    for k, v in whole["visual"].items():
        torch.testing.assert_close(split["visual"][k], v, rtol=1e-5, atol=1e-6)
    assert split["scheduler"]["last_epoch"] == whole["scheduler"]["last_epoch"] == 6
    assert (tmp_path / "whole" / PHASE_DIR / "model" / "config.json").exists()
    with pytest.raises(CheckpointMismatchError):
        run_warmup(small_config(lr=1e-3), tmp_path / "whole", sizes=SMALL)


def test_train_base_cli_runs_phase1_and_refuses_missing_stages(tmp_path, capsys):
    import yaml

    from qzoom_agent.cli import main
    from qzoom_agent.recipes.zoomworld_tiny.warmup import DEFAULT_CONFIG

    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    cfg["model"].update(vision_hidden=32, vision_depth=2, hidden=64, layers=2, intermediate=64)
    cfg["warmup"].update(steps=4, batch_size=2, checkpoint_every=2, eval_every=2, eval_images=2, warmup_steps=1)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "base", "--phase", "1", "--config", str(path), "--out", str(tmp_path / "run")]) == 0
    assert "phase 1 (vision warm-up) at step 4" in capsys.readouterr().out
    assert (tmp_path / "run" / "phase1" / "checkpoint.pt").is_file()
    cfg["answer"].update(steps=2, batch_size=2, checkpoint_every=2, eval_every=2, eval_items=2, warmup_steps=1)
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "base", "--phase", "2", "--config", str(path), "--out", str(tmp_path / "run")]) == 0
    assert "phase 2 (answer training) at step 2" in capsys.readouterr().out
    assert (tmp_path / "run" / "phase2" / "model" / "config.json").is_file()
    cfg["tiles"].update(steps=2, batch_size=2, checkpoint_every=2, eval_every=2, eval_items=2, warmup_steps=1)
    path.write_text(yaml.safe_dump(cfg))
    # the recipe's focus loss reads layers 2-3 of 4; a 2-layer model is refused before anything runs
    assert main(["train", "base", "--phase", "3", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    assert "focus_layers [2, 3] exceed the model's 2 decoder layers" in capsys.readouterr().err
    assert not (tmp_path / "run" / "phase3").exists()
    cfg["tiles"]["focus_layers"] = [0, 1]
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "base", "--phase", "3", "--config", str(path), "--out", str(tmp_path / "run")]) == 0
    assert "phase 3 (native-scale tiles) at step 2" in capsys.readouterr().out
    assert (tmp_path / "run" / "phase3" / "model" / "config.json").is_file()
    ship = tmp_path / "ship"
    assert main(["train", "base", "--phase", "export", "--config", str(path), "--out", str(tmp_path / "run"),
                 "--to", str(ship)]) == 0
    assert f"exported {tmp_path / 'run' / 'phase3' / 'model'} to {ship}" in capsys.readouterr().out
    assert json.loads((ship / "zoomworld.json").read_text())["alphabet"] == cfg["warmup"]["crops"]["alphabet"]
    from safetensors import safe_open

    with safe_open(str(ship / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    qz = QZoomModel.from_pretrained(ship, qzoom=False)  # loads as fp32 and answers
    assert next(qz.adapter.model.parameters()).dtype == torch.float32
    assert isinstance(qz.answer(Image.new("RGB", (64, 64)), "What?", mode="never", max_new_tokens=2).text, str)
    assert main(["train", "base", "--phase", "export", "--config", str(path), "--out", str(tmp_path / "none"),
                 "--to", str(ship)]) == 2
    assert "holds no trained model" in capsys.readouterr().err
    assert main(["train", "stage2", "--out", str(tmp_path / "run")]) == 2
    assert "train stage2 needs --config" in capsys.readouterr().err
    assert main(["train", "stage1", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    assert "needs a 'stage1:' mapping" in capsys.readouterr().err
    assert main(["train", "base", "--steps", "3", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
