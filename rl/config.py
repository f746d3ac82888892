"""The GRPO recipe's own settings, parsed the TRL way beside `trl.GRPOConfig`.

A recipe is one YAML file holding both: the fields of `RecipeArguments` (which model, which tool environment, which
data, which rewards, how to evaluate) and any `trl.GRPOConfig` field (batch sizes, steps, learning rate, vLLM,
checkpoints). `parse_recipe` reads it through `trl.TrlParser`, so every field can also be set on the command line:

    qzoom-agent grpo --config configs/grpo/zoomworld_tiny_cpu.yaml --max_steps 20 --learning_rate 1e-5

Dict-valued settings (``rewards``, ``curiosity``) are mappings in YAML and JSON strings on the command line.
"""

from __future__ import annotations

import importlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

ENVIRONMENTS = ("zoom", "crop", "none")
EVAL_AGENTS = {"zoom": "qzoom-tool", "crop": "deepeyes-cached", "none": "plain@576"}
CHAT_TEMPLATES = ("model", "qwen3_vl")
DEFAULT_REWARDS = {"accuracy": 1.0, "format": 0.2}
_JUDGE_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def _mapping(name: str, value: Any, allow_none: bool = False) -> dict[str, Any] | None:
    """``value`` as a dict: a mapping from YAML, or a JSON object given on the command line."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as err:
            raise ValueError(f"{name} must be a mapping (a JSON object on the command line), got {value!r}: "
                             f"{err}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a mapping, got {type(value).__name__}: {value!r}")
    return dict(value)


@dataclass
class RecipeArguments:
    """What a GRPO recipe trains and how it is judged; the rest of the recipe is `trl.GRPOConfig`.

    Attributes:
        model: the starting policy: a bundled model or policy name (``zoomworld-tiny-tool``) or a directory (a base
            model, a policy delta holding ``policy.json``, or a checkpoint directory).
        qzoom: Q-Zoom heads for the internal zoom: "" uses the heads found with the model (bundled or beside it), or
            a heads directory.
        environment: the tool of the rollouts: ``zoom`` (the internal, zero-cost zoom: the box comes from the
            policy's own Q-Zoom heads), ``crop`` (an external crop the policy writes as ``bbox_2d`` text, in
            ``dialect``) or ``none`` (no tool: the ablation).
        dialect: the external crop's dialect (``crop`` only): deepeyes, qwen3vl or pixelreasoner (their calls are
            the Hermes ``<tool_call>`` JSON TRL parses); minio3's ``<grounding>`` is not.
        chat_template: ``model`` (the model's own template) or ``qwen3_vl`` (TRL's, which renders tool images; use
            it for Qwen2.5-VL, whose stock template drops them).
        list_tools: whether the prompt lists the tool schema; None follows the policy (``policy.json``) and lists
            them for any other model.
        view_tokens: cap, in visual tokens, on the image a tool call returns (it counts towards
            ``max_completion_length``).
        train_data: where rows come from: ``zoomworld:hr``, ``zoomworld:doc`` or ``zoomworld:hr+doc`` (generated
            TRAIN-split scenes), a ZoomWorld export folder, a ``datasets`` folder (``save_to_disk``) or a JSONL file
            (``image`` paths relative to it, ``question``, ``answer``; optional ``options``, ``kind``,
            ``target_box``).
        train_size: rows to draw (ZoomWorld) or to keep (0: all of a file or folder).
        train_start: the first ZoomWorld TRAIN index drawn.
        fine_share: share of fine questions among generated ZoomWorld rows; None keeps ZoomWorld's own mix.
        rewards: reward name -> weight (`qzoom_agent.rl.rewards.REWARDS`, ``curiosity``, ``judge_accuracy``).
        curiosity: settings of the ``curiosity`` reward (``target_rate``, ``max_calls``, ``penalty``).
        judge: the scorer of the ``judge_accuracy`` reward as ``package.module:function``, called as
            ``judge(prediction, answer, options) -> float`` (e.g. an LLM judge); "" for none.
        eval_bench: held-out questions for `compare` (ZoomWorld TEST split: never the training scenes).
        eval_n: held-out questions per evaluation (0: no evaluation).
        eval_seed: which held-out questions (`qzoom_agent.bench.runner.question_indices`).
        eval_every: evaluate every this many steps as well as before and after training (0: before and after).
        eval_agent: the `compare` agent that runs the trained policy; "" picks by environment (zoom: qzoom-tool,
            crop: deepeyes-cached, none: plain@576).
        freeze_perception: train only the layers from K up, so the Q-Zoom heads keep reading the layer-K states
            they were trained on (required by the internal zoom).
        threads: torch CPU threads (0: torch's default).
    """

    model: str = "zoomworld-tiny-tool"
    qzoom: str = ""
    environment: str = "zoom"
    dialect: str = "deepeyes"
    chat_template: str = "model"
    list_tools: bool | None = None
    view_tokens: int = 256
    train_data: str = "zoomworld:hr"
    train_size: int = 512
    train_start: int = 9_000_000
    fine_share: float | None = None
    rewards: dict | str | None = field(default_factory=lambda: dict(DEFAULT_REWARDS))
    curiosity: dict | str | None = None
    judge: str = ""
    eval_bench: str = "zoomworld:hr"
    eval_n: int = 100
    eval_seed: int = 1
    eval_every: int = 0
    eval_agent: str = ""
    freeze_perception: bool = True
    threads: int = 0

    def __post_init__(self) -> None:
        self.rewards = _mapping("rewards", self.rewards)
        self.curiosity = _mapping("curiosity", self.curiosity, allow_none=True)
        if not self.rewards:
            raise ValueError("rewards must name at least one reward with its weight")
        for name, weight in self.rewards.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"the weight of reward {name!r} must be a finite number, got {weight!r}")
        if self.judge and not _JUDGE_PATH.match(self.judge):
            raise ValueError(f"judge must be 'package.module:function', got {self.judge!r}")
        if ("judge_accuracy" in self.rewards) != bool(self.judge):
            raise ValueError("the judge_accuracy reward and the judge setting go together: name both or neither")
        if self.environment not in ENVIRONMENTS:
            raise ValueError(f"environment must be one of {ENVIRONMENTS}, got {self.environment!r}")
        if self.chat_template not in CHAT_TEMPLATES:
            raise ValueError(f"chat_template must be one of {CHAT_TEMPLATES}, got {self.chat_template!r}")
        for name in ("view_tokens",):
            _int_at_least(name, getattr(self, name), 1)
        for name in ("train_size", "train_start", "eval_n", "eval_every", "threads"):
            _int_at_least(name, getattr(self, name), 0)
        if self.fine_share is not None and not 0.0 <= self.fine_share <= 1.0:
            raise ValueError(f"fine_share must lie in [0, 1] (or be null), got {self.fine_share!r}")
        if self.environment == "crop":
            from ..tools.dialects import DIALECTS

            if self.dialect not in DIALECTS:
                raise ValueError(f"dialect must be one of {', '.join(DIALECTS)}, got {self.dialect!r}")
            if self.dialect == "minio3":
                raise ValueError("dialect minio3 writes <grounding> calls, which TRL's tool-call parser does not "
                                 "read; use deepeyes, qwen3vl or pixelreasoner under GRPO")
        if self.eval_n:
            from ..bench.runner import parse_bench

            parse_bench(self.eval_bench)
            if self.eval_agent:
                from ..bench.registry import check_agent_name

                check_agent_name(self.eval_agent)

    @property
    def agent(self) -> str:
        """The `compare` agent that evaluates the policy: ``eval_agent``, else by environment (a crop policy in
        another dialect than DeepEyes' runs as ``crop@DIALECT``, which reads its calls)."""
        if self.eval_agent:
            return self.eval_agent
        if self.environment == "crop" and self.dialect != "deepeyes":
            return f"crop@{self.dialect}"
        return EVAL_AGENTS[self.environment]


def load_judge(path: str):
    """The function ``package.module:function`` names.

    Raises:
        ValueError: the module cannot be imported or has no such callable.
    """
    module, _, name = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"judge {path!r} cannot be loaded: {err}") from None
    if not callable(fn):
        raise ValueError(f"judge {path!r} is not callable")
    return fn


def _int_at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def parse_recipe(argv: Sequence[str] | None = None) -> tuple[RecipeArguments, Any]:
    """Parse ``--config YAML`` plus command-line overrides into the recipe's settings and its `trl.GRPOConfig`.

    Raises:
        ValueError: a bad value, with the field's name (TRL's parser exits on unknown or malformed options).
        AcceleratorError: bf16/fp16 asked for on a machine without a GPU.
    """
    from trl import GRPOConfig, TrlParser

    parser = TrlParser((RecipeArguments, GRPOConfig), prog="qzoom-agent grpo",
                       description="GRPO for thinking-with-images policies with the zoom tools in the loop")
    try:
        recipe, grpo = parser.parse_args_and_config(args=list(argv) if argv is not None else None)
    except ValueError as err:
        if "bf16" in str(err) or "fp16" in str(err):  # transformers' check, raised while the config is built
            from .gpu import AcceleratorError

            raise AcceleratorError("this recipe trains in bf16/fp16, which this machine cannot (no CUDA GPU); run "
                                   "it on a GPU node, or pass --use_cpu true --bf16 false to try it here") from None
        raise
    if recipe.environment != "none":
        room = recipe.view_tokens + 64
        if grpo.max_completion_length is not None and grpo.max_completion_length < room:
            raise ValueError(f"max_completion_length {grpo.max_completion_length} leaves no room for one tool "
                             f"result: a crop alone may take view_tokens={recipe.view_tokens} tokens (TRL drops a "
                             f"result that overflows, silently); use at least {room}")
    return recipe, grpo
