"""Q-Zoom stage 1: train the twig (SD-RPN) on the model's own attention, everything else frozen.

Usage::

    qzoom-agent train stage1 --config configs/train/stage1_zoomworld_tiny.yaml --out runs/s1

Steps, each resumable:

1. **Heads.** With ``heads: auto``, rank every (layer, head) by the share of its response-to-image attention that
   falls on ZoomWorld's ground-truth boxes (``OUT/stage1/head_ranking.json``) and average the best ``top_heads``.
   For a new backbone this ranking is the tool to pick the pairs; a dataset with boxes is all it needs.
2. **Labels.** Pseudo-labels for ``samples`` training questions (`stage1_labels`), cached in
   ``OUT/stage1/labels.pt`` (written atomically every ``save_every`` samples, so an interrupted run continues), with
   ``label_overlays`` PNGs to inspect. ``label_source: box`` uses the ground-truth boxes instead (the ablation).
3. **Training.** BCE-with-logits on the valid tokens; only ``heads.twig_layers`` has gradients (the gate and the
   base model are untouched). Checkpoint ``OUT/stage1/checkpoint.pt``; the adapter goes to ``OUT/stage1/qzoom``.
4. **Evaluation** on ZoomWorld's val split, before and after training (`stage1_eval`): RoI coverage of the target
   box (share of fine questions whose box covers >= 70% of it with at most 16x its area) and mean IoU.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, model_validator
from tqdm import tqdm

from ..bench.metrics import ROI_COVERAGE
from ..bench.zoomworld import ZoomWorldSample
from ..bench.zoomworld_questions import FINE_FAMILIES
from ..checkpoint import save_adapter
from ..config import QZoomConfig, RoiMode
from ..model import QZoomModel
from .common import DeviceConfig, OptimConfig, atomic_torch_save, decay_groups, load_section
from .common import stage_question as question
from .stage1_eval import evaluate_roi
from .stage1_labels import (
    IGNORE,
    LabelRule,
    box_labels,
    head_agreement,
    pseudo_labels,
    response_attention,
    select_heads,
)
from .twig_aux import TwigAuxProbe, TwigAuxTargets, aux_targets

logger = logging.getLogger(__name__)

STAGE_DIR = "stage1"
LABELS_FILE, CHECKPOINT_FILE, METRICS_FILE, RANKING_FILE = "labels.pt", "checkpoint.pt", "metrics.jsonl", \
    "head_ranking.json"
RANK_OFFSET = 5 * 10**8  # train-split indices of the head-ranking questions: apart from the label questions
_AUX_NEEDS_T2 = "aux_weight needs twig_T >= 2: with one twig layer the probes would read frozen states"


class Stage1Config(OptimConfig):
    """Stage-1 settings (``configs/train/stage1_*.yaml``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field("zoomworld-tiny", description="base model directory or bundled name")
    runtime: DeviceConfig = Field(default_factory=DeviceConfig, description="device and dtype")
    seed: int = Field(0, ge=0, description="torch seed of the head initialisation (the gate's output layer)")
    twig_K: int | None = Field(None, ge=1, description="branch layer; None: mid-depth (QZoomConfig.for_backbone)")
    twig_T: int | None = Field(None, ge=1, description="head layers; None: up to 3")
    budget: tuple[int, int] = Field((256, 576), description="(min, max) visual tokens of the global view")
    samples: int = Field(1500, ge=1, description="training questions to label (ZoomWorld train split)")
    families: dict[str, float] = Field(default_factory=lambda: {f: 1.0 for f in FINE_FAMILIES},
                                       description="ZoomWorld question families of the labelled questions")
    size_range: tuple[int, int] = Field((1024, 2048), description="ZoomWorld canvas side range (px)")
    alphabet: str | None = Field(None, description="tag characters; None: the model's training alphabet")
    label_source: Literal["attention", "box"] = Field("attention", description="self-distilled or ground truth")
    heads: dict[int, list[int]] | Literal["auto"] = Field("auto", description="{layer: [heads]} or auto-ranked")
    top_heads: int = Field(3, ge=1, description="pairs averaged when heads is auto")
    sink_heads: dict[int, list[int]] | None = Field(None, description="{layer: [heads]} whose attention marks sinks")
    rank_samples: int = Field(64, ge=1, description="questions used to rank the heads")
    rule: LabelRule = Field(default_factory=LabelRule, description="pseudo-label coefficients")
    max_new_tokens: int = Field(8, ge=1, description="decoding budget of the answers the labels come from")
    label_overlays: int = Field(8, ge=0, description="PNG overlays of the first labels")
    epochs: float = Field(2.0, gt=0, description="passes over the labelled questions (sets steps when steps=0)")
    eval_items: int = Field(100, ge=1, description="val questions of the before/after evaluation")
    save_every: int = Field(100, ge=1, description="labels cached every this many samples")
    checkpoint_every: int = Field(200, ge=1, description="steps between checkpoints")
    threads: int = Field(2, ge=1, description="torch CPU threads")
    pos_weight: float = Field(1.0, gt=0, description="BCE weight of foreground tokens (1: the paper's plain BCE); "
                              "raise it when a target covers a few tokens of hundreds")
    rank_weight: float = Field(0.0, ge=0, description="weight of an added listwise loss (softmax cross-entropy over "
                               "the view's tokens, foreground as the target); 0: BCE only, as in the paper")
    aux_weight: float = Field(0.0, ge=0, description="weight of the twig colour probes (train/twig_aux.py: tag "
                              "presence and colour on its visual tokens, the asked colour on its query); ZoomWorld "
                              "labels, needs twig_T >= 2; 0: off, as in the paper")
    roi_mode: RoiMode | None = Field(
        None, description="box rule of the trained adapter and of the evaluation (QZoomConfig.roi_mode); None: by "
        "family (enclosing for Qwen, as in the paper)")
    roi_peak_ratio: float = Field(0.3, gt=0, le=1, description="peak mode's neighbourhood ratio")
    roi_min_side: float = Field(1.0, ge=0, le=64, description="minimum box side in global-view tokens "
                                "(QZoomConfig.roi_min_side_tokens); 1: the paper's 28 px on Qwen2.5")
    roi_tokens: tuple[int, int] | None = Field(None, description="(min, max) visual tokens of the RoI crop in the "
                                               "adapter (QZoomConfig.roi_min/max_tokens); None: the global budget")
    cache_features: bool = Field(True, description="keep each question's frozen layer-K inputs in memory after "
                                 "its first epoch (about 1.5 MB each at 576 tokens): later epochs skip the scene "
                                 "rendering and the frozen prefill")
    steps: int = Field(0, ge=0, description="optimiser steps; 0: epochs * samples / batch_size")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(20, ge=0)
    batch_size: int = Field(8, ge=1, description="questions per optimiser step")

    @model_validator(mode="after")
    def _check(self) -> Stage1Config:
        if self.budget[0] > self.budget[1] or self.budget[0] < 1:
            raise ValueError(f"budget must be (min, max) with 1 <= min <= max, got {self.budget}")
        if self.roi_tokens is not None and not 1 <= self.roi_tokens[0] <= self.roi_tokens[1]:
            raise ValueError(f"roi_tokens must be (min, max) with 1 <= min <= max, got {self.roi_tokens}")
        if self.aux_weight > 0 and self.twig_T == 1:
            raise ValueError(_AUX_NEEDS_T2)
        if set(self.families) - set(FINE_FAMILIES) - {"color", "shape"} or sum(self.families.values()) <= 0:
            raise ValueError(f"families must weight ZoomWorld families with a positive sum, got {self.families}")
        return self

    @property
    def total_steps(self) -> int:
        return self.steps or max(1, round(self.epochs * self.samples / self.batch_size))

    def lr_factor(self, step: int) -> float:  # the schedule spans total_steps, not the raw ``steps`` field
        return OptimConfig.lr_factor(self.model_copy(update={"steps": self.total_steps}), step)


def load_stage1_config(path: str | Path) -> Stage1Config:
    """Read the ``stage1:`` section of a YAML file; raises ValueError naming the file on bad content."""
    return load_section(path, "stage1", Stage1Config)


# ---- step 1: heads ---------------------------------------------------------------------------------------------
def rank_heads(qz: QZoomModel, cfg: Stage1Config, alphabet: str) -> list[dict]:
    """Every (layer, head) with its mean share of response-to-image attention on the target box, best first."""
    total = None
    for k in tqdm(range(cfg.rank_samples), desc="stage 1: ranking heads", dynamic_ncols=True, mininterval=2.0):
        s = question(cfg, alphabet, "train", RANK_OFFSET + k)
        att = response_attention(qz, s.image, s.question, cfg.budget, cfg.max_new_tokens)
        share = head_agreement(att.maps, tuple(s.target_box), att.image)
        total = share if total is None else total + share
    mean = total / cfg.rank_samples
    rows = [{"layer": layer, "head": head, "share_on_target": round(float(mean[layer, head]), 4)}
            for layer in range(mean.shape[0]) for head in range(mean.shape[1])]
    return sorted(rows, key=lambda r: -r["share_on_target"])


def resolve_heads(qz: QZoomModel, cfg: Stage1Config, alphabet: str, stage: Path) -> dict[int, list[int]]:
    """The (layer, heads) selection: the config's, or the top ranked (cached in head_ranking.json)."""
    if cfg.heads != "auto":
        return {int(k): list(v) for k, v in cfg.heads.items()}
    path = stage / RANKING_FILE
    if path.exists():
        ranking = json.loads(path.read_text())["ranking"]
    else:
        ranking = rank_heads(qz, cfg, alphabet)
        path.write_text(json.dumps({"samples": cfg.rank_samples, "ranking": ranking}, indent=1) + "\n")
    heads: dict[int, list[int]] = {}
    for row in ranking[: cfg.top_heads]:
        heads.setdefault(row["layer"], []).append(row["head"])
    return heads


# ---- step 2: labels --------------------------------------------------------------------------------------------
def make_labels(qz: QZoomModel, cfg: Stage1Config, alphabet: str, heads: dict[int, list[int]] | None,
                path: Path) -> list[dict]:
    """Label ``cfg.samples`` training questions, continuing a partial cache at ``path``.

    Returns:
        One record per question: ``index``, ``answer`` (the model's), ``labels`` ((gh, gw) int8), ``grid``,
        ``skipped`` (all ignored) and ``target_hit`` (the foreground box covers >= 70% of the target's tokens).
    """
    records: list[dict] = torch.load(path, weights_only=False)["records"] if path.exists() else []
    todo = range(len(records), cfg.samples)
    with ThreadPoolExecutor(max_workers=1) as pool, tqdm(total=cfg.samples, initial=len(records),
                                                          desc="stage 1: labels", dynamic_ncols=True,
                                                          mininterval=2.0) as bar:
        pending = {i: pool.submit(question, cfg, alphabet, "train", i) for i in todo[:2]}
        for i in todo:
            s = pending.pop(i).result()
            if i + 2 < cfg.samples:
                pending[i + 2] = pool.submit(question, cfg, alphabet, "train", i + 2)
            if cfg.label_source == "box":
                img = qz.adapter.prepare_image(s.image, min_tokens=cfg.budget[0], max_tokens=cfg.budget[1])
                labels, answer = box_labels(tuple(s.target_box), img), ""
            else:
                att = response_attention(qz, s.image, s.question, cfg.budget, cfg.max_new_tokens)
                img, answer = att.image, att.answer
                sink = (select_heads(att.maps, cfg.sink_heads) >= cfg.rule.sink_threshold) if cfg.sink_heads else None
                labels = pseudo_labels(select_heads(att.maps, heads), cfg.rule, sink)
            target = box_labels(tuple(s.target_box), img).bool()
            fg = labels == 1
            hit = bool(fg.any()) and float((fg & target).sum()) >= ROI_COVERAGE * float(target.sum())
            records.append({"index": i, "answer": answer, "labels": labels.to(torch.int8), "grid": img.grid,
                            "skipped": bool((labels == IGNORE).all()), "target_hit": hit})
            bar.update(1)
            if len(records) % cfg.save_every == 0 or len(records) == cfg.samples:
                atomic_torch_save({"heads": heads, "source": cfg.label_source, "records": records}, path)
    return records


def draw_label_overlays(cfg: Stage1Config, alphabet: str, records: list[dict], out_dir: Path) -> list[Path]:
    """PNGs of the first labels over their images: foreground red, background blue, ignored clear."""
    import numpy as np
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for rec in records[: cfg.label_overlays]:
        s = question(cfg, alphabet, "train", rec["index"])
        labels = rec["labels"].numpy()
        colour = np.zeros((*labels.shape, 4), dtype=np.uint8)
        colour[labels == 1] = (255, 0, 0, 140)
        colour[labels == 0] = (0, 80, 255, 70)
        layer = Image.fromarray(colour, "RGBA").resize(s.image.size, Image.NEAREST)
        view = Image.alpha_composite(s.image.convert("RGBA"), layer).convert("RGB")
        view.thumbnail((768, 768))
        path = out_dir / f"label_{rec['index']:05d}.png"
        view.save(path)
        paths.append(path)
    return paths


# ---- steps 3-4: training and evaluation ------------------------------------------------------------------------
@dataclass
class TwigInputs:
    """What the twig reads from the frozen first pass: the layer-K input and its positions and mask."""

    hidden_k: torch.Tensor  # (1, L, D)
    rotary: tuple[torch.Tensor, torch.Tensor]
    mask: torch.Tensor | None
    image_start: int
    image_end: int
    grid: tuple[int, int]


@torch.no_grad()
def twig_inputs(qz: QZoomModel, s: ZoomWorldSample, budget: tuple[int, int]) -> TwigInputs:
    """The frozen prefill to layer K of ``s`` at ``budget`` (no gradients: only the twig trains)."""
    fp = qz._first_pass(s.image, s.question, budget)
    return TwigInputs(fp.hidden_k, fp.rotary, fp.mask, fp.prompt.image_start, fp.prompt.image_end,
                      tuple(fp.prompt.image.grid))


def twig_loss(qz: QZoomModel, x: TwigInputs, labels: torch.Tensor, pos_weight: float = 1.0,
              rank_weight: float = 0.0, states: torch.Tensor | None = None) -> torch.Tensor:
    """BCE-with-logits of the twig's scores against ``labels`` ((gh, gw), -100 ignored), summed over valid tokens;
    foreground tokens weigh ``pos_weight``. With ``rank_weight`` > 0, add that many times a listwise term, the
    cross-entropy of the softmax over the valid tokens against the foreground spread evenly, scaled by the valid
    token count so it weighs like the summed BCE: it asks the asked tag to outscore the other tags, where a
    token-wise loss is content to score every tag high. ``states``: the twig's ``twig_states`` of ``x`` when the
    caller already has them (the aux probes read them too)."""
    if states is None:
        states = qz.heads.twig_states(x.hidden_k, x.rotary, x.mask)
    logits = qz.heads.roi_scores(qz.adapter, states, x.rotary, x.image_start, x.image_end)
    if x.grid != tuple(labels.shape):
        raise RuntimeError(f"labels of grid {tuple(labels.shape)} for a view of grid {x.grid}")
    flat = labels.flatten().to(logits.device)
    valid = flat != IGNORE
    scores, target = logits[valid].float(), flat[valid].float()
    loss = F.binary_cross_entropy_with_logits(scores, target, reduction="sum",
                                              pos_weight=torch.tensor(pos_weight, device=logits.device))
    if rank_weight > 0 and target.sum() > 0:
        listwise = -(torch.log_softmax(scores, 0) * target).sum() / target.sum()
        loss = loss + rank_weight * listwise * int(valid.sum())
    return loss


def build_model(cfg: Stage1Config) -> QZoomModel:
    """The base model with fresh heads (copies of base layers K..K+T-1)."""
    device, dtype = cfg.runtime.resolve()
    qz = QZoomModel.from_pretrained(cfg.model, qzoom=False, device=device, dtype=dtype)
    a = qz.adapter
    fields = {k: v for k, v in {"twig_K": cfg.twig_K, "twig_T": cfg.twig_T, "roi_mode": cfg.roi_mode}.items()
              if v is not None}
    if cfg.roi_tokens is not None:
        fields["roi_min_tokens"], fields["roi_max_tokens"] = cfg.roi_tokens
    base = QZoomConfig.for_backbone(a.num_layers, a.min_branch_layer)
    qz.config = QZoomConfig.model_validate({**base.model_dump(), "min_tokens": cfg.budget[0],
                                            "max_tokens": cfg.budget[1], "roi_peak_ratio": cfg.roi_peak_ratio,
                                            "roi_min_side_tokens": cfg.roi_min_side, **fields})
    qz.config.check_backbone(a.num_layers, a.min_branch_layer)
    torch.manual_seed(cfg.seed)
    qz.init_heads()
    return qz


def run_stage1(cfg: Stage1Config, out_dir: str | Path, *, max_steps: int | None = None) -> dict:
    """Run (or resume) stage 1 in ``out_dir/stage1``; returns the final metrics row."""
    from ..loading import resolve_model_path, trained_alphabet

    torch.set_num_threads(cfg.threads)
    stage = Path(out_dir) / STAGE_DIR
    stage.mkdir(parents=True, exist_ok=True)
    alphabet = cfg.alphabet or trained_alphabet(resolve_model_path(cfg.model)) or "0123456789"
    qz = build_model(cfg)
    qz.adapter.model.requires_grad_(False)
    metrics_path = stage / METRICS_FILE
    if not metrics_path.exists():
        before = {"when": "before", "step": 0, **evaluate_roi(qz, cfg, alphabet, cfg.eval_items)}
        metrics_path.write_text(json.dumps(before) + "\n")
        logger.info("stage 1 before training: %s", before)
    heads = resolve_heads(qz, cfg, alphabet, stage) if cfg.label_source == "attention" else None
    records = make_labels(qz, cfg, alphabet, heads, stage / LABELS_FILE)
    draw_label_overlays(cfg, alphabet, records, stage / "overlays")
    usable = [r for r in records if not r["skipped"]]
    label_stats = {"labelled": len(records), "usable": len(usable),
                   "target_hit": sum(r["target_hit"] for r in records) / max(1, len(records)), "heads": heads}
    logger.info("stage 1 labels: %s", label_stats)
    if not usable:
        raise RuntimeError("every pseudo-label was skipped (no focused attention); check the heads or the model")

    twig = qz.heads.twig_layers
    qz.heads.requires_grad_(False)
    twig.requires_grad_(True)
    qz.heads.train()
    probe = None
    if cfg.aux_weight > 0:
        if qz.heads.T < 2:
            raise ValueError(_AUX_NEEDS_T2)
        probe = TwigAuxProbe(qz.adapter.hidden_size).to(qz.adapter.device)
    params = [p for p in twig.parameters()] + ([] if probe is None else list(probe.parameters()))
    optimizer = torch.optim.AdamW(decay_groups(params, cfg.weight_decay, cfg.lr), lr=cfg.lr, betas=cfg.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cfg.lr_factor)
    ckpt, step, seconds = stage / CHECKPOINT_FILE, 0, 0.0
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        twig.load_state_dict(state["twig"])
        if (probe is not None) != ("aux" in state):
            raise ValueError(f"{ckpt} was written with aux_weight {'> 0' if 'aux' in state else '0'}; resume with the "
                             "same setting or use another --out")
        if probe is not None:
            probe.load_state_dict(state["aux"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, seconds = state["step"], state["seconds"]
    total = cfg.total_steps
    stop = min(total, max_steps if max_steps is not None else total)

    features: dict[int, TwigInputs] = {}  # question index -> frozen first pass (cache_features)
    aux: dict[int, TwigAuxTargets] = {}  # question index -> probe targets (aux_weight > 0)

    def batch_at(k: int) -> list[tuple[int, ZoomWorldSample | None, torch.Tensor]]:
        recs = [usable[(k * cfg.batch_size + j) % len(usable)] for j in range(cfg.batch_size)]
        return [(r["index"], None if r["index"] in features and (probe is None or r["index"] in aux)
                 else question(cfg, alphabet, "train", r["index"]), r["labels"].long()) for r in recs]

    running = None
    with ThreadPoolExecutor(max_workers=1) as pool, tqdm(total=stop, initial=step, desc="stage 1: twig",
                                                          dynamic_ncols=True, mininterval=2.0) as bar:
        pending = pool.submit(batch_at, step) if step < stop else None
        while pending is not None:
            tick = time.perf_counter()
            batch = pending.result()
            pending = pool.submit(batch_at, step + 1) if step + 1 < stop else None
            optimizer.zero_grad(set_to_none=True)
            valid = sum(int((lab != IGNORE).sum()) for _, _, lab in batch)
            loss_sum = aux_sum = 0.0
            for index, s, lab in batch:
                x = features.get(index) or twig_inputs(qz, s, cfg.budget)
                if cfg.cache_features:
                    features[index] = x
                states = qz.heads.twig_states(x.hidden_k, x.rotary, x.mask)
                # mean over the batch's valid tokens
                loss = twig_loss(qz, x, lab, cfg.pos_weight, cfg.rank_weight, states) / max(1, valid)
                loss_sum += float(loss.detach())
                if probe is not None:
                    if index not in aux:
                        aux[index] = aux_targets(s, x.grid)
                    extra = probe.loss(states, x.image_start, x.image_end, aux[index]) / len(batch)
                    aux_sum += float(extra.detach())
                    loss = loss + cfg.aux_weight * extra
                loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            seconds += time.perf_counter() - tick
            running = loss_sum if running is None else 0.95 * running + 0.05 * loss_sum
            bar.update(1)
            bar.set_postfix(bce=f"{running:.3f}", **({"aux": f"{aux_sum:.3f}"} if probe is not None else {}))
            if step % cfg.checkpoint_every == 0 or step == stop:
                atomic_torch_save({"twig": twig.state_dict(), "optimizer": optimizer.state_dict(),
                                   "scheduler": scheduler.state_dict(), "step": step, "seconds": seconds,
                                   **({"aux": probe.state_dict()} if probe is not None else {})}, ckpt)
    qz.heads.eval()
    after = {"when": "after", "step": step, "train_seconds": round(seconds, 1), "bce": running, **label_stats,
             **evaluate_roi(qz, cfg, alphabet, cfg.eval_items)}
    with open(metrics_path, "a") as f:
        f.write(json.dumps(after) + "\n")
    save_adapter(qz.heads, qz.config, stage / "qzoom", base_model=str(cfg.model))
    return after
