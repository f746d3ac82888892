"""Held-out evaluation of a GRPO run: `compare` on the policy before, during and after training, and the progress plot.

The policy being trained is written as a policy delta (`qzoom_agent.policy`: the layers from K up, which are all
that train) and run by a `compare` agent on ZoomWorld TEST questions, which no training row is drawn from:
``qzoom-tool`` for the internal zoom, ``deepeyes-cached`` for the DeepEyes crop, ``plain@576`` for no tool. Each
evaluation is a resumable `compare` run under ``OUTPUT_DIR/eval/step-N``; ``OUTPUT_DIR/eval/history.jsonl`` holds
one line per evaluation and ``OUTPUT_DIR/grpo_progress.png`` plots reward, tool-call rate and held-out accuracy by
step.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

if TYPE_CHECKING:
    from ..model import QZoomModel
    from .config import RecipeArguments

logger = logging.getLogger(__name__)

HISTORY = "history.jsonl"
PROGRESS_PNG = "grpo_progress.png"


def _rate(records: list[dict[str, Any]], key: str, kind: str | None = None) -> float | None:
    rows = [r for r in records if kind is None or r.get("kind") == kind]
    if not rows:
        return None
    if key == "called":
        return sum(bool(r.get("tool_calls")) for r in rows) / len(rows)
    return sum(float(r.get(key) or 0) for r in rows) / len(rows)


def summarize_eval(records: list[dict[str, Any]], step: int) -> dict[str, Any]:
    """One evaluation's line: accuracy (all, fine, coarse), share of questions with a tool call (fine, coarse),
    mean tool calls, latency and generated tokens per question, and the share of answers that are a call written as
    text (an agent without the tool).

    Examples:
        >>> recs = [{"kind": "fine", "correct": True, "tool_calls": 1, "latency_s": 0.5, "generated_tokens": 30},
        ...         {"kind": "coarse", "correct": False, "tool_calls": 0, "latency_s": 0.25, "generated_tokens": 4}]
        >>> s = summarize_eval(recs, 10)
        >>> s["accuracy"], s["call_rate_fine"], s["call_rate_coarse"], s["latency_s"], s["n"]
        (0.5, 1.0, 0.0, 0.375, 2)
    """
    return {"step": step, "n": len(records), "n_fine": sum(r.get("kind") == "fine" for r in records),
            "accuracy": _rate(records, "correct"), "accuracy_fine": _rate(records, "correct", "fine"),
            "accuracy_coarse": _rate(records, "correct", "coarse"),
            "call_rate_fine": _rate(records, "called", "fine"), "call_rate_coarse": _rate(records, "called", "coarse"),
            "tool_calls": _rate(records, "tool_calls"), "latency_s": _rate(records, "latency_s"),
            "generated_tokens": _rate(records, "generated_tokens"),
            # a call written as text that no tool ran (the no-tool agent's answers): the habit, not an answer
            "call_text_rate": (sum("<tool_call>" in str(r.get("answer") or "") for r in records) / len(records)
                               if records else None),
            "errors": sum(bool(r.get("error")) for r in records)}


def policy_compare_args(recipe: RecipeArguments, policy_dir: Path, base: str) -> dict[str, str]:
    """The `CompareConfig` fields that make the run's agent use the policy in ``policy_dir``."""
    if recipe.environment == "zoom" and recipe.agent == "qzoom-tool":
        return {"model": base, "policy": str(policy_dir)}
    if recipe.environment == "crop" and recipe.agent.startswith("deepeyes"):
        return {"model": base, "crop_policy": str(policy_dir)}
    return {"model": str(policy_dir)}  # the policy is the run's model (plain@N, crop@DIALECT, ...)


def evaluate(recipe: RecipeArguments, model: QZoomModel, out_dir: Path, step: int,
             save_policy: Any) -> dict[str, Any]:
    """Write the policy at ``step``, run `compare` on ``recipe.eval_n`` held-out questions and append the summary
    line to ``out_dir / HISTORY`` (an evaluation already in the history is returned as it was).

    Args:
        save_policy: ``save_policy(model, directory) -> base`` writes the policy delta and returns its base model.
    """
    from dataclasses import replace

    from ..bench.rundir import load_results
    from ..bench.runner import RESULTS, CompareConfig, run_compare

    history = read_history(out_dir)
    for line in history:
        if line["step"] == step:
            return line
    run_dir = out_dir / f"step-{step}"
    policy_dir = run_dir / "policy"
    base = save_policy(model, policy_dir)
    cfg = CompareConfig(bench=recipe.eval_bench, agents=[recipe.agent], n=recipe.eval_n, seed=recipe.eval_seed,
                        out=str(run_dir / "compare"), device="cpu" if model.adapter.device.type == "cpu" else "auto")
    cfg = replace(cfg, **policy_compare_args(recipe, policy_dir, base))
    was_training = model.adapter.model.training
    try:
        run_compare(cfg)
    finally:
        model.adapter.model.train(was_training)
    line = summarize_eval(load_results(Path(cfg.out) / RESULTS), step)
    with (out_dir / HISTORY).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(line) + "\n")
    logger.info("held-out evaluation at step %d: %s", step, line)
    return line


