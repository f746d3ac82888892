"""``qzoom-agent grpo``: one YAML recipe -> TRL's `GRPOTrainer` with a zoom environment, rewards and evaluation.

    qzoom-agent grpo --config configs/grpo/zoomworld_tiny_cpu.yaml [--max_steps 20 ...]

The trainer is TRL's own, unpatched: the recipe only chooses its ``model`` (the policy's HF model, which is also the
model the internal zoom perceives with), ``processing_class`` (`processor.grpo_processor`), ``environment_factory``
(`environments.build_environment`), ``reward_funcs`` and ``reward_weights`` (`rewards.build_rewards`) and a
callback (`evaluate.HeldOutEvalCallback`). Checkpoints are TRL's (``save_strategy``, ``save_steps``); a run resumes
with ``--resume_from_checkpoint true`` (the latest checkpoint in ``output_dir``) or a checkpoint path, carrying on
the step counter, the optimizer and the scheduler. The policy's trained layers are also written as a policy delta
(``OUTPUT_DIR/policy``), which `compare --policy` and the agent loop load.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..model import QZoomModel
    from .config import RecipeArguments

logger = logging.getLogger(__name__)

POLICY_DIR = "policy"


def list_tools_for(recipe: RecipeArguments, model: QZoomModel) -> bool:
    """Whether prompts list the tools: the recipe's setting, else as the policy was trained (listed for a model
    that is no policy)."""
    if recipe.list_tools is not None:
        return recipe.list_tools
    return model.policy.list_tools if model.policy is not None else True


def policy_writer(recipe: RecipeArguments, start: QZoomModel) -> Any:
    """``save(model, directory) -> base``: writes the trained layers of ``model`` as a policy delta on the starting
    model's base, with the prompt settings the recipe trains with."""
    from ..policy import PolicyConfig, above_k_prefixes, write_policy

    base = start.policy.base if start.policy is not None else str(start.path)
    system = start.policy.system if start.policy is not None else None
    list_tools = list_tools_for(recipe, start)
    call = "crop" if recipe.environment == "crop" else "zoom"
    # what freeze_perception leaves trainable; without it every tensor trains ("" prefixes them all)
    prefixes = above_k_prefixes(start) if recipe.freeze_perception else [""]

    def save(model: QZoomModel, directory: Path) -> str:
        cfg = PolicyConfig(base=base, system=system, list_tools=list_tools, call=call,
                           frozen_below=model.config.twig_K if recipe.freeze_perception else 0, trained=prefixes,
                           notes=f"GRPO ({recipe.environment} environment) from {recipe.model} on "
                                 f"{recipe.train_data}, rewards {recipe.rewards}")
        write_policy(model.adapter.model, directory, cfg)
        return base

    return save


def _rollout_stats(completions: list, environments: list | None = None, kind: list | None = None,
                   answer: list | None = None, options: list | None = None, log_metric: Any = None,
                   **kwargs: Any) -> list[float]:
    """Logs, per question kind, the share of rollouts that called a tool and their accuracy
    (``rollouts/call_rate_fine``, ``rollouts/accuracy_coarse``, ...): one prompt per step mixes kinds, so the
    reward alone cannot tell a policy that answers worse from a batch of harder questions. Weight 0: it does not
    enter the reward."""
    if log_metric is not None and kind is not None:
        from .rewards import accuracy, call_cost

        calls = [-c for c in call_cost(completions, environments)]
        right = accuracy(completions, answer, options) if answer is not None else [None] * len(completions)
        for which in ("fine", "coarse"):
            picked = [(c, r) for c, r, k in zip(calls, right, kind, strict=True) if k == which]
            if picked:
                log_metric(f"rollouts/call_rate_{which}", sum(c > 0 for c, _ in picked) / len(picked))
                scored = [r for _, r in picked if r is not None]
                if scored:
                    log_metric(f"rollouts/accuracy_{which}", sum(scored) / len(scored))
    return [0.0] * len(completions)


VISION_PLACEHOLDERS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<image>")


def placeholder_suppression(model: QZoomModel, args: Any) -> dict[str, list[int]]:
    """``generation_kwargs`` that keep the policy from sampling the vision placeholder tokens (transformers
    generation; {} under vLLM, whose sampling parameters have no ``suppress_tokens``).

    Those ids mark where the processor puts visual tokens. TRL suppresses the image token only; a sampled
    ``<|video_pad|>`` (a real risk at temperature 1 on a small vocabulary) is read as a video that has no frames, and
    the next forward's M-RoPE index fails (``'NoneType' object is not an iterator`` in ``get_rope_index``), which
    stopped a CPU run at step 35. The user's own ``suppress_tokens`` are kept.
    """
    if getattr(args, "use_vllm", False):
        return {}
    vocab = model.adapter.tokenizer.get_vocab()
    ids = {vocab[t] for t in VISION_PLACEHOLDERS if t in vocab}
    config = model.adapter.model.config
    ids |= {i for i in (getattr(config, "image_token_id", None), getattr(config, "video_token_id", None))
            if isinstance(i, int)}
    own = (args.generation_kwargs or {}).get("suppress_tokens") or []
    return {"suppress_tokens": sorted(ids | set(own))}


def load_policy(recipe: RecipeArguments, device: str) -> QZoomModel:
    """The starting policy with its Q-Zoom heads, on ``device``."""
    import torch

    from ..model import QZoomModel

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    qzoom: Any = recipe.qzoom or None
    return QZoomModel.from_pretrained(recipe.model, qzoom, device=device, dtype=dtype)


