"""The GRPO recipe end to end on the bundled model: two real `trl.GRPOTrainer` steps with the internal zoom (the tool
is called, its crop reaches the training forward, the trained layers move and the perception does not), a run
stopped after a checkpoint and resumed, and the command line's errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from qzoom_agent.rl.config import parse_recipe
from qzoom_agent.rl.recipe import build_trainer, resume_point, run
from transformers import TrainerCallback

from qzoom_agent.cli import main

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytestmark = pytest.mark.usefixtures("one_thread")

CPU_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "grpo" / "zoomworld_tiny_cpu.yaml"


def _argv(out: Path, *extra: str) -> list[str]:
    """The CPU recipe, shrunk: fine questions only (the bundled policy calls zoom on them), no held-out run."""
    return ["--config", str(CPU_RECIPE), "--output_dir", str(out), "--train_size", "4", "--fine_share", "1.0",
            "--eval_n", "0", "--report_to", "none", "--learning_rate", "1e-4", *extra]


def by_position(completions, **kwargs):
    """A test reward that differs within every group (the recipe's rewards can tie on two steps of a frozen-base
    policy, and a group of equal rewards has no advantage, so no gradient)."""
    return [0.1 * i for i in range(len(completions))]


def test_two_grpo_steps_call_the_internal_zoom_and_train_on_its_crop(tmp_path):
    recipe, args = parse_recipe(_argv(tmp_path, "--max_steps", "2", "--save_strategy", "no"))
    trainer, model = build_trainer(recipe, args, extra_rewards=[(by_position, 1.0)])
    hf = model.adapter.model
    assert trainer.model is hf  # the policy trained is the model whose heads perceive
    k = model.config.twig_K
    before = {n: p.detach().clone() for n, p in hf.named_parameters()}
    heads_before = {n: p.detach().clone() for n, p in model.heads.named_parameters()}
    trainable = {n for n, p in hf.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(tuple(f"model.language_model.layers.{i}." for i in range(k, 99)))
                             or n.startswith(("model.language_model.norm.", "lm_head.")) for n in trainable)

    forwards = []

    def spy(module, args_, kwargs):
        if torch.is_grad_enabled():
            ids, thw = kwargs.get("input_ids"), kwargs.get("image_grid_thw")
            forwards.append((ids.shape[0], 0 if thw is None else thw.shape[0]))

    handle = hf.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        trainer.train()
    finally:
        handle.remove()
    # the policy cannot sample a vision placeholder (a sampled <|video_pad|> broke a run's M-RoPE index)
    vocab = model.adapter.tokenizer.get_vocab()
    assert {vocab["<|video_pad|>"], vocab["<|image_pad|>"]} <= set(trainer.generation_config.suppress_tokens)
    logs = {key: v for entry in trainer.state.log_history for key, v in entry.items()}
    # the policy called the zoom tool in its rollouts, and the calls ran (no refusal, no exception)
    assert logs["tools/call_frequency"] > 0 and logs["tools/failure_frequency"] == 0
    assert logs["rollouts/call_rate_fine"] > 0 and logs["reward_std"] > 0 and "rollouts/accuracy_fine" in logs
    # the crop reached the training forward: more images than rows (each row's image, plus a crop per call)
    assert forwards and any(images > rows for rows, images in forwards), forwards
    after = dict(hf.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in trainable), "no trained parameter moved"
    assert all(torch.equal(before[n], after[n]) for n in before if n not in trainable)  # the perception's input
    assert all(torch.equal(heads_before[n], p) for n, p in model.heads.named_parameters())


class _StopAt(TrainerCallback):
    """Stops training after ``step`` (after that step's checkpoint is written), as an interruption would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _adam_steps(trainer) -> set[int]:
    return {int(s["step"]) for s in trainer.optimizer.state.values() if "step" in s}


def test_a_stopped_run_resumes_after_its_checkpoint_without_losing_or_repeating_a_step(tmp_path):
    argv = _argv(tmp_path, "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1",
                 "--lr_scheduler_type", "linear")
    recipe, args = parse_recipe(argv)
    first, _ = build_trainer(recipe, args)
    first.add_callback(_StopAt(2))
    first.train()
    assert first.state.global_step == 2 and (tmp_path / "checkpoint-2").is_dir()
    assert _adam_steps(first) == {2}
    lr_at_2 = first.lr_scheduler.get_last_lr()[0]

    recipe, args = parse_recipe([*argv, "--resume_from_checkpoint", "true"])
    assert resume_point(args) is True
    second, _ = build_trainer(recipe, args)
    second.train(resume_from_checkpoint=True)
    steps = [e["step"] for e in second.state.log_history if "loss" in e]
    assert second.state.global_step == 3
    assert steps == [1, 2, 3]  # the history carries on from the checkpoint: step 3 once, 1-2 not rerun
    assert _adam_steps(second) == {3}  # Adam's step count went on from the checkpoint's optimizer state
    # the linear schedule went on from where it stopped (a fresh schedule would restart at the peak)
    assert second.lr_scheduler.get_last_lr()[0] < lr_at_2


def test_run_writes_the_policy_the_agent_loop_loads(tmp_path):
    from qzoom_agent.model import QZoomModel

    # beta > 0: TRL builds the reference model from name_or_path, so the start is written whole for it
    summary = run(_argv(tmp_path, "--max_steps", "1", "--save_strategy", "no", "--beta", "0.04"))
    assert summary["steps"] == 1 and Path(summary["policy"], "policy.json").is_file()
    assert (tmp_path / "reference" / "config.json").is_file()
    policy = QZoomModel.from_pretrained(summary["policy"])
    assert policy.policy is not None and policy.policy.call == "zoom" and policy.heads is not None
    assert policy.policy.base == "zoomworld-tiny" and policy.policy.frozen_below == policy.config.twig_K


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    _, args = parse_recipe(_argv(tmp_path, "--resume_from_checkpoint", "true"))
    with pytest.raises(ValueError, match="no checkpoint"):
        resume_point(args)


@pytest.mark.parametrize(("extra", "message"), [
    (["--use_cpu", "false"], "no CUDA GPU is visible"),
    (["--use_vllm", "true"], "vllm"),
    (["--environment", "teleport"], "environment must be one of"),
    (["--rewards", '{"accurcy": 1}'], "accurcy"),
])
def test_cli_stops_at_once_with_a_clear_message(tmp_path, capsys, extra, message):
    if "--use_cpu" in extra and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    code = main(["grpo", *_argv(tmp_path, *extra)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not any(tmp_path.glob("checkpoint-*"))
