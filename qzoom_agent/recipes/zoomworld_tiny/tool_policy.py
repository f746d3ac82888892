"""A cold-start tool-calling policy for ``tool`` mode: a short SFT of ``zoomworld-tiny`` on ZoomWorld conversations.

On a fine question the policy's first turn is the zoom call; after the tool turn (the crop the zoom tool returns)
it answers. On a coarse question it answers at once. The data (`tool_policy_data`) is rendered by the library's
own chat renderer, with no system prompt and no tool listing, so the first turn's prompt is exactly the one the
Q-Zoom perception runs on.

Only the decoder layers from K (``twig_K``) up, the final norm and ``lm_head`` train; the vision tower, the token
embeddings and the layers below K stay frozen, so the layer-K states that the gate and the twig read are the base
model's, and the policy's perception equals the base's exactly. The stock HF forward, teacher-forced, gives the
same logits as the chat session's continued cache. The loss (`span_losses`) is a weighted mean of each supervised
span's mean cross-entropy (each call, weighted ``call_weight``, each answer) and one decision term per conversation
(call or answer at its first token).

With ``data.call: crop`` (``configs/recipes/zoomworld_tiny/crop_policy.yaml``, the bundled ``zoomworld-tiny-deepeyes``)
the same recipe trains a DeepEyes-style external-crop policy instead: the call writes a box as text and the tool turn
is DeepEyes' crop (`tool_policy_data`); everything else is the same, so the two policies compare fairly. It is
evaluated by the DeepEyes agent itself (`evaluate_crop_policy`).

Usage (``cli.cmd_train_base`` also takes ``--phase tool-policy``)::

    python -m qzoom_agent.recipes.zoomworld_tiny.cli tool-policy \
        --config configs/recipes/zoomworld_tiny/tool_policy.yaml --out runs/tp [--steps N] [--to DIR]

Writes ``OUT/tool_policy/``: ``twig_boxes.jsonl`` (the heads' box per training scene; zoom calls only),
``checkpoint.pt`` (resumed from), ``train_log.jsonl`` (losses), ``policy/`` (`policy.write_policy`: ``policy.json``
and the trained tensors in fp16) and ``metrics.jsonl`` (the real tool loop on held-out VAL conversations).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from ...bench.runner import question_indices
from ...boxes import ROI_COVERAGE, coverage, roi_hit
from ...chat import ChatSession
from ...loading import BUNDLED_MODELS, resolve_model_path, trained_alphabet
from ...model import QZoomModel
from ...policy import PolicyConfig, above_k_prefixes, policy_base, write_policy
from ...scoring import is_correct
from ...tools.zoom import ZOOM_TOOL_NAME, session_zoom
from ...train.common import OptimConfig, decay_groups, load_section
from ...train.loop import StageLoop
from ...zoomworld import DEFAULT_ALPHABET, ZoomWorldSample, sample
from .answer_data import IGNORE
from .run_state import keep_metrics_until
from .tool_policy_data import (
    CALL_END,
    CALL_MESSAGE,
    ToolBatch,
    ToolPolicyDataConfig,
    TwigBoxes,
    make_tool_batch,
    scene_index,
    tool_message,
    training_scene,
    user_message,
)

logger = logging.getLogger(__name__)

SECTION, EXAMPLE = "tool_policy", "configs/recipes/zoomworld_tiny/tool_policy.yaml"
PHASE_DIR = "tool_policy"
CALL_TOKENS = 48  # decoding budget of the first turn: the call is 37 characters, each a token
_FREE_FIELDS = {"checkpoint_every", "log_every", "eval_items", "threads"}
_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


class ToolPolicyConfig(OptimConfig):
    """The ``tool_policy:`` section of ``configs/recipes/zoomworld_tiny/tool_policy.yaml``."""

    steps: int = Field(250, ge=1, description="schedule length in optimiser steps")
    batch_size: int = Field(8, ge=1, description="conversations per step")
    warmup_steps: int = Field(20, ge=0, description="linear LR warm-up steps, then cosine decay")
    base: str = Field("zoomworld-tiny", description="the base model (bundled name or path) with its Q-Zoom heads")
    alphabet: str | None = Field(None, description="tag characters; None: the base's zoomworld.json")
    data: ToolPolicyDataConfig = Field(default_factory=ToolPolicyDataConfig, description="conversation drawing")
    call_weight: float = Field(32.0, gt=0.0, description="weight of a call span's mean loss against an answer's "
                               "and a decision's (1): the 37-token call must come out exactly")
    log_every: int = Field(10, ge=1, description="steps between rows of train_log.jsonl")
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints")
    eval_items: int = Field(40, ge=1, description="held-out VAL conversations run through the tool loop at the end")
    threads: int = Field(2, ge=1, description="torch CPU threads; 1 where another job shares a 2-core machine (two "
                         "threads then ran 5-8x slower)")

    @model_validator(mode="after")
    def _check(self) -> ToolPolicyConfig:
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps})")
        if self.steps * self.batch_size >= 10**6:  # train scenes stay inside their 1e6-wide index range
            raise ValueError("steps * batch_size must stay below 1e6 examples")
        return self


def load_tool_policy_config(path: str | Path) -> ToolPolicyConfig:
    """Read and validate the ``tool_policy:`` section of a recipe YAML.

    Raises:
        ValueError: one line saying which file and field is wrong.
    """
    return load_section(path, SECTION, ToolPolicyConfig, EXAMPLE)


def base_alphabet(cfg: ToolPolicyConfig) -> str:
    """The tag characters of the conversations: the config's, else the base model's, else ZoomWorld's default."""
    return cfg.alphabet or trained_alphabet(resolve_model_path(policy_base(cfg.base))) or DEFAULT_ALPHABET


