"""Q-Zoom stage 3: train the consistency-aware gate, everything else frozen.

Usage::

    qzoom-agent train stage3 --config configs/train/stage3_zoomworld_tiny.yaml --out runs/s3

Steps, each resumable:

1. **Answers.** The plain model answers ``samples`` ZoomWorld train questions at every budget of ``budgets``
   (ascending), cached in ``OUT/stage3/answers.jsonl`` (one line per question, appended as it goes). With
   ``zoom_budgets``, the ladder goes on with Q-Zoom's forced-zoom answers at those global budgets: for a base model
   whose accuracy does not rise with the budget, the RoI zoom is the higher-resolution look the gate must judge.
2. **Labels** by the consistency rule (`stage3_labels`): unstable, hallucinated and non-monotonic questions are
   dropped; transitions and as many easy questions are kept. Counts go to ``OUT/stage3/label_stats.json``.
3. **Training.** BCE-with-logits on ``heads.gate_logit`` of the question's view at the picked budget (label 1:
   more resolution would help). Only ``high_res_layers`` and ``high_res_head`` have gradients.
4. **Evaluation** on ZoomWorld's val split at ``eval_tokens``: the gate's AUC for "zoom helps" (the direct answer
   is wrong and the zoomed one right, against questions the direct answer gets right), accuracy at the threshold,
   and the share of coarse questions skipped and of fine questions zoomed.

The adapter (the previous stage's twig plus the trained gate) is written to ``OUT/stage3/qzoom``.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, model_validator
from tqdm import tqdm

from ..checkpoint import save_adapter
from ..config import budget_for
from ..model import QZoomModel
from ..scoring import auc, is_correct
from ..zoomworld import DEFAULT_MIX, ZoomWorldSample
from .common import DeviceConfig, OptimConfig, decay_groups, load_section, resume_jsonl
from .common import stage_question as question
from .loop import StageLoop
from .stage3_labels import GateSample, agree, balance, classify, pick

logger = logging.getLogger(__name__)

STAGE_DIR = "stage3"
ANSWERS_FILE, STATS_FILE, CHECKPOINT_FILE, METRICS_FILE = "answers.jsonl", "label_stats.json", "checkpoint.pt", \
    "metrics.jsonl"


class Stage3Config(OptimConfig):
    """Stage-3 settings (``configs/train/stage3_*.yaml``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field("zoomworld-tiny", description="base model directory or bundled name")
    runtime: DeviceConfig = Field(default_factory=DeviceConfig, description="device and dtype")
    qzoom: str = Field(..., description="adapter with the stage-1 twig (e.g. RUN/stage1/qzoom)")
    budgets: list[int] = Field(default_factory=lambda: [64, 144, 256, 576, 1024],
                               description="ascending visual-token budgets the questions are answered at")
    zoom_budgets: list[int] = Field(default_factory=list,
                                    description="ascending global-view budgets of forced-zoom answers that top the "
                                    "ladder after the plain ones; empty: the paper's plain ladder")
    samples: int = Field(1000, ge=1, description="train questions answered at every budget")
    families: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_MIX["hr"]),
                                       description="ZoomWorld question families (fine and coarse)")
    size_range: tuple[int, int] = Field((1024, 2048), description="ZoomWorld canvas side range (px)")
    alphabet: str | None = Field(None, description="tag characters; None: the model's training alphabet")
    positive_rate: float = Field(0.9, ge=0.0, le=1.0, description="transitions labelled 1 with this probability")
    max_new_tokens: int = Field(8, ge=1)
    epochs: int = Field(4, ge=1, description="passes over the balanced questions")
    eval_tokens: int = Field(576, ge=1, description="global view of the evaluation")
    eval_items: int = Field(100, ge=1, description="val questions of the evaluation")
    seed: int = Field(0, ge=0)
    checkpoint_every: int = Field(100, ge=1)
    threads: int = Field(2, ge=1)
    steps: int = Field(0, ge=0, description="optimiser steps; 0: epochs * kept questions / batch_size")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    batch_size: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _check(self) -> Stage3Config:
        for name, values in (("budgets", self.budgets), ("zoom_budgets", self.zoom_budgets)):
            if values != sorted(set(values)) or (values and values[0] < 1):
                raise ValueError(f"{name} must be distinct ascending positive values, got {values}")
        if len(self.budgets) + len(self.zoom_budgets) < 3 or not self.budgets:
            raise ValueError("the ladder needs >= 3 rungs (budgets plus zoom_budgets), with one plain budget at "
                             f"least; got budgets {self.budgets} and zoom_budgets {self.zoom_budgets}")
        if len(self.zoom_budgets) == 1:
            raise ValueError("zoom_budgets needs two values or none: the consistency rule compares the top two rungs")
        return self

    @property
    def rungs(self) -> list[tuple[int, str]]:
        """The ladder as ``(budget, mode)`` pairs: plain answers first, then forced-zoom ones.

        Examples:
            >>> Stage3Config(qzoom="q", budgets=[256, 576], zoom_budgets=[256, 576]).rungs
            [(256, 'never'), (576, 'never'), (256, 'always'), (576, 'always')]
        """
        return [(b, "never") for b in self.budgets] + [(b, "always") for b in self.zoom_budgets]