def read_history(out_dir: Path) -> list[dict[str, Any]]:
    """The evaluation lines written so far (none when the file does not exist)."""
    path = out_dir / HISTORY
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_progress(log_history: list[dict[str, Any]], evals: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Three panels by step: the mean reward of the rollouts, their tool-call rate (TRL's ``tools/call_frequency``
    and, where logged, the share of fine and coarse rollouts that called), and held-out accuracy with the held-out
    call rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(e["step"], float(e[key])) for e in log_history if key in e and e[key] is not None
               and math.isfinite(float(e[key]))]
        return [p[0] for p in pts], [p[1] for p in pts]

    def rolling(xs: list[int], ys: list[float], k: int) -> tuple[list[int], list[float]]:
        return xs, [sum(ys[max(0, i - k + 1):i + 1]) / len(ys[max(0, i - k + 1):i + 1]) for i in range(len(ys))]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    steps, reward = series("reward")
    k = max(5, len(reward) // 5)  # one prompt per step is noisy: the mean over a fifth of the run shows the trend
    axes[0].plot(steps, reward, alpha=0.3, label="per step")
    if len(reward) >= 5:
        axes[0].plot(*rolling(steps, reward, k), label=f"mean of last {k} steps")
    axes[0].set(title="reward (training rollouts)", xlabel="step")
    axes[0].legend()
    for key, label in (("tools/call_frequency", "calls per rollout"),
                       ("rollouts/call_rate_fine", "fine rollouts: share that called"),
                       ("rollouts/call_rate_coarse", "coarse rollouts: share that called")):
        s, v = series(key)
        if s:  # each point: the mean over the last k steps that logged it
            axes[1].plot(*rolling(s, v, max(3, k // 2)), label=label)
    axes[1].set(title=f"tool calls (training rollouts, mean of last {max(3, k // 2)} logged)", xlabel="step",
                ylim=(-0.05, 1.05))
    if axes[1].lines:
        axes[1].legend(fontsize=8)
    if evals:
        e_steps = [e["step"] for e in evals]
        for key, label, style in (("accuracy", "accuracy", "-o"), ("accuracy_fine", "accuracy, fine", "--o"),
                                  ("call_rate_fine", "share called, fine", ":s"),
                                  ("call_rate_coarse", "share called, coarse", ":^")):
            vals = [e.get(key) for e in evals]
            if any(v is not None for v in vals):
                axes[2].plot(e_steps, [math.nan if v is None else v for v in vals], style, label=label)
        axes[2].set(title=f"held out (n={evals[-1]['n']} per point)", xlabel="step", ylim=(-0.05, 1.05))
        axes[2].legend(fontsize=8)
    else:
        axes[2].set(title="held out: no evaluation")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def replot(output_dir: str | Path) -> Path:
    """Redraw ``OUTPUT_DIR/grpo_progress.png`` from the run's files: the latest checkpoint's ``trainer_state.json``
    (TRL's log history) and ``eval/history.jsonl``.

    Raises:
        FileNotFoundError: the folder holds no checkpoint.
    """
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(output_dir)
    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    if last is None:
        raise FileNotFoundError(f"no checkpoint-* folder in {out}: nothing to plot")
    state = json.loads((Path(last) / "trainer_state.json").read_text(encoding="utf-8"))
    return plot_progress(state["log_history"], read_history(out / "eval"), out / PROGRESS_PNG, title=out.name)


class HeldOutEvalCallback(TrainerCallback):
    """Runs `evaluate` before training (step 0, or the resumed step), every ``recipe.eval_every`` steps, and at the
    end, on the main process; redraws the progress plot after each evaluation and at the end."""

    def __init__(self, recipe: RecipeArguments, model: QZoomModel, output_dir: Path, save_policy: Any) -> None:
        self.recipe, self.model, self.save_policy = recipe, model, save_policy
        self.out = output_dir / "eval"
        self.output_dir = output_dir
        self.log_history: list[dict[str, Any]] = []

    def _eval(self, state: Any) -> None:
        if not self.recipe.eval_n or not state.is_world_process_zero:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        evaluate(self.recipe, self.model, self.out, state.global_step, self.save_policy)
        self._plot(state)

    def _plot(self, state: Any) -> None:
        if state.is_world_process_zero:
            title = (f"GRPO {self.recipe.environment} environment, {self.recipe.model} on {self.recipe.train_data}; "
                     f"held out {self.recipe.eval_bench}")
            plot_progress(state.log_history, read_history(self.out), self.output_dir / PROGRESS_PNG, title)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._eval(state)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        every = self.recipe.eval_every
        if every and state.global_step % every == 0 and state.global_step < state.max_steps:
            self._eval(state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._eval(state)
        self._plot(state)