# ---- what trains ---------------------------------------------------------------------------------------------
def trained_prefixes(model: QZoomModel) -> list[str]:
    """State-dict prefixes of the trained tensors: decoder layers ``twig_K`` and up, the final norm, ``lm_head``.

    Raises:
        ValueError: the model ties ``lm_head`` to the token embeddings (training it would move the embeddings,
            hence the layer-K states the heads read).
    """
    a = model.adapter
    if a.lm_head.weight is a.embed_tokens.weight:
        raise ValueError("the model ties lm_head to the token embeddings; a policy above layer K cannot train it")
    return above_k_prefixes(model)


def freeze_below_k(model: QZoomModel) -> list[torch.nn.Parameter]:
    """Freeze every parameter but those under `trained_prefixes` and return the trained ones. The whole model
    stays in eval mode: the frozen part must compute exactly as at inference."""
    hf, prefixes = model.adapter.model, trained_prefixes(model)
    hf.eval()
    hf.requires_grad_(False)
    params = [p for name, p in hf.named_parameters() if name.startswith(tuple(prefixes))]
    for p in params:
        p.requires_grad_(True)
    return params


def trained_state(model: QZoomModel) -> dict[str, torch.Tensor]:
    """The trained tensors, by state-dict name."""
    prefixes = tuple(trained_prefixes(model))
    return {k: v for k, v in model.adapter.model.state_dict().items() if k.startswith(prefixes)}


