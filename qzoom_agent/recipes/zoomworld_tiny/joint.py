"""Phases 2 and 3 of ``qzoom-agent train base`` for ``zoomworld-tiny``: joint answer training.

Phase 2 (the ``answer:`` section) starts from ``OUT/phase1/model`` and phase 1's probe. Phase 3 (``tiles:``,
fine reading at native scale on scene tiles) continues from ``OUT/phase2`` with its own data mix and schedule.
In both, every parameter trains on the answer loss (per-example mean
cross-entropy over the answer and ``<|im_end|>``, averaged over the batch) plus the probe's dense loss on dense
crops, weighted ``aux_weight`` until ``aux_until`` of the run and 0 after (``docs/zoomworld-tiny.md``),
plus, with ``focus_weight`` > 0, the focus loss on the attention of ``focus_layers`` (`focus`).

Usage::

    qzoom-agent train base --phase 2 --config configs/recipes/zoomworld_tiny/base.yaml --out runs/zw [--steps N]

Writes ``OUT/phase2/`` (``OUT/phase3/``): ``checkpoint.pt`` (atomic; resumed from when present),
``metrics.jsonl`` (held-out oracle-crop reading, native-tile reading and coarse accuracy through the inference
path) and ``model/`` (an HF folder loadable with
``QZoomModel.from_pretrained(dir, qzoom=False)``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ...backbones import BackboneAdapter
from ...train.common import eager_attention, prefetched
from .answer_config import FOCUS_LAYERS, KEEP_LAYERS, PHASES, AnswerConfig
from .answer_data import IGNORE, AnswerBatch, make_batch
from .dense_probe import dense_losses
from .focus import focus_losses
from .joint_eval import eval_sets, evaluate_answers, inference_model
from .joint_run import JointRun, build_joint_run
from .keep import keep_losses
from .model import ZoomWorldTinySizes
from .run_state import keep_metrics_until, read_metrics

logger = logging.getLogger(__name__)

PHASE_DIR, PREV_PHASE_DIR = "phase2", "phase1"
CHECKPOINT_FILE, METRICS_FILE = "checkpoint.pt", "metrics.jsonl"
_FREE_FIELDS = {"checkpoint_every", "eval_every", "eval_items", "threads"}
_EMA = 0.95


def config_key(sizes: ZoomWorldTinySizes, cfg: AnswerConfig, alphabet: str) -> str:
    """Hash of everything shaping the trajectory; a checkpoint resumes only under the same key."""
    # rope_theta is left out: phases 2-3 take it from the previous phase's saved model (phase 1's key covers it),
    # and runs begun before it was a size keep resuming
    # the focus and keep fields join the key only when their loss is on, so runs begun before them keep resuming
    free = (_FREE_FIELDS | ({"focus_weight", "focus_layers"} if cfg.focus_weight == 0 else set())
            | ({"keep_weight", "keep_layers"} if cfg.keep_weight == 0 else set()))
    blob = {"model": sizes.model_dump(exclude={"rope_theta"}), "answer": cfg.model_dump(exclude=free),
            "alphabet": alphabet}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def answer_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example mean next-token CE over supervised positions.

    Args:
        logits: (B, L, V) next-token logits.
        labels: (B, L) token ids aligned with the inputs, -100 where unsupervised.

    Returns:
        (B,) losses; the batch loss is their mean, so padding never reweights an example.
    """
    target = labels[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), target, ignore_index=IGNORE, reduction="none")
    sup = (target != IGNORE).float()
    return (ce * sup).sum(1) / sup.sum(1).clamp(min=1)


def image_positions(input_ids: torch.Tensor, image_token_id: int) -> list[torch.Tensor]:
    """Per row of ``input_ids`` (B, L), the (N_i,) positions of its visual tokens, in raster order."""
    return [(row == image_token_id).nonzero().squeeze(1) for row in input_ids]


def _focus_loss(inputs: dict[str, torch.Tensor], batch: AnswerBatch, attentions: tuple[torch.Tensor, ...],
                image_token_id: int, layers: list[int]) -> torch.Tensor:
    """Mean focus loss over the examples of ``batch`` with a target (0 when none has one)."""
    lengths = inputs["attention_mask"].sum(1).tolist()
    positions = image_positions(inputs["input_ids"], image_token_id)
    # the rows predicting the answer: the last prompt token and the answer tokens but the last (just the last
    # prompt token for locate examples, which have no answer)
    rows = [(p - 1, max(n - 1, p)) for p, n in zip(batch.prompt_lens, lengths, strict=True)]
    if max(layers) >= len(attentions):
        raise ValueError(f"focus_layers {layers} exceed the model's {len(attentions)} decoder layers")
    losses = focus_losses(attentions, positions, rows, batch.focus, layers)
    return losses.mean() if losses.numel() else attentions[0].sum() * 0.0


