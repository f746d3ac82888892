"""Q-Zoom stage 2: targeted post-SFT of the LLM on the RoI-spliced sequences where zooming hurt.

Usage::

    qzoom-agent train stage2 --config configs/train/stage2_zoomworld_tiny.yaml --out runs/s1

Steps, each resumable:

1. **Mining.** Each train question is answered directly (``mode="never"``) and with the zoom forced
   (``mode="always"``, the stage-1 twig's box); a pluggable judge (`judges`) scores both. Questions the direct
   answer gets right and the RoI answer wrong are the hard cases (``OUT/stage2/mined.jsonl``, appended as it goes).
2. **Post-SFT.** On each hard case, the sequence the model sees after a zoom (prompt, source image, the RoI image
   spliced in behind it with its positions) plus the reference answer; cross-entropy on the answer and
   ``<|im_end|>`` only, so the inserted RoI tokens carry no labels. The decoder layers of the LLM train (or LoRA
   adapters on them, merged at the end); the vision tower, embeddings, the twig and the gate stay frozen.
3. **Evaluation** on ZoomWorld's val split before and after: accuracy of direct, forced-zoom and gated answers.

Writes ``OUT/stage2/model`` (the updated base model, tokenizer, processor) with the unchanged heads in
``OUT/stage2/model/qzoom``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from ..boxes import Box, box_to_cells, crop
from ..checkpoint import save_adapter
from ..model import QZoomModel
from ..zoomworld import DEFAULT_MIX, ZoomWorldSample
from .common import DeviceConfig, OptimConfig, decay_groups, load_section, resume_jsonl
from .common import stage_question as question
from .judges import Judge, make_judge
from .loop import StageLoop

logger = logging.getLogger(__name__)

STAGE_DIR = "stage2"
MINED_FILE, CHECKPOINT_FILE, METRICS_FILE = "mined.jsonl", "checkpoint.pt", "metrics.jsonl"
END = "<|im_end|>"


class LoraSettings(BaseModel):
    """LoRA on the LLM's attention and MLP projections (peft), for backbones too large to tune in full."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"])


class Stage2Config(OptimConfig):
    """Stage-2 settings (``configs/train/stage2_*.yaml``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field("zoomworld-tiny", description="base model directory or bundled name")
    runtime: DeviceConfig = Field(default_factory=DeviceConfig, description="device and dtype")
    qzoom: str = Field(..., description="adapter with the stage-1 twig (e.g. RUN/stage1/qzoom)")
    budget: tuple[int, int] = Field((256, 576), description="(min, max) tokens of the global view and the RoI")
    samples: int = Field(1000, ge=1, description="train questions mined")
    families: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_MIX["hr"]))
    size_range: tuple[int, int] = Field((1024, 2048), description="ZoomWorld canvas side range (px)")
    alphabet: str | None = Field(None, description="tag characters; None: the model's training alphabet")
    judge: str = Field("normalized", description="'exact', 'normalized' or 'llm:DIR' (a local chat model)")
    lora: LoraSettings | None = Field(None, description="train LoRA adapters instead of the full layers")
    max_new_tokens: int = Field(8, ge=1)
    epochs: int = Field(3, ge=1, description="passes over the hard cases")
    eval_items: int = Field(100, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    threads: int = Field(2, ge=1)
    steps: int = Field(0, ge=0, description="optimiser steps; 0: epochs * hard cases / batch_size")
    lr: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(10, ge=0)
    batch_size: int = Field(8, ge=1)


def load_stage2_config(path: str | Path) -> Stage2Config:
    """Read the ``stage2:`` section of a YAML file; raises ValueError naming the file on bad content."""
    return load_section(path, "stage2", Stage2Config, "configs/train/stage2_zoomworld_tiny.yaml")


def mine(qz: QZoomModel, cfg: Stage2Config, alphabet: str, judge: Judge, path: Path) -> list[dict]:
    """Direct and forced-zoom answers of ``cfg.samples`` train questions, judged; appended to ``path``."""
    rows = resume_jsonl(path)
    with open(path, "a") as fh, tqdm(total=cfg.samples, initial=len(rows), desc="stage 2: mining",
                                     dynamic_ncols=True, mininterval=2.0) as bar:
        for i in range(len(rows), cfg.samples):
            s = question(cfg, alphabet, "train", i)
            direct = qz.answer(s.image, s.question, mode="never", budget=cfg.budget, max_new_tokens=cfg.max_new_tokens)
            zoomed = qz.answer(s.image, s.question, mode="always", budget=cfg.budget,
                               max_new_tokens=cfg.max_new_tokens)
            row = {"index": i, "direct": direct.text, "roi": zoomed.text,
                   "box": zoomed.bbox.to_json() if zoomed.bbox else None,
                   "cells": list(zoomed.cells[0]) if zoomed.cells else None,  # they place the RoI positions
                   "direct_right": judge(s.question, direct.text, s.answer, s.options),
                   "roi_right": judge(s.question, zoomed.text, s.answer, s.options)}
            row["hard"] = row["direct_right"] and not row["roi_right"] and row["box"] is not None
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            rows.append(row)
            bar.update(1)
    return rows


def roi_answer_loss(qz: QZoomModel, s: ZoomWorldSample, box: list[int], answer: str,
                    budget: tuple[int, int], reuse_src_pos: bool, cells: list[int] | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``answer`` + ``<|im_end|>`` after the RoI-spliced prompt, through every LLM layer.

    The vision tower and the splice run without gradients; the decoder layers build the graph. ``cells`` are the
    token cells the box came from, as inference places the RoI positions with them (default: the cells the box
    overlaps, for mining caches that did not record them).
    """
    a, runner = qz.adapter, qz.runner
    with torch.no_grad():
        src = a.prepare_image(s.image, min_tokens=budget[0], max_tokens=budget[1])
        prompt = a.build_prompt(src, s.question, system=None)
        positions = a.positions(prompt.input_ids, [src])
        region = Box(*box)
        roi = a.prepare_roi(crop(s.image, region), min_tokens=budget[0], max_tokens=budget[1])
        where = tuple(cells) if cells is not None else box_to_cells(region, src.grid, src.resized_size,
                                                                      src.source_size, src.canvas)
        splice = a.splice_roi(prompt, positions, [roi], [where], reuse_src_pos)
        visual = a.encode_image([src, roi])
        target = torch.tensor(a.tokenizer(answer + END, add_special_tokens=False)["input_ids"], device=a.device)
        ids = torch.cat([splice.input_ids, target[None]], 1)
        step = torch.arange(target.numel(), device=a.device)
        pos = torch.cat([splice.positions, a.next_position(splice.positions) + step.to(splice.positions.dtype)], -1)
        hidden = a.embed(ids, visual)
        rotary = a.rotary(hidden, pos)
        mask = runner.causal_mask(hidden, None)
    hidden = runner.run(0, a.num_layers, hidden, rotary, mask, None, a.image_mask(ids), visual)
    n = target.numel()
    logits = a.lm_head(a.norm(hidden[:, -n - 1 : -1]))[0]  # the positions that predict the answer tokens
    return F.cross_entropy(logits.float(), target)