def load_stage3_config(path: str | Path) -> Stage3Config:
    """Read the ``stage3:`` section of a YAML file; raises ValueError naming the file on bad content."""
    return load_section(path, "stage3", Stage3Config, "configs/train/stage3_zoomworld_tiny.yaml")


def answer_at_budgets(qz: QZoomModel, cfg: Stage3Config, alphabet: str, path: Path) -> list[dict]:
    """Answers of ``cfg.samples`` train questions at every rung of the ladder, appended to ``path`` (resumes after
    the last complete line)."""
    rows = resume_jsonl(path)
    if rows and len(rows[0]["answers"]) != len(cfg.rungs):
        raise ValueError(f"{path} holds answers at {len(rows[0]['answers'])} rungs and the config has "
                         f"{len(cfg.rungs)}; use another --out or restore the config's budgets")
    with open(path, "a") as fh, tqdm(total=cfg.samples, initial=len(rows), desc="stage 3: answers",
                                     dynamic_ncols=True, mininterval=2.0) as bar:
        for i in range(len(rows), cfg.samples):
            s = question(cfg, alphabet, "train", i)
            answers = [qz.answer(s.image, s.question, mode=mode, budget=budget_for(b),
                                 max_new_tokens=cfg.max_new_tokens).text for b, mode in cfg.rungs]
            row = {"index": i, "kind": s.kind, "answers": answers,
                   "correct": [is_correct(a, s.answer, s.options) for a in answers]}
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            rows.append(row)
            bar.update(1)
    return rows


def categorise(rows: list[dict]) -> list[GateSample]:
    """A `GateSample` per answered question (its category by the consistency rule)."""
    return [GateSample(r["index"], classify(r["correct"], agree(r["answers"][-1], r["answers"][-2])),
                       tuple(r["correct"])) for r in rows]


def gate_loss(qz: QZoomModel, s: ZoomWorldSample, budget: tuple[int, int], label: int) -> torch.Tensor:
    """BCE-with-logits of the gate on the view at ``budget``; the prefill to layer K runs without gradients."""
    with torch.no_grad():
        fp = qz.prefill(s.image, s.question, budget=budget)
    logit = qz.heads.gate_logit(fp.hidden_k, fp.rotary, fp.mask)
    return F.binary_cross_entropy_with_logits(logit.float(), torch.full_like(logit.float(), float(label)))


@torch.inference_mode()
def evaluate_gate(qz: QZoomModel, cfg: Stage3Config, alphabet: str, n: int) -> dict:
    """The gate on ``n`` val questions at ``cfg.eval_tokens``: AUC for "zoom helps", accuracy at the threshold,
    coarse questions skipped and fine questions zoomed."""
    budget = budget_for(cfg.eval_tokens)
    scores, labels, coarse_skip, fine_zoom = [], [], [], []
    for k in range(n):
        s = question(cfg, alphabet, "val", k)
        direct = qz.answer(s.image, s.question, mode="never", budget=budget, max_new_tokens=cfg.max_new_tokens)
        # the forced-zoom answer runs the gate on the same first pass; its score is the gate's decision
        zoomed = qz.answer(s.image, s.question, mode="always", budget=budget, max_new_tokens=cfg.max_new_tokens)
        right_direct = is_correct(direct.text, s.answer, s.options)
        right_zoom = is_correct(zoomed.text, s.answer, s.options)
        fires = zoomed.gate_score >= qz.config.gate_threshold
        (coarse_skip if s.kind == "coarse" else fine_zoom).append(not fires if s.kind == "coarse" else fires)
        if right_direct or right_zoom:  # both wrong: neither label is meaningful
            scores.append(zoomed.gate_score)
            labels.append(int(right_zoom and not right_direct))
    area = auc(scores, labels)
    threshold_acc = sum((sc >= qz.config.gate_threshold) == bool(y) for sc, y in zip(scores, labels, strict=True))
    return {"gate_auc": area, "gate_acc": threshold_acc / max(1, len(scores)), "gate_scored": len(scores),
            "zoom_helps": sum(labels), "coarse_skipped": sum(coarse_skip) / max(1, len(coarse_skip)),
            "fine_zoomed": sum(fine_zoom) / max(1, len(fine_zoom)), "n": n}


def gate_labels(qz: QZoomModel, cfg: Stage3Config, alphabet: str, stage: Path) -> tuple[list[GateSample], dict]:
    """The ladder's answers (cached in ``stage``), categorised and balanced: the kept samples and the counts of
    each category (also written to ``label_stats.json``).

    Raises:
        RuntimeError: no question improves with resolution, so the gate has nothing to learn.
    """
    samples = categorise(answer_at_budgets(qz, cfg, alphabet, stage / ANSWERS_FILE))
    kept = balance(samples, cfg.seed)
    stats = {c: sum(s.category == c for s in samples) for c in
             ("easy", "transition", "non_monotonic", "unstable", "hallucinated")}
    stats["kept"] = len(kept)
    (stage / STATS_FILE).write_text(json.dumps(stats, indent=1) + "\n")
    logger.info("stage 3 labels: %s", stats)
    if not any(s.category == "transition" for s in kept):
        raise RuntimeError(f"no question improves with resolution ({stats}); stage 3 has nothing to learn")
    return kept, stats