def batch_loss(run: JointRun, batch: AnswerBatch, aux_weight: float, weights: dict[str, float] | None = None,
               focus_weight: float = 0.0, focus_layers: list[int] | None = None, keep_weight: float = 0.0,
               keep_layers: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Answer loss (mean of per-example losses), the probe's aux loss (``weights`` per target kind; default
    present, char and colour at 1) on examples with targets, the focus loss (`focus`, on ``focus_layers``,
    default ``FOCUS_LAYERS``) when ``focus_weight`` > 0, the keep loss (`keep`, the frozen probe on the
    inputs of ``keep_layers``, default ``KEEP_LAYERS``, same ``weights``) when ``keep_weight`` > 0, and their
    weighted sum."""
    weights = weights if weights is not None else {"present": 1.0, "char": 1.0, "colour": 1.0}
    focus = focus_weight > 0 and batch.focus is not None
    keep = keep_weight > 0 and batch.dense is not None
    captured: list[torch.Tensor] = []
    # The stock forward runs the vision tower once for all images; the hook keeps its merged tokens for the probe.
    hook = run.model.model.visual.register_forward_hook(lambda m, i, o: captured.append(o.pooler_output))
    try:
        with eager_attention(run.model.model.language_model, on=focus):  # the tower stays on sdpa
            result = run.model(**batch.inputs, output_attentions=focus, output_hidden_states=keep)
    finally:
        hook.remove()
    per_example = answer_losses(result.logits, batch.labels)
    zero = per_example.sum() * 0.0
    out = {"answer": per_example.mean(), "aux": zero, "focus": zero, "keep": zero}
    if batch.dense is not None and aux_weight > 0:
        bounds = [0]
        for n in batch.n_tokens:
            bounds.append(bounds[-1] + n)
        feats = torch.cat([captured[0][bounds[i] : bounds[i + 1]] for i in batch.dense_rows])
        out["aux"] = dense_losses(run.probe(feats), batch.dense, weights)["total"]
    if focus:
        out["focus"] = _focus_loss(batch.inputs, batch, result.attentions, run.model.config.image_token_id,
                                   list(focus_layers if focus_layers is not None else FOCUS_LAYERS))
    if keep:
        positions = image_positions(batch.inputs["input_ids"], run.model.config.image_token_id)
        out["keep"] = keep_losses(result.hidden_states, positions, batch.dense_rows, batch.dense, run.probe,
                                  list(keep_layers if keep_layers is not None else KEEP_LAYERS), weights)
    out["total"] = (out["answer"] + aux_weight * out["aux"] + focus_weight * out["focus"]
                    + keep_weight * out["keep"])
    return out


def train_step(run: JointRun, batch: AnswerBatch, cfg: AnswerConfig) -> dict[str, float]:
    """One optimiser step; returns the step's answer, aux and total losses."""
    losses = batch_loss(run, batch, cfg.aux_at(run.step), cfg.aux_weights, cfg.focus_weight, cfg.focus_layers,
                        cfg.keep_weight, cfg.keep_layers)
    run.apply(losses["total"], cfg.grad_clip)
    out = {k: float(v.detach()) for k, v in losses.items()}
    for k, v in out.items():
        run.running[k] = _EMA * run.running.get(k, v) + (1 - _EMA) * v
    return out


Evaluator = Callable[[JointRun], dict[str, float]]
BatchMaker = Callable[[JointRun, int], AnswerBatch]


def _evaluate(run: JointRun, cfg: AnswerConfig, evaluate: Evaluator, metrics_path: Path) -> dict:
    seen = run.step * cfg.batch_size
    row = {"step": run.step, "examples": seen, "lr": run.scheduler.get_last_lr()[0],
           "loss": run.running.get("total"), "answer_loss": run.running.get("answer"),
           "aux_loss": run.running.get("aux"), "focus_loss": run.running.get("focus"),
           "keep_loss": run.running.get("keep"),
           "train_seconds": round(run.train_seconds, 1),
           "examples_per_s": round(seen / run.train_seconds, 2) if run.train_seconds else None}
    row.update(evaluate(run))
    with open(metrics_path, "a") as f:
        f.write(json.dumps(row) + "\n")
    figures = ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.endswith(("_acc", "_hit")))
    logger.info("step %d: %s, answer loss %.3f", run.step, figures, row["answer_loss"] or float("nan"))
    return row


