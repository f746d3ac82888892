"""Settings of the recipe's answer phases (2: ``answer:``, 3: ``tiles:``, 4: ``grounding:`` builds on them) and
reading them from the recipe's YAML."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from ...train.common import OptimConfig, load_section
from .answer_data import AnswerDataConfig
from .dense_probe import LABEL_KINDS
from .model import ZoomWorldTinySizes
from .warmup import load_train_config

# phase number -> (its folder, the folder it starts from, its YAML section)
PHASES: dict[int, tuple[str, str, str]] = {2: ("phase2", "phase1", "answer"), 3: ("phase3", "phase2", "tiles"),
                                          4: ("phase4", "phase3", "grounding")}
FOCUS_LAYERS = (2, 3)  # the focus loss's default layers: mid-depth onwards of the 4-layer zoomworld-tiny LM
KEEP_LAYERS = (1, 2, 3)  # the keep loss's default: every decoder layer input after the embeddings


class AnswerConfig(OptimConfig):
    """Phase-2 settings (the ``answer:`` section of ``configs/recipes/zoomworld_tiny/base.yaml``)."""

    vision_lr_scale: float = Field(1.0, ge=0.0, description="LR multiplier of the warmed-up vision tower and probe; "
                                   "0 freezes both (no backward through the tower)")
    aux_weight: float = Field(1.0, ge=0.0, description="weight of the dense probe loss on examples with targets")
    aux_weights: dict[str, float] = Field(
        default_factory=lambda: {"present": 1.0, "char": 1.0, "colour": 1.0},
        description="weight per probe target kind (present, char, colour, shape, index); shape and index add "
                    "their heads to the probe")
    aux_until: float = Field(0.85, ge=0.0, le=1.0, description="fraction of the run after which aux weight is 0")
    focus_weight: float = Field(0.0, ge=0.0, description="weight of the focus loss (`focus`): the answer "
                                "positions' attention share on the asked object's tokens; 0 turns it off")
    focus_layers: list[int] = Field(default_factory=lambda: list(FOCUS_LAYERS), min_length=1,
                                    description="decoder layers (0-indexed) whose head-averaged attention the focus "
                                    "loss supervises")
    keep_weight: float = Field(0.0, ge=0.0, description="weight of the keep loss (`keep`): the tower probe, "
                               "frozen, must still read the targets off the LM's image-token states; 0 turns it off")
    keep_layers: list[int] = Field(default_factory=lambda: list(KEEP_LAYERS), min_length=1,
                                   description="decoder layers whose inputs the keep loss reads (>= 1)")
    data: AnswerDataConfig = Field(default_factory=AnswerDataConfig, description="example drawing")
    checkpoint_every: int = Field(250, ge=1, description="steps between checkpoints")
    eval_every: int = Field(250, ge=1, description="steps between held-out evaluations")
    eval_items: int = Field(100, ge=1, description="questions per held-out set")
    threads: int = Field(2, ge=1, description="torch CPU threads")

    @model_validator(mode="after")
    def _check(self) -> AnswerConfig:
        if set(self.aux_weights) - set(LABEL_KINDS) or any(w < 0 for w in self.aux_weights.values()):
            raise ValueError(f"aux_weights takes non-negative weights of {LABEL_KINDS}, got {self.aux_weights}")
        if any(layer < 1 for layer in self.keep_layers):
            raise ValueError(f"keep_layers are decoder layers from 1 on (layer 0's input is the tower's own output), "
                             f"got {self.keep_layers}")
        if self.keep_weight > 0 and not (self.data.scene_aux or self.data.mix.get("dense", 0) > 0):
            raise ValueError("keep_weight needs views with per-token targets: set data.scene_aux or a dense share")
        if any(layer < 0 for layer in self.focus_layers):
            raise ValueError(f"focus_layers are 0-indexed decoder layers, got {self.focus_layers}")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps})")
        if self.steps * self.batch_size >= 10**6:  # train indices stay below eval's COARSE_OFFSET-sized ranges
            raise ValueError("steps * batch_size must stay below 1e6 examples")
        return self

    def aux_at(self, step: int) -> float:
        """Auxiliary loss weight at optimiser step ``step``."""
        return self.aux_weight if step < self.aux_until * self.steps else 0.0



def load_phase_section(
    path: str | Path, section: str, cls: type[AnswerConfig]
) -> tuple[ZoomWorldTinySizes, AnswerConfig, str]:
    """Read ``model:``, the ``section`` mapping (validated as ``cls``) and phase 1's alphabet from a recipe YAML.

    Raises:
        ValueError: one line saying which file and field is wrong.
    """
    sizes, warm = load_train_config(path)
    cfg = load_section(path, section, cls, "configs/recipes/zoomworld_tiny/base.yaml")
    if cfg.keep_weight > 0 and max(cfg.keep_layers) >= sizes.layers:
        raise ValueError(f"invalid {section} config {path}: keep_layers {cfg.keep_layers} exceed the model's "
                         f"{sizes.layers} decoder layers")
    if cfg.focus_weight > 0 and max(cfg.focus_layers) >= sizes.layers:
        raise ValueError(f"invalid {section} config {path}: focus_layers {cfg.focus_layers} exceed the model's "
                         f"{sizes.layers} decoder layers")
    return sizes, cfg, warm.crops.alphabet


def load_answer_config(path: str | Path, phase: int = 2) -> tuple[ZoomWorldTinySizes, AnswerConfig, str]:
    """Read ``model:``, the phase's section (``answer:`` or ``tiles:``) and the phase-1 alphabet
    (``warmup.crops.alphabet``) from a training YAML.

    Returns:
        ``(sizes, answer config, alphabet)``; the alphabet is ``answer.data.alphabet`` when set.

    Raises:
        ValueError: one line saying which file and field is wrong.
    """
    sizes, cfg, alphabet = load_phase_section(path, PHASES[phase][2], AnswerConfig)
    return sizes, cfg, cfg.data.alphabet or alphabet
