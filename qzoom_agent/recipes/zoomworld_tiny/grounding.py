"""Phase 4 of ``qzoom-agent train base``: grounding in the DeepEyes tool-call format (`grounding_data`).

Starts from ``OUT/phase3`` and trains every parameter on the call and answer tokens of tool-using examples, mixed
with plain answer examples so the model still answers directly without the policy's system prompt. Held-out
figures, on ZoomWorld's VAL split through the same `DeepEyesAgent` that ``compare`` runs:

* ``ground_hit``: share of fine questions whose first zoom box covers >= 70% of the target within 16x its area
  (the grounding bar, at a 576-token global view);
* ``ground_call_rate`` and ``ground_fine_acc``: share of fine questions with a zoom call, and answered right;
* ``ground_dx`` and ``ground_dy``: how far the box centre lands from the target's, per axis (image fractions);
* ``oracle_read_acc`` and ``coarse_acc``: the plain path (`joint_eval`), which phase 4 must not lose.

Usage::

    qzoom-agent train base --phase 4 --config configs/recipes/zoomworld_tiny/base.yaml --out runs/zw [--steps N]
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from ...bench.deepeyes_agent import DeepEyesAgent
from ...bench.registry import DEFAULT_QZOOM_TOKENS
from ...boxes import roi_hit
from ...scoring import is_correct
from ...zoomworld import VARIANTS, ZoomWorldSample, generate, seed_for
from .answer_config import AnswerConfig, load_phase_section
from .answer_data import AnswerBatch
from .grounding_data import GroundingDataConfig, make_grounding_batch
from .joint import run_joint
from .joint_eval import EVAL_SPLIT, eval_sets, evaluate_answers, inference_model
from .joint_run import JointRun
from .model import ZoomWorldTinySizes

SECTION = "grounding"
EVAL_OFFSET = 3 * 10**6  # val indices of the grounding set, clear of joint_eval's ranges (< 3e6)


class GroundingConfig(AnswerConfig):
    """Phase-4 settings (the ``grounding:`` section of the training YAML); the optimiser fields are phase 2's."""

    aux_weight: float = Field(0.0, ge=0.0, description="phase 4 has no dense targets; kept for the shared loop")
    data: GroundingDataConfig = Field(default_factory=GroundingDataConfig, description="example drawing")
    eval_items: int = Field(60, ge=1, description="held-out questions per set")
    view_tokens: int = Field(DEFAULT_QZOOM_TOKENS, ge=4, description="global view of the held-out grounding set")


def load_grounding_config(path: str | Path) -> tuple[ZoomWorldTinySizes, GroundingConfig, str]:
    """Read ``model:``, ``grounding:`` and the alphabet (``grounding.data.answers.alphabet`` or phase 1's).

    Raises:
        ValueError: one line saying which file and field is wrong.
    """
    sizes, cfg, alphabet = load_phase_section(path, SECTION, GroundingConfig)
    return sizes, cfg, cfg.data.answers.alphabet or alphabet


def grounding_eval_set(cfg: GroundingDataConfig, alphabet: str, n: int) -> list[ZoomWorldSample]:
    """``n`` held-out fine questions (VAL split, variants alternating) in phase 4's fine mix."""
    return [generate(VARIANTS[k % 2], seed_for(EVAL_SPLIT, EVAL_OFFSET + k), alphabet=alphabet, mix=cfg.fine_mix,
                     size_range=cfg.size_range) for k in range(n)]


def evaluate_grounding(agent: DeepEyesAgent, samples: list[ZoomWorldSample]) -> dict[str, float | None]:
    """``ground_hit``, ``ground_call_rate`` and ``ground_fine_acc`` of ``agent`` on ``samples``, and, over the
    questions with a zoom box, the mean distance from its centre to the target's along x and along y
    (``ground_dx``, ``ground_dy``, as fractions of the image's width and height). The model is left in its prior
    mode."""
    model = agent.model.adapter.model
    was_training = model.training
    model.eval()
    hits = calls = right = 0
    dx: list[float] = []
    dy: list[float] = []
    try:
        for s in samples:
            res = agent.run(s.image, s.question)
            hits += roi_hit(res.bbox, s.target_box)
            calls += res.tool_calls > 0
            right += is_correct(res.answer, s.answer, s.options)
            if res.bbox is not None:
                (bx1, by1, bx2, by2), (tx1, ty1, tx2, ty2) = res.bbox, s.target_box
                dx.append(abs(bx1 + bx2 - tx1 - tx2) / 2 / s.image.width)
                dy.append(abs(by1 + by2 - ty1 - ty2) / 2 / s.image.height)
    finally:
        model.train(was_training)
    n = max(1, len(samples))
    return {"ground_hit": hits / n, "ground_call_rate": calls / n, "ground_fine_acc": right / n,
            "ground_dx": sum(dx) / len(dx) if dx else None, "ground_dy": sum(dy) / len(dy) if dy else None}


def run_grounding(cfg: GroundingConfig, out_dir: str | Path, *, alphabet: str,
                  sizes: ZoomWorldTinySizes | None = None, max_steps: int | None = None) -> dict:
    """Train (or resume) phase 4 in ``out_dir/phase4`` from ``out_dir/phase3``.

    Returns:
        The last metrics row: losses, ``ground_hit``, ``ground_call_rate``, ``ground_fine_acc``,
        ``oracle_read_acc`` and ``coarse_acc``.
    """
    samples = grounding_eval_set(cfg.data, alphabet, cfg.eval_items)
    plain = eval_sets(cfg.data.answers, alphabet, cfg.eval_items)
    plain = {k: plain[k] for k in ("oracle_read", "coarse")}

    def batch_at(run: JointRun, step: int) -> AnswerBatch:
        return make_grounding_batch(run.adapter, cfg.data, alphabet, step * cfg.batch_size, cfg.batch_size)

    def evaluate(run: JointRun) -> dict[str, float]:
        qz = inference_model(run.adapter)
        agent = DeepEyesAgent(qz, cfg.view_tokens, f"deepeyes@{cfg.view_tokens}")
        return {**evaluate_grounding(agent, samples), **evaluate_answers(qz, plain)}

    return run_joint(cfg, out_dir, alphabet=alphabet, sizes=sizes, max_steps=max_steps, phase=4,
                     make_batch_at=batch_at, evaluate=evaluate)