@torch.inference_mode()
def evaluate_answers(qz: QZoomModel, cfg: Stage2Config, alphabet: str, judge: Judge, n: int) -> dict:
    """Accuracy of direct, forced-zoom and gated answers on ``n`` val questions (fine and coarse)."""
    hits = {"never": 0, "always": 0, "auto": 0}
    for k in range(n):
        s = question(cfg, alphabet, "val", k)
        for mode in hits:
            ans = qz.answer(s.image, s.question, mode=mode, budget=cfg.budget, max_new_tokens=cfg.max_new_tokens)
            hits[mode] += judge(s.question, ans.text, s.answer, s.options)
    return {f"acc_{mode}": v / n for mode, v in hits.items()} | {"n": n}


def _trainable(qz: QZoomModel, cfg: Stage2Config) -> list[torch.nn.Parameter]:
    """Freeze everything, then open the LLM decoder layers (or LoRA adapters injected into them)."""
    qz.adapter.model.requires_grad_(False)
    qz.heads.requires_grad_(False)
    if cfg.lora is None:
        qz.adapter.layers.requires_grad_(True)
        return list(qz.adapter.layers.parameters())
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise RuntimeError("stage 2 with lora needs peft: pip install 'qzoom-agent[lora]'") from None

    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules)
    inject_adapter_in_model(lora, qz.adapter.layers)
    return [p for name, p in qz.adapter.layers.named_parameters() if "lora_" in name]


def _merge_lora(module: torch.nn.Module) -> None:
    """Fold LoRA weights into the base linears and drop the adapter modules (a plain HF model remains)."""
    from peft.tuners.lora import LoraLayer

    for name, child in list(module.named_modules()):
        if isinstance(child, LoraLayer):
            child.merge()
            parent = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
            setattr(parent, name.rpartition(".")[2], child.get_base_layer())


