"""Phase 1 of ``qzoom-agent train base`` for ``zoomworld-tiny``: dense per-token warm-up of the vision tower.

Why: trained only through answers, a from-scratch Qwen2.5-VL tower never learns glyphs at arbitrary sub-patch
offsets (``docs/zoomworld-tiny.md``). Here a throw-away linear probe on the merged vision tokens predicts, per
28 px token, whether a tag covers it, which glyph is centred in it and the tag's colour, on dense crops whose
placement and size follow a curriculum (`dense_crops`). Only the vision tower and the probe train.

Usage::

    qzoom-agent train base --phase 1 --config configs/recipes/zoomworld_tiny/base.yaml --out runs/zw [--steps N]

Writes ``OUT/phase1/``: ``checkpoint.pt`` (atomic; resumed from when present), ``metrics.jsonl`` (one row per
held-out evaluation) and, when the call ends, ``model/`` (the whole model, tokenizer and image processor, loadable
with ``from_pretrained``) for the next phase.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from ...checks import one_line
from ...train.common import OptimConfig, decay_groups, prefetched, read_config
from .dense_crops import MAX_TAG_CHARS, SEED_RANGES, DenseCropConfig, crop_seed, eval_sets, render_dense_crop
from .dense_probe import (
    DenseProbe,
    ProbeBatch,
    dense_losses,
    encode_crops,
    evaluate_probe,
    probe_counts,
    vision_tokens,
)
from .model import ZoomWorldTinySizes, build_zoomworld_tiny
from .run_state import RunState, keep_metrics_until, read_metrics

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[3] / "configs" / "recipes" / "zoomworld_tiny" / "base.yaml"
PHASE_DIR = "phase1"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"
# Fields that do not change the training trajectory: a run may resume with them changed.
_FREE_FIELDS = {"checkpoint_every", "eval_every", "eval_images", "threads"}
_EMA = 0.95  # smoothing of the loss and accuracy shown on the progress bar


class LossWeights(BaseModel):
    """Weights of the probe losses in the total."""

    model_config = ConfigDict(extra="forbid")

    present: float = Field(1.0, ge=0.0, description="BCE: a tag covers the token")
    char: float = Field(1.0, ge=0.0, description="CE: the glyph centred in the token")
    colour: float = Field(1.0, ge=0.0, description="CE: the colour of the tag covering the token")
    index: float = Field(0.0, ge=0.0, description="CE: the glyph's position in its tag; > 0 adds the head. It "
                                                  "lets the language model read characters in order by content")


class WarmupConfig(OptimConfig):
    """Phase-1 settings (the ``warmup:`` section of ``configs/recipes/zoomworld_tiny/base.yaml``)."""

    seed: int = Field(0, ge=0, description="seed of the model's and the probe's initial weights")
    steps: int = Field(8000, ge=1, description="schedule length in optimiser steps (LR and curriculum span it)")
    lr: float = Field(3e-3, gt=0.0, description="peak AdamW learning rate")
    loss_weights: LossWeights = Field(default_factory=LossWeights, description="probe loss weights")
    crops: DenseCropConfig = Field(default_factory=DenseCropConfig, description="dense crop drawing and curriculum")
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints")
    eval_every: int = Field(500, ge=1, description="steps between held-out evaluations")
    eval_images: int = Field(256, ge=1, le=10**6, description="crops per held-out set (aligned and free)")
    threads: int = Field(2, ge=1, description="torch CPU threads")

    @model_validator(mode="after")
    def _check(self) -> WarmupConfig:
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps})")
        if self.steps * self.batch_size > SEED_RANGES["train"][1] - SEED_RANGES["train"][0]:
            raise ValueError("steps * batch_size exceeds the training seed range; lower steps or batch_size")
        return self


def load_train_config(path: str | Path) -> tuple[ZoomWorldTinySizes, WarmupConfig]:
    """Read the ``model:`` and ``warmup:`` sections of a training YAML (other sections belong to later phases).

    Raises:
        ValueError: one line saying which file and field is wrong and how.
    """
    path = Path(path)
    data = read_config(path)
    if not isinstance(data.get("warmup"), dict):
        raise ValueError(f"{path} needs a 'warmup:' mapping (see configs/recipes/zoomworld_tiny/base.yaml)")
    try:
        return ZoomWorldTinySizes(**(data.get("model") or {})), WarmupConfig(**data["warmup"])
    except ValueError as err:
        raise ValueError(f"invalid training config {path}: {one_line(err)}") from err


def config_key(sizes: ZoomWorldTinySizes, cfg: WarmupConfig) -> str:
    """Hash of everything that shapes the trajectory; a checkpoint resumes only under the same key."""
    blob = {"model": sizes.model_dump(), "warmup": cfg.model_dump(exclude=_FREE_FIELDS)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def train_batch(cfg: WarmupConfig, processor, step: int) -> ProbeBatch:
    """The batch of optimiser step ``step``: a pure function of (config, step), so resuming replays the stream."""
    progress = step / cfg.steps
    crops = [render_dense_crop(crop_seed("train", step * cfg.batch_size + i), progress, cfg.crops)
             for i in range(cfg.batch_size)]
    return encode_crops(crops, processor)


@dataclass(kw_only=True)
class WarmupRun(RunState):
    """Everything a phase-1 run holds; `save`/`restore` move it through ``checkpoint.pt``.

    The curriculum position (``step / cfg.steps``) and the crop stream (seeds ``step * batch_size + i``) are pure
    functions of ``step``, so ``step`` is all the data and curriculum state there is to save. Only the vision
    tower trains; the rest of the model stays at its seeded init and is not checkpointed.
    """

    weights_key: ClassVar[str] = "visual"

    model: torch.nn.Module
    tokenizer: Any
    processor: Any

    def weights(self) -> torch.nn.Module:
        return self.model.model.visual


def build_run(cfg: WarmupConfig, sizes: ZoomWorldTinySizes) -> WarmupRun:
    """Fresh model, probe, AdamW (decay on matrices only) and LR schedule; everything but the vision tower frozen."""
    model, tok, processor = build_zoomworld_tiny(cfg.seed, **sizes.model_dump())
    model.requires_grad_(False)
    visual = model.model.visual
    visual.requires_grad_(True)
    probe = DenseProbe(model.config.vision_config.out_hidden_size,
                       n_index=MAX_TAG_CHARS if cfg.loss_weights.index > 0 else 0)
    groups = decay_groups([*visual.parameters(), *probe.parameters()], cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cfg.lr_factor)
    model.train()
    return WarmupRun(model=model, tokenizer=tok, processor=processor, probe=probe, optimizer=optimizer,
                     scheduler=scheduler)


def train_step(run: WarmupRun, batch: ProbeBatch, cfg: WarmupConfig) -> dict[str, float]:
    """One optimiser step on ``batch``; returns the step's losses and char accuracy on glyph-centre tokens."""
    logits = run.probe(vision_tokens(run.model, batch))
    losses = dense_losses(logits, batch.targets, cfg.loss_weights.model_dump())
    run.apply(losses["total"], cfg.grad_clip)
    correct, n = probe_counts({k: t.detach() for k, t in logits.items()}, batch.targets)["char"]
    out = {k: float(v.detach()) for k, v in losses.items()}
    out["char_acc"] = correct / n if n else float("nan")
    for k in ("total", "char_acc"):
        if not math.isnan(out[k]):
            prev = run.running.get(k, out[k])
            run.running[k] = _EMA * prev + (1 - _EMA) * out[k]
    return out