def build_trainer(recipe: RecipeArguments, args: Any,
                  extra_rewards: Sequence[tuple[Any, float]] = ()) -> tuple[Any, QZoomModel]:
    """TRL's `GRPOTrainer` for the recipe, and the policy (whose ``adapter.model`` the trainer trains).

    Args:
        recipe: the recipe's settings.
        args: its `trl.GRPOConfig` (``reward_weights`` is set here, from ``recipe.rewards``).
        extra_rewards: ``(reward function, weight)`` pairs added to the recipe's rewards (Python API: any TRL
            reward function, e.g. a task-specific scorer).

    Raises:
        ValueError, RuntimeError: a setting that cannot work (with what to change).
    """
    import trl

    from ..loading import resolve_model_path, trained_alphabet
    from ..tools.trl_env import freeze_perception
    from .config import load_judge
    from .data import load_rows, prompt_messages
    from .environments import build_environment
    from .evaluate import HeldOutEvalCallback
    from .gpu import check_accelerator, check_zero_stage
    from .processor import grpo_processor, view_size_of
    from .rewards import build_rewards

    device = check_accelerator(args)
    check_zero_stage()
    model = load_policy(recipe, device)
    if recipe.freeze_perception:
        freeze_perception(model)
    elif recipe.environment == "zoom":
        raise ValueError("the internal zoom needs freeze_perception: true (the heads read the layer-K states the "
                         "policy would otherwise move)")
    processor = grpo_processor(model, chat_template=recipe.chat_template, list_tools=list_tools_for(recipe, model))
    env = build_environment(recipe, model, view_size_of(model))

    system, instruction = (model.policy.system if model.policy is not None else None), None
    if recipe.environment == "crop" and model.policy is None:
        from ..bench.deepeyes_agent import trained_on_zoomworld
        from ..tools.dialects import get_dialect

        if not trained_on_zoomworld(model):  # a model our recipe did not train gets the reference prompt
            d = get_dialect(recipe.dialect)
            system, instruction = d.system_prompt(), d.instruction()
    base_path = model.path if model.path is not None else resolve_model_path(recipe.model)
    rows = load_rows(recipe.train_data, cache=Path(args.output_dir) / "data", size=recipe.train_size,
                     start=recipe.train_start, alphabet=trained_alphabet(base_path), fine_share=recipe.fine_share)
    rows = rows.map(lambda q: {"prompt": prompt_messages(q, system=system, instruction=instruction)},
                    input_columns=["question"], desc="prompts")

    judge = load_judge(recipe.judge) if recipe.judge else None
    funcs, weights = build_rewards(recipe.rewards, num_generations=args.num_generations, curiosity=recipe.curiosity,
                                   judge=judge)
    args.generation_kwargs = {**(args.generation_kwargs or {}), **placeholder_suppression(model, args)}
    funcs = [*funcs, *(fn for fn, _ in extra_rewards), _rollout_stats]
    weights = [*weights, *(float(w) for _, w in extra_rewards), 0.0]
    args.reward_weights = weights
    if args.beta > 0:
        _save_reference(model, Path(args.output_dir) / "reference")
    save = policy_writer(recipe, model)
    callback = HeldOutEvalCallback(recipe, model, Path(args.output_dir), save)
    trainer = trl.GRPOTrainer(model=model.adapter.model, reward_funcs=funcs, args=args, train_dataset=rows,
                              processing_class=processor, environment_factory=env, callbacks=[callback])
    return trainer, model


def _save_reference(model: QZoomModel, directory: Path) -> None:
    """``beta > 0``: TRL loads the reference model from ``name_or_path``, so the starting policy (a base plus a
    delta, which no ``from_pretrained`` reads) is written there whole."""
    hf = model.adapter.model
    if not (directory / "config.json").is_file():
        hf.save_pretrained(directory)
    hf.config.name_or_path = str(directory)
    hf.name_or_path = str(directory)


def resume_point(args: Any) -> str | bool | None:
    """What ``trainer.train(resume_from_checkpoint=...)`` takes: a checkpoint path, True for the latest one in
    ``output_dir``, or None.

    Raises:
        ValueError: "true" with no checkpoint in ``output_dir``, or a path that does not exist.
    """
    value = args.resume_from_checkpoint
    if value in (None, "", "false", "False", False):
        return None
    if value in ("true", "True", True, "last", "latest"):
        from transformers.trainer_utils import get_last_checkpoint

        if not os.path.isdir(args.output_dir) or get_last_checkpoint(args.output_dir) is None:
            raise ValueError(f"--resume_from_checkpoint {value}: no checkpoint-* folder in {args.output_dir}")
        return True
    if not os.path.isdir(value):
        raise ValueError(f"--resume_from_checkpoint: {value} is not a directory")
    return value


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse the recipe, train, write the final policy and plot; returns a summary of the run."""
    import torch

    from .config import parse_recipe
    from .evaluate import read_history

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # environment_factory is marked experimental in TRL 1.16
    recipe, args = parse_recipe(argv)
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    resume = resume_point(args)
    trainer, model = build_trainer(recipe, args)
    trainer.train(resume_from_checkpoint=resume)
    out = Path(args.output_dir)
    if trainer.is_world_process_zero():
        policy_writer(recipe, model)(model, out / POLICY_DIR)
    logs = trainer.state.log_history
    rewards = [e["reward"] for e in logs if "reward" in e]
    return {"output_dir": str(out), "steps": trainer.state.global_step, "policy": str(out / POLICY_DIR),
            "reward_first": rewards[:10], "reward_last": rewards[-10:], "evaluations": read_history(out / "eval")}