def export(adapter: BackboneAdapter, folder: Path) -> None:
    """Write model, tokenizer and image processor as an HF folder for `QZoomModel.from_pretrained`."""
    adapter.model.save_pretrained(folder)
    adapter.tokenizer.save_pretrained(folder)
    adapter.image_processor.save_pretrained(folder)


def run_joint(cfg: AnswerConfig, out_dir: str | Path, *, alphabet: str, sizes: ZoomWorldTinySizes | None = None,
              max_steps: int | None = None, phase: int = 2, make_batch_at: BatchMaker | None = None,
              evaluate: Evaluator | None = None) -> dict:
    """Train (or resume) ``phase`` until ``cfg.steps`` or ``max_steps``: phase 2 in ``out_dir/phase2`` from
    ``out_dir/phase1``, phase 3 in ``out_dir/phase3`` from ``out_dir/phase2`` (phase 4, grounding, passes its own
    batches and evaluation: `grounding`).

    Args:
        cfg: the phase's settings.
        out_dir: run folder holding the previous phase's ``model/`` and ``checkpoint.pt`` (for the probe).
        alphabet: tag characters of the examples.
        sizes: model sizes, only for the checkpoint key (the weights come from phase 1).
        max_steps: stop once the global step reaches this (the schedule still spans ``cfg.steps``).
        phase: 2, 3 or 4.
        make_batch_at: ``(run, step) -> batch`` of that step; default: `answer_data.make_batch` on ``cfg.data``.
        evaluate: ``run -> figures`` on held-out questions; default: `joint_eval.evaluate_answers` on its sets.

    Returns:
        The last metrics row (step, losses, examples/s, and the evaluation's figures, by default
        ``oracle_read_acc``, ``tile_read_acc``, ``coarse_acc`` and ``dense_read_acc``).
    """
    sizes = sizes or ZoomWorldTinySizes()
    torch.set_num_threads(cfg.threads)
    out_dir = Path(out_dir)
    if phase not in PHASES:
        raise ValueError(f"joint phases are {sorted(PHASES)}, got {phase}")
    folder, previous, _ = PHASES[phase]
    number = phase
    phase_dir = out_dir / folder
    phase_dir.mkdir(parents=True, exist_ok=True)
    ckpt, metrics_path, key = phase_dir / CHECKPOINT_FILE, phase_dir / METRICS_FILE, config_key(sizes, cfg, alphabet)
    run = build_joint_run(cfg, out_dir / previous)
    if ckpt.exists():
        run.restore(ckpt, key)
        keep_metrics_until(metrics_path, run.step)
        logger.info("resuming phase %d from step %d of %d", number, run.step, cfg.steps)
    stop = min(cfg.steps, max_steps if max_steps is not None else cfg.steps)
    last = (read_metrics(metrics_path) or [None])[-1]
    if evaluate is None:
        sets = eval_sets(cfg.data, alphabet, cfg.eval_items)

        def evaluate(run: JointRun) -> dict[str, float]:
            return evaluate_answers(inference_model(run.adapter), sets)

    def batch_at(step: int) -> AnswerBatch:
        if make_batch_at is not None:
            return make_batch_at(run, step)
        return make_batch(run.adapter, cfg.data, alphabet, step * cfg.batch_size, cfg.batch_size)

    with tqdm(total=stop, initial=run.step, desc=f"phase {number} answers", dynamic_ncols=True,
              mininterval=2.0) as bar:
        for _, fetch in prefetched(batch_at, run.step, stop):  # the next batch renders while this one trains
            tick = time.perf_counter()
            batch = fetch()
            train_step(run, batch, cfg)
            run.train_seconds += time.perf_counter() - tick
            bar.update(1)
            bar.set_postfix(loss=f"{run.running['answer']:.3f}")
            if run.step % cfg.eval_every == 0 or run.step == stop:
                last = _evaluate(run, cfg, evaluate, metrics_path)
            if run.step % cfg.checkpoint_every == 0 or run.step == stop:
                run.save(ckpt, key)
    if last is None or last["step"] != run.step:
        last = _evaluate(run, cfg, evaluate, metrics_path)
    export(run.adapter, phase_dir / "model")
    return last