# ---- loss ----------------------------------------------------------------------------------------------------
def span_losses(logits: torch.Tensor, labels: torch.Tensor, spans: list[list[tuple[int, int, str]]],
                call_id: int | None = None, call_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Per-span mean next-token cross-entropy and, with ``call_id``, a per-example decision term, averaged.

    Inside a call span the first token is the only decision (the rest is a fixed string), so on its own it would
    weigh 1/37 of a span: a first run this way called on only 46% of held-out fine questions. With ``call_id``
    each example adds a term of its own: ``-log p(<tool_call>)`` at its first answer position when it should
    call, ``-log(1 - p(<tool_call>))`` when it should answer. The call must then come out exactly, all 37
    tokens under greedy decoding, which at weight 1 it did not (40% of held-out conversations wrote
    ``<tool_call>`` twice or broke the JSON), hence ``call_weight``.

    Args:
        logits: (B, L, V) next-token logits.
        labels: (B, L) ids on supervised positions, -100 elsewhere.
        spans: per example, ``(start, end, "call" | "answer")`` of its supervised spans (positions of ``labels``).
        call_id: the id of ``<tool_call>``, or None for no decision term.
        call_weight: weight of a call span's term against an answer's or a decision's (1).

    Returns:
        ``total`` (the weighted mean over all spans and decision terms, what is backpropagated), ``call``,
        ``answer`` and
        ``decision`` (each the mean of its terms; 0 without any) and ``decide`` (share of examples whose first
        argmax is ``<tool_call>`` exactly when they should call; without ``call_id``, the exact first token).
    """
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], ignore_index=IGNORE,
                         reduction="none")  # ce[b, t] is the loss of token t + 1
    per: dict[str, list[torch.Tensor]] = {"call": [], "answer": [], "decision": []}
    right = []
    for b, row in enumerate(spans):
        for start, end, what in row:
            per[what].append(ce[b, start - 1 : end - 1].mean())
        first, calls = row[0][0], row[0][2] == "call"
        guess = int(logits[b, first - 1].argmax())
        if call_id is None:
            right.append(float(guess == labels[b, first]))
            continue
        right.append(float((guess == call_id) == calls))
        log_p = torch.log_softmax(logits[b, first - 1].float(), -1)[call_id]
        per["decision"].append(-log_p if calls else -torch.log1p(-log_p.exp().clamp(max=1 - 1e-6)))
    zero = logits.sum() * 0.0
    out = {k: torch.stack(v).mean() if v else zero for k, v in per.items()}
    terms = per["call"] + per["answer"] + per["decision"]
    weights = torch.tensor([call_weight] * len(per["call"]) + [1.0] * (len(terms) - len(per["call"])))
    out["total"] = (torch.stack(terms) * weights).sum() / weights.sum()
    out["decide"] = torch.tensor(sum(right) / max(1, len(right)))
    return out


def config_key(cfg: ToolPolicyConfig) -> str:
    """Hash of everything shaping the trajectory; a checkpoint resumes only under the same key."""
    dump = cfg.model_dump(exclude=_FREE_FIELDS)
    if dump["data"]["call"] == "zoom":  # the default: keys written before the switch existed stay valid
        del dump["data"]["call"]
    blob = json.dumps(dump, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---- training ------------------------------------------------------------------------------------------------
def train_tool_policy(model: QZoomModel, cfg: ToolPolicyConfig, folder: Path, alphabet: str,
                      max_steps: int | None = None) -> int:
    """Train ``model`` in place (or resume) in ``folder`` until ``cfg.steps`` or ``max_steps``; returns the step.

    Raises:
        ValueError: ``folder`` holds a checkpoint written under another config.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ckpt, log_path, key = folder / "checkpoint.pt", folder / "train_log.jsonl", config_key(cfg)
    stop = min(cfg.steps, max_steps if max_steps is not None else cfg.steps)
    boxes = None  # a crop-call policy writes jittered ground-truth boxes: no twig box to precompute
    if cfg.data.call == "zoom":
        boxes = TwigBoxes(folder / "twig_boxes.jsonl")
        scenes = sorted({scene_index(cfg.data, k) for k in range(stop * cfg.batch_size)})
        boxes.fill(model, cfg.data, alphabet, scenes)
    params = freeze_below_k(model)
    hf = model.adapter.model
    call_id = model.adapter.tokenizer.convert_tokens_to_ids("<tool_call>")
    optimizer = torch.optim.AdamW(decay_groups(params, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cfg.lr_factor)

    def load(state: dict) -> None:
        if state.get("config_key") != key:
            raise ValueError("written under a different config; resume with the same config or use a new --out")
        unexpected = hf.load_state_dict(state["policy"], strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"the checkpoint holds tensors the model lacks: {unexpected[:3]}")

    loop = StageLoop(params, optimizer, scheduler, lambda: {"policy": trained_state(model), "config_key": key},
                     load, cfg.grad_clip)
    if ckpt.exists():
        loop.restore(ckpt)
        keep_metrics_until(log_path, loop.step)
        logger.info("resuming the tool policy from step %d of %d", loop.step, cfg.steps)

    def batch_at(step: int) -> ToolBatch:
        return make_tool_batch(model, cfg.data, alphabet, boxes, step * cfg.batch_size, cfg.batch_size)

    def step_loss(batch: ToolBatch) -> dict[str, float]:
        losses = span_losses(hf(**batch.inputs).logits, batch.labels, batch.spans, call_id, cfg.call_weight)
        losses["total"].backward()
        figures = {k: float(v.detach()) for k, v in losses.items()}
        if (loop.step + 1) % cfg.log_every == 0 or loop.step + 1 == stop:
            row = {"step": loop.step + 1, **figures, "lr": scheduler.get_last_lr()[0],
                   "fine": batch.kinds.count("fine"), "train_seconds": round(loop.seconds, 1)}
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            logger.info("tool policy step %d: loss %.3f (call %.3f, answer %.3f, decision %.3f), decided right %.2f",
                        row["step"], figures["total"], figures["call"], figures["answer"], figures["decision"],
                        figures["decide"])
        return {"loss": figures["total"], "answer": figures["answer"], "decision": figures["decision"],
                "decide": figures["decide"]}

    loop.run(stop, batch_at, step_loss, checkpoint=ckpt, checkpoint_every=cfg.checkpoint_every,
             desc="tool policy")
    return loop.step


def export_policy(model: QZoomModel, out: Path, cfg: ToolPolicyConfig, step: int) -> Path:
    """Write the trained tensors and ``policy.json`` (`policy.write_policy`) into ``out``."""
    start = policy_base(cfg.base)  # a policy as the start: the export is a delta on the same base
    base = start if start in BUNDLED_MODELS else str(resolve_model_path(start).resolve())
    flow = ("fine question -> zoom call -> tool crop -> answer" if cfg.data.call == "zoom" else
            "fine question -> DeepEyes image_zoom_in_tool call (bbox_2d in pixels of the resized view, a jittered "
            "ground-truth box) -> the DeepEyes agent's crop alone -> answer")
    notes = (f"SFT from {cfg.base} on ZoomWorld train conversations (qzoom_agent/recipes/zoomworld_tiny/"
             f"tool_policy.py): {step} steps of {cfg.batch_size}, fine share {cfg.data.fine_share}, lr {cfg.lr}; "
             f"{flow}, coarse -> answer. Figures: docs/zoomworld-tiny.md.")
    policy = PolicyConfig(base=base, system=None, list_tools=False, frozen_below=model.config.twig_K,
                          trained=trained_prefixes(model), call=cfg.data.call, notes=notes)
    return write_policy(model.adapter.model, Path(out), policy)


def run_tool_policy(cfg: ToolPolicyConfig, out_dir: str | Path, *, max_steps: int | None = None,
                    to: str | Path | None = None) -> dict:
    """Train (or resume) the policy in ``out_dir/tool_policy``, export it to ``policy/`` (and to ``to``), and run
    it through the tool loop on ``cfg.eval_items`` held-out VAL conversations.

    Returns:
        The metrics row: ``step``, ``policy`` (its folder) and `evaluate_policy`'s figures.
    """
    torch.set_num_threads(cfg.threads)
    folder = Path(out_dir) / PHASE_DIR
    alphabet = base_alphabet(cfg)
    model = QZoomModel.from_pretrained(cfg.base)
    step = train_tool_policy(model, cfg, folder, alphabet, max_steps)
    policy_dir = export_policy(model, folder / "policy", cfg, step)
    if to is not None:
        export_policy(model, Path(to), cfg, step)
    samples = [training_scene(cfg.data, alphabet, k, split="val") for k in range(cfg.eval_items)]
    evaluate = evaluate_policy if cfg.data.call == "zoom" else evaluate_crop_policy
    row = {"step": step, "policy": str(policy_dir), **evaluate(QZoomModel.from_pretrained(policy_dir), samples)}
    with open(folder / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


# ---- the tool loop -------------------------------------------------------------------------------------------
def parse_zoom_call(raw: str) -> bool | None:
    """None when ``raw`` holds no ``<tool_call>``; True when its first call is ``{"name": "zoom", "arguments":
    {...}}``; False when it is malformed or names another tool."""
    found = _CALL.search(raw)
    if found is None:
        return None
    try:
        data = json.loads(found.group(1).strip())
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("name") == ZOOM_TOOL_NAME and isinstance(data.get("arguments"), dict)


def run_tool_loop(model: QZoomModel, image, question: str, max_new_tokens: int = 8) -> dict:
    """One conversation as ``tool`` mode runs it: the first turn (stopping at ``</tool_call>``); on a zoom call,
    the call turn, the zoom tool's output from the session's own perception (`session_zoom`), and the answer.

    Returns:
        ``called`` (a valid zoom call), ``malformed`` (a ``<tool_call>`` that is not one), ``answer`` (the text
        scored), ``box`` (the tool's box in source pixels, or None) and ``again`` (the answer turn called again).
    """
    session = ChatSession(model)
    messages = [user_message(image, question)]
    turn = session.generate(messages, max_new_tokens=CALL_TOKENS, stop_strings=(CALL_END,))
    call = parse_zoom_call(turn.raw)
    if not call:
        return {"called": False, "malformed": call is False, "answer": turn.text, "box": None, "again": False}
    out = session_zoom(session)
    messages += [CALL_MESSAGE, tool_message(out)]
    second = session.generate(messages, max_new_tokens=max_new_tokens)
    return {"called": True, "malformed": False, "answer": second.text, "box": out.artifact.get("box"),
            "again": parse_zoom_call(second.raw) is not None}


def _share(hits: list[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def evaluate_policy(model: QZoomModel, samples: list[ZoomWorldSample], max_new_tokens: int = 8) -> dict:
    """The tool loop (`run_tool_loop`) on ``samples``: call rates and accuracy per kind.

    Returns:
        ``n_fine``, ``n_coarse``, ``call_fine``, ``call_coarse``, ``acc_fine``, ``acc_coarse``, ``malformed``
        (share of all), ``box_holds`` (fine calls whose box holds >= 70% of the target), ``acc_fine_held`` and
        ``acc_fine_missed`` (fine calls by whether it does); rates are None over no question.
    """
    rec: dict[str, list[bool]] = {k: [] for k in ("call_fine", "call_coarse", "acc_fine", "acc_coarse",
                                                  "malformed", "box_holds", "acc_fine_held", "acc_fine_missed")}
    for s in samples:
        r = run_tool_loop(model, s.image, s.question, max_new_tokens)
        right = is_correct(r["answer"], s.answer, s.options)
        rec[f"call_{s.kind}"].append(r["called"])
        rec[f"acc_{s.kind}"].append(right)
        rec["malformed"].append(r["malformed"])
        if s.kind == "fine" and r["called"]:
            held = (coverage(r["box"], s.target_box) or 0.0) >= ROI_COVERAGE if r["box"] else False
            rec["box_holds"].append(held)
            rec["acc_fine_held" if held else "acc_fine_missed"].append(right)
    return {"n_fine": len(rec["acc_fine"]), "n_coarse": len(rec["acc_coarse"]),
            **{k: _share(v) for k, v in rec.items()}}


def evaluate_crop_policy(model: QZoomModel, samples: list[ZoomWorldSample], *, cached: bool = False) -> dict:
    """A crop-call policy run by the real `bench.deepeyes_agent.DeepEyesAgent` (``deepeyes``, or ``deepeyes-cached``
    with ``cached``) at the model config's view budget, with the policy's system prompt (none when it has none).

    Raises:
        RuntimeError: the agent keeps no per-turn trace.

    Returns:
        ``n_fine``, ``n_coarse``; ``call_fine`` / ``call_coarse`` (the first turn wrote a ``<tool_call>``);
        ``croppable`` (calls, all turns, that parsed into a box the agent cropped) over ``n_calls``; ``roi_hit``
        (`boxes.roi_hit` of the first crop, over fine questions with a call) and ``box_holds`` (the first crop holds
        >= 70% of the target, as `evaluate_policy` counts it); ``again`` (fine calls followed by another call);
        ``acc_fine``, ``acc_coarse``, ``acc_fine_held`` / ``acc_fine_missed`` (fine calls by ``box_holds``);
        rates are None over no question.
    """
    from ...bench.deepeyes_agent import DeepEyesAgent
    from ...config import budget_for

    tokens, budget = model.config.max_tokens, (model.config.min_tokens, model.config.max_tokens)
    if budget_for(tokens) != budget:  # the agent's view would differ from the one the policy was trained on
        logger.warning("the agent's view budget %s differs from the model config's %s", budget_for(tokens), budget)
    system = (model.policy.system if model.policy is not None else None) or ""
    extra = {"cached": True} if cached else {}
    agent = DeepEyesAgent(model, tokens, "deepeyes-cached" if cached else "deepeyes", system=system, **extra)
    rec: dict[str, list[bool]] = {k: [] for k in ("call_fine", "call_coarse", "croppable", "roi_hit", "box_holds",
                                                  "again", "acc_fine", "acc_coarse", "acc_fine_held",
                                                  "acc_fine_missed")}
    for s in samples:
        r = agent.run(s.image, s.question)
        if r.trace is None:  # the figures read each turn from it
            raise RuntimeError("the DeepEyes agent returned no trace (it must run on bench.crop_agent)")
        trace = r.trace
        calls = [e for e in trace if e.get("action") == "call"]
        called = bool(trace) and trace[0].get("action") == "call"
        right = is_correct(r.answer, s.answer, s.options)
        rec[f"call_{s.kind}"].append(called)
        rec[f"acc_{s.kind}"].append(right)
        rec["croppable"] += ["box" in e for e in calls]
        if s.kind == "fine" and called:
            held = r.bbox is not None and (coverage(r.bbox, s.target_box) or 0.0) >= ROI_COVERAGE
            rec["roi_hit"].append(roi_hit(r.bbox, s.target_box))
            rec["box_holds"].append(held)
            rec["again"].append(len(calls) > 1)
            rec["acc_fine_held" if held else "acc_fine_missed"].append(right)
    return {"n_fine": len(rec["acc_fine"]), "n_coarse": len(rec["acc_coarse"]), "n_calls": len(rec["croppable"]),
            **{k: _share(v) for k, v in rec.items()}}


def evaluate_base(model: QZoomModel, samples: list[ZoomWorldSample], mode: str, max_new_tokens: int = 8) -> dict:
    """``model.answer(..., mode=mode)`` on ``samples``: ``n_fine``, ``n_coarse``, ``acc_fine``, ``acc_coarse``
    and, as the analogue of a call rate, ``call_fine`` / ``call_coarse``: the share answered from a zoom."""
    rec: dict[str, list[bool]] = {k: [] for k in ("call_fine", "call_coarse", "acc_fine", "acc_coarse")}
    for s in samples:
        a = model.answer(s.image, s.question, mode=mode, max_new_tokens=max_new_tokens)
        rec[f"call_{s.kind}"].append(a.zoomed)
        rec[f"acc_{s.kind}"].append(is_correct(a.text, s.answer, s.options))
    return {"n_fine": len(rec["acc_fine"]), "n_coarse": len(rec["acc_coarse"]),
            **{k: _share(v) for k, v in rec.items()}}


def test_samples(variant: str, n: int, seed: int, alphabet: str) -> list[ZoomWorldSample]:
    """The ``n`` TEST-split questions ``compare --bench zoomworld:VARIANT --n N --seed SEED`` asks (ZoomWorld's
    default mix and sizes: about 70% fine)."""
    return [sample(variant, "test", k, alphabet=alphabet) for k in question_indices(seed, n)]