def batch_items(cfg: Stage3Config, kept: list[GateSample], k: int) -> list[tuple[int, int, int]]:
    """(question index, rung index, label) of step ``k``: a seeded pass order and pick per epoch."""
    out = []
    for j in range(cfg.batch_size):
        epoch, pos = divmod(k * cfg.batch_size + j, len(kept))
        order = list(range(len(kept)))
        random.Random(f"{cfg.seed}/{epoch}").shuffle(order)
        sample = kept[order[pos]]
        choice = pick(sample, random.Random(f"{cfg.seed}/{epoch}/{sample.index}"), cfg.positive_rate)
        if choice is not None:
            out.append((sample.index, *choice))
    return out


def gate_loop(qz: QZoomModel, cfg: Stage3Config, total: int) -> StageLoop:
    """Unfreeze the gate alone (its layers and head) and build its optimiser over a ``total``-step schedule."""
    layers, head = qz.heads.high_res_layers, qz.heads.high_res_head
    qz.heads.requires_grad_(False)
    params = [*layers.parameters(), *head.parameters()]
    for p in params:
        p.requires_grad_(True)
    qz.heads.train()
    optimizer = torch.optim.AdamW(decay_groups(params, cfg.weight_decay, cfg.lr), lr=cfg.lr, betas=cfg.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cfg.model_copy(update={"steps": total}).lr_factor)

    def load_weights(state: dict) -> None:
        layers.load_state_dict(state["layers"])
        head.load_state_dict(state["head"])

    return StageLoop(params, optimizer, scheduler, lambda: {"layers": layers.state_dict(), "head": head.state_dict()},
                     load_weights, cfg.grad_clip)


def run_stage3(cfg: Stage3Config, out_dir: str | Path, *, max_steps: int | None = None) -> dict:
    """Run (or resume) stage 3 in ``out_dir/stage3``; returns the final metrics row."""
    from ..loading import resolve_model_path, trained_alphabet

    torch.set_num_threads(cfg.threads)
    device, dtype = cfg.runtime.resolve()
    stage = Path(out_dir) / STAGE_DIR
    stage.mkdir(parents=True, exist_ok=True)
    alphabet = cfg.alphabet or trained_alphabet(resolve_model_path(cfg.model)) or "0123456789"
    qz = QZoomModel.from_pretrained(cfg.model, qzoom=cfg.qzoom, device=device, dtype=dtype)
    qz.adapter.model.requires_grad_(False)
    if not qz.heads.has_gate:  # a stage-1 or SD-RPN checkpoint: the gate starts as copies of base layers K..K+T-1
        qz.heads.add_gate(qz.adapter)
        qz.config = qz.config.model_copy(update={"gate": True})
    metrics_path = stage / METRICS_FILE
    if not metrics_path.exists():
        before = {"when": "before", "step": 0, **evaluate_gate(qz, cfg, alphabet, cfg.eval_items)}
        metrics_path.write_text(json.dumps(before) + "\n")
    kept, stats = gate_labels(qz, cfg, alphabet, stage)

    total = cfg.steps or max(1, cfg.epochs * len(kept) // cfg.batch_size)
    loop, ckpt = gate_loop(qz, cfg, total), stage / CHECKPOINT_FILE
    if ckpt.exists():
        loop.restore(ckpt)

    def batch_at(k: int) -> list[tuple[ZoomWorldSample, int, int]]:
        return [(question(cfg, alphabet, "train", index), b, label) for index, b, label in batch_items(cfg, kept, k)]

    def step_loss(batch: list[tuple[ZoomWorldSample, int, int]]) -> dict[str, float]:
        loss_sum = 0.0
        for s, b, label in batch:
            loss = gate_loss(qz, s, budget_for(cfg.rungs[b][0]), label) / max(1, len(batch))
            loss.backward()
            loss_sum += float(loss.detach())
        return {"bce": loss_sum}

    stop = min(total, max_steps if max_steps is not None else total)
    running = loop.run(stop, batch_at, step_loss, checkpoint=ckpt, checkpoint_every=cfg.checkpoint_every,
                       desc="stage 3: gate")
    qz.heads.eval()
    after = {"when": "after", "step": loop.step, "train_seconds": round(loop.seconds, 1), "bce": running, **stats,
             **evaluate_gate(qz, cfg, alphabet, cfg.eval_items)}
    with open(metrics_path, "a") as f:
        f.write(json.dumps(after) + "\n")
    save_adapter(qz.heads, qz.config, stage / "qzoom", base_model=str(cfg.model))
    return after