def _evaluate(run: WarmupRun, cfg: WarmupConfig, sets: dict, metrics_path: Path, images: int) -> dict:
    row = {"step": run.step, "images": run.step * cfg.batch_size, "progress": round(run.step / cfg.steps, 4),
           "lr": run.scheduler.get_last_lr()[0], "loss": run.running.get("total"),
           "train_char_acc": run.running.get("char_acc"), "train_seconds": round(run.train_seconds, 1),
           "images_per_s": round(images / run.train_seconds, 2) if run.train_seconds else None}
    row.update(evaluate_probe(run.model, run.probe, run.processor, sets))
    with open(metrics_path, "a") as f:
        f.write(json.dumps(row) + "\n")
    logger.info("step %d: char aligned %.3f free %.3f, present %.3f, colour %.3f, %.1f img/s", run.step,
                row["char_acc_aligned"], row["char_acc_free"], row["present_acc_free"], row["colour_acc_free"],
                row["images_per_s"] or 0.0)
    return row


def run_warmup(cfg: WarmupConfig, out_dir: str | Path, *, sizes: ZoomWorldTinySizes | None = None,
               max_steps: int | None = None) -> dict:
    """Train (or resume) phase 1 in ``out_dir/phase1`` until ``cfg.steps``, or until global step ``max_steps``.

    Args:
        cfg: phase-1 settings.
        out_dir: run folder; ``phase1/checkpoint.pt`` there is resumed when present (same config required).
        sizes: model sizes (the YAML's ``model:`` section); default `ZoomWorldTinySizes()`.
        max_steps: stop once the global step reaches this (the schedule still spans ``cfg.steps``), so a run can
            be split over several calls.

    Returns:
        The last metrics row: step, lr, smoothed loss and train char accuracy, images/s and held-out
        ``{present,char,colour}_acc_{aligned,free}``.
    """
    sizes = sizes or ZoomWorldTinySizes()
    torch.set_num_threads(cfg.threads)
    phase = Path(out_dir) / PHASE_DIR
    phase.mkdir(parents=True, exist_ok=True)
    ckpt, metrics_path, key = phase / CHECKPOINT_FILE, phase / METRICS_FILE, config_key(sizes, cfg)
    run = build_run(cfg, sizes)
    if ckpt.exists():
        run.restore(ckpt, key)
        keep_metrics_until(metrics_path, run.step)
        logger.info("resuming phase 1 from step %d of %d", run.step, cfg.steps)
    stop = min(cfg.steps, max_steps if max_steps is not None else cfg.steps)
    sets = eval_sets(cfg.crops, cfg.eval_images)
    last = (read_metrics(metrics_path) or [None])[-1]
    images = run.step * cfg.batch_size
    with tqdm(total=stop, initial=run.step, desc="phase 1 warm-up", dynamic_ncols=True, mininterval=2.0) as bar:
        # the next batch renders in a worker thread while this one trains
        for _, fetch in prefetched(partial(train_batch, cfg, run.processor), run.step, stop):
            tick = time.perf_counter()
            batch = fetch()
            train_step(run, batch, cfg)
            run.train_seconds += time.perf_counter() - tick
            images += batch.n_images
            bar.update(1)
            bar.set_postfix(loss=f"{run.running['total']:.3f}", char=f"{run.running.get('char_acc', 0):.2f}")
            if run.step % cfg.eval_every == 0 or run.step == stop:
                last = _evaluate(run, cfg, sets, metrics_path, images)
            if run.step % cfg.checkpoint_every == 0 or run.step == stop:
                run.save(ckpt, key)
    if last is None or last["step"] != run.step:
        last = _evaluate(run, cfg, sets, metrics_path, images)
    export = phase / "model"
    run.model.save_pretrained(export)
    run.tokenizer.save_pretrained(export)
    run.processor.save_pretrained(export)
    return last
