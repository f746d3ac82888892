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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..boxes import ROI_COVERAGE
from ..checkpoint import save_adapter
from ..config import QZoomConfig
from ..model import QZoomModel
from ..zoomworld import ZoomWorldSample
from .common import atomic_torch_save, decay_groups
from .common import stage_question as question
from .loop import StageLoop
from .stage1_config import AUX_NEEDS_T2, Stage1Config, load_stage1_config
from .stage1_eval import evaluate_roi
from .stage1_labels import (
    IGNORE,
    box_labels,
    head_agreement,
    pseudo_labels,
    response_attention,
    select_heads,
)

__all__ = ["Stage1Config", "TwigAuxiliary", "load_stage1_config", "run_stage1"]

logger = logging.getLogger(__name__)

STAGE_DIR = "stage1"
LABELS_FILE, CHECKPOINT_FILE, METRICS_FILE, RANKING_FILE = "labels.pt", "checkpoint.pt", "metrics.jsonl", \
    "head_ranking.json"
RANK_OFFSET = 5 * 10**8  # train-split indices of the head-ranking questions: apart from the label questions


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
    fp = qz.prefill(s.image, s.question, budget=budget)
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
    logits = qz.heads.roi_scores(qz.adapter, states, x.rotary, x.image_start, x.image_end, rope=qz.config.twig_rope,
                                 multi_head=qz.config.roi_multi_head)
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


class TwigAuxiliary(Protocol):
    """An extra loss on the twig's own hidden state, trained beside the twig with weight ``aux_weight`` and thrown
    away after: the place for what a dataset knows beyond boxes. ZoomWorld's colour probes
    (``recipes/zoomworld_tiny/twig_aux.py``) are one; any ``nn.Module`` with these two methods is another.
    """

    def targets(self, sample: ZoomWorldSample, grid: tuple[int, int]) -> Any:
        """What the loss needs of ``sample`` seen whole on a ``grid`` of merged tokens (cached per question)."""
        ...

    def loss(self, states: torch.Tensor, image_start: int, image_end: int, targets: Any) -> torch.Tensor:
        """Scalar loss on the twig state ``states`` (1, L, D) with the visual tokens at ``image_start:image_end``."""
        ...

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


AuxFactory = Callable[[int], TwigAuxiliary]  # the model's hidden size -> a fresh auxiliary module


def twig_loop(qz: QZoomModel, cfg: Stage1Config, aux: AuxFactory | None) -> tuple[StageLoop, TwigAuxiliary | None]:
    """Unfreeze the twig alone (the gate and the base stay frozen) and build its optimiser and, with
    ``cfg.aux_weight`` > 0, the auxiliary module trained beside it."""
    twig = qz.heads.twig_layers
    qz.heads.requires_grad_(False)
    twig.requires_grad_(True)
    qz.heads.train()
    module = None
    if cfg.aux_weight > 0 and aux is not None:
        if qz.heads.T < 2:
            raise ValueError(AUX_NEEDS_T2)
        module = aux(qz.adapter.hidden_size).to(qz.adapter.device)
    params = [*twig.parameters(), *([] if module is None else module.parameters())]
    optimizer = torch.optim.AdamW(decay_groups(params, cfg.weight_decay, cfg.lr), lr=cfg.lr, betas=cfg.betas)

    def weights() -> dict[str, Any]:
        return {"twig": twig.state_dict(), **({"aux": module.state_dict()} if module is not None else {})}

    def load_weights(state: dict[str, Any]) -> None:
        if (module is not None) != ("aux" in state):
            raise ValueError(f"written with aux_weight {'> 0' if 'aux' in state else '0'}; "
                             "resume with the same setting or use another --out")
        twig.load_state_dict(state["twig"])
        if module is not None:
            module.load_state_dict(state["aux"])

    loop = StageLoop(params, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, cfg.lr_factor), weights,
                     load_weights, cfg.grad_clip)
    return loop, module


def train_twig(qz: QZoomModel, cfg: Stage1Config, alphabet: str, usable: list[dict], loop: StageLoop,
               aux: TwigAuxiliary | None, ckpt: Path, stop: int) -> float | None:
    """Train the twig on the ``usable`` label records from ``loop.step`` to ``stop``; returns the smoothed loss."""
    features: dict[int, TwigInputs] = {}  # question index -> frozen first pass (cache_features)
    targets: dict[int, Any] = {}  # question index -> auxiliary targets (aux_weight > 0)

    def batch_at(k: int) -> list[tuple[int, ZoomWorldSample | None, torch.Tensor]]:
        recs = [usable[(k * cfg.batch_size + j) % len(usable)] for j in range(cfg.batch_size)]
        return [(r["index"], None if r["index"] in features and (aux is None or r["index"] in targets)
                 else question(cfg, alphabet, "train", r["index"]), r["labels"].long()) for r in recs]

    def step_loss(batch: list[tuple[int, ZoomWorldSample | None, torch.Tensor]]) -> dict[str, float]:
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
            if aux is not None:
                if index not in targets:
                    targets[index] = aux.targets(s, x.grid)
                extra = aux.loss(states, x.image_start, x.image_end, targets[index]) / len(batch)
                aux_sum += float(extra.detach())
                loss = loss + cfg.aux_weight * extra
            loss.backward()
        return {"bce": loss_sum, **({"aux": aux_sum} if aux is not None else {})}

    return loop.run(stop, batch_at, step_loss, checkpoint=ckpt, checkpoint_every=cfg.checkpoint_every,
                    desc="stage 1: twig")


def run_stage1(cfg: Stage1Config, out_dir: str | Path, *, max_steps: int | None = None,
               aux: AuxFactory | None = None) -> dict:
    """Run (or resume) stage 1 in ``out_dir/stage1``; returns the final metrics row.

    Args:
        cfg: the stage's settings.
        out_dir: the run folder.
        max_steps: stop at this step (the schedule still spans the whole run; resume later).
        aux: with ``cfg.aux_weight`` > 0, builds the auxiliary loss on the twig's state from the hidden size.
    """
    from ..loading import resolve_model_path, trained_alphabet

    if cfg.aux_weight > 0 and aux is None:  # fail before any work: nothing is written
        raise ValueError("aux_weight > 0 needs an auxiliary loss on the twig: pass run_stage1(aux=...) (the CLI "
                         "passes ZoomWorld's colour probes), or set aux_weight: 0")
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

    loop, module = twig_loop(qz, cfg, aux)
    ckpt = stage / CHECKPOINT_FILE
    if ckpt.exists():
        loop.restore(ckpt)
    stop = min(cfg.total_steps, max_steps if max_steps is not None else cfg.total_steps)
    running = train_twig(qz, cfg, alphabet, usable, loop, module, ckpt, stop)
    qz.heads.eval()
    after = {"when": "after", "step": loop.step, "train_seconds": round(loop.seconds, 1), "bce": running,
             **label_stats, **evaluate_roi(qz, cfg, alphabet, cfg.eval_items)}
    with open(metrics_path, "a") as f:
        f.write(json.dumps(after) + "\n")
    save_adapter(qz.heads, qz.config, stage / "qzoom", base_model=str(cfg.model))
    return after