def sft_loop(qz: QZoomModel, cfg: Stage2Config, total: int) -> StageLoop:
    """Open the LLM decoder layers (or LoRA in them) and build their optimiser over a ``total``-step schedule."""
    params = _trainable(qz, cfg)
    optimizer = torch.optim.AdamW(decay_groups(params, cfg.weight_decay, cfg.lr), lr=cfg.lr, betas=cfg.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cfg.model_copy(update={"steps": total}).lr_factor)
    trained = {n: p for n, p in qz.adapter.layers.named_parameters() if p.requires_grad}

    def load_weights(state: dict) -> None:
        with torch.no_grad():
            for n, p in trained.items():
                p.copy_(state["params"][n])

    return StageLoop(params, optimizer, scheduler, lambda: {"params": {n: p.detach() for n, p in trained.items()}},
                     load_weights, cfg.grad_clip)


def save_model(qz: QZoomModel, cfg: Stage2Config, out: Path) -> None:
    """The tuned model as an HF folder at ``out``, with its Q-Zoom heads in ``out/qzoom`` and the base's ZoomWorld
    alphabet when it has one."""
    from ..loading import resolve_model_path

    qz.adapter.model.save_pretrained(out)
    qz.adapter.tokenizer.save_pretrained(out)
    qz.adapter.image_processor.save_pretrained(out)
    meta = resolve_model_path(cfg.model) / "zoomworld.json"
    if meta.is_file():
        shutil.copy(meta, out / meta.name)
    save_adapter(qz.heads, qz.config, out / "qzoom", base_model=str(out))


def run_stage2(cfg: Stage2Config, out_dir: str | Path, *, max_steps: int | None = None) -> dict:
    """Run (or resume) stage 2 in ``out_dir/stage2``; returns the final metrics row."""
    from ..loading import resolve_model_path, trained_alphabet

    torch.set_num_threads(cfg.threads)
    device, dtype = cfg.runtime.resolve()
    stage = Path(out_dir) / STAGE_DIR
    stage.mkdir(parents=True, exist_ok=True)
    alphabet = cfg.alphabet or trained_alphabet(resolve_model_path(cfg.model)) or "0123456789"
    judge = make_judge(cfg.judge)
    qz = QZoomModel.from_pretrained(cfg.model, qzoom=cfg.qzoom, device=device, dtype=dtype)
    metrics_path = stage / METRICS_FILE
    if not metrics_path.exists():
        before = {"when": "before", "step": 0, **evaluate_answers(qz, cfg, alphabet, judge, cfg.eval_items)}
        metrics_path.write_text(json.dumps(before) + "\n")
    rows = mine(qz, cfg, alphabet, judge, stage / MINED_FILE)
    hard = [r for r in rows if r["hard"]]
    stats = {"mined": len(rows), "hard": len(hard), "direct_right": sum(r["direct_right"] for r in rows),
             "roi_right": sum(r["roi_right"] for r in rows)}
    logger.info("stage 2 mining: %s", stats)
    if not hard:
        raise RuntimeError(f"no hard case (direct right, RoI wrong) among {len(rows)} questions; nothing to tune")

    total = cfg.steps or max(1, cfg.epochs * len(hard) // cfg.batch_size)
    loop, ckpt = sft_loop(qz, cfg, total), stage / CHECKPOINT_FILE
    if ckpt.exists():
        loop.restore(ckpt)

    def batch_at(k: int) -> list[tuple[dict, ZoomWorldSample]]:
        rows = [hard[(k * cfg.batch_size + j) % len(hard)] for j in range(cfg.batch_size)]
        return [(r, question(cfg, alphabet, "train", r["index"])) for r in rows]

    def step_loss(batch: list[tuple[dict, ZoomWorldSample]]) -> dict[str, float]:
        loss_sum = 0.0
        for r, s in batch:
            loss = roi_answer_loss(qz, s, r["box"], s.answer, cfg.budget, qz.reuse_src_pos, r.get("cells"))
            (loss / cfg.batch_size).backward()
            loss_sum += float(loss.detach()) / cfg.batch_size
        return {"ce": loss_sum}

    stop = min(total, max_steps if max_steps is not None else total)
    qz.adapter.model.train()
    running = loop.run(stop, batch_at, step_loss, checkpoint=ckpt, checkpoint_every=cfg.checkpoint_every,
                       desc="stage 2: post-SFT")
    qz.adapter.model.eval()
    if cfg.lora is not None:
        _merge_lora(qz.adapter.layers)
    qz.adapter.model.requires_grad_(False)
    after = {"when": "after", "step": loop.step, "train_seconds": round(loop.seconds, 1), "ce": running, **stats,
             **evaluate_answers(qz, cfg, alphabet, judge, cfg.eval_items)}
    with open(metrics_path, "a") as f:
        f.write(json.dumps(after) + "\n")
    save_model(qz, cfg, stage / "model")
    return after
