"""Stage 1's settings: what to label, how, and how the twig trains (``configs/train/stage1_*.yaml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from ..config import RoiMode
from ..zoomworld import FINE_FAMILIES
from .common import DeviceConfig, OptimConfig, load_section
from .stage1_labels import LabelRule

AUX_NEEDS_T2 = "aux_weight needs twig_T >= 2: with one twig layer the auxiliary loss would read frozen states"


class Stage1Config(OptimConfig):
    """Stage-1 settings (``configs/train/stage1_*.yaml``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field("zoomworld-tiny", description="base model directory or bundled name")
    runtime: DeviceConfig = Field(default_factory=DeviceConfig, description="device and dtype")
    seed: int = Field(0, ge=0, description="torch seed of the head initialisation (the gate's output layer)")
    twig_K: int | None = Field(None, ge=1, description="branch layer; None: mid-depth (QZoomConfig.for_backbone)")
    twig_T: int | None = Field(None, ge=1, description="head layers; None: up to 3")
    budget: tuple[int, int] = Field((256, 576), description="(min, max) visual tokens of the global view")
    samples: int = Field(1500, ge=1, description="training questions to label (ZoomWorld train split)")
    families: dict[str, float] = Field(default_factory=lambda: {f: 1.0 for f in FINE_FAMILIES},
                                       description="ZoomWorld question families of the labelled questions")
    size_range: tuple[int, int] = Field((1024, 2048), description="ZoomWorld canvas side range (px)")
    alphabet: str | None = Field(None, description="tag characters; None: the model's training alphabet")
    label_source: Literal["attention", "box"] = Field("attention", description="self-distilled or ground truth")
    heads: dict[int, list[int]] | Literal["auto"] = Field("auto", description="{layer: [heads]} or auto-ranked")
    top_heads: int = Field(3, ge=1, description="pairs averaged when heads is auto")
    sink_heads: dict[int, list[int]] | None = Field(None, description="{layer: [heads]} whose attention marks sinks")
    rank_samples: int = Field(64, ge=1, description="questions used to rank the heads")
    rule: LabelRule = Field(default_factory=LabelRule, description="pseudo-label coefficients")
    max_new_tokens: int = Field(8, ge=1, description="decoding budget of the answers the labels come from")
    label_overlays: int = Field(8, ge=0, description="PNG overlays of the first labels")
    epochs: float = Field(2.0, gt=0, description="passes over the labelled questions (sets steps when steps=0)")
    eval_items: int = Field(100, ge=1, description="val questions of the before/after evaluation")
    save_every: int = Field(100, ge=1, description="labels cached every this many samples")
    checkpoint_every: int = Field(200, ge=1, description="steps between checkpoints")
    threads: int = Field(2, ge=1, description="torch CPU threads")
    pos_weight: float = Field(1.0, gt=0, description="BCE weight of foreground tokens (1: the paper's plain BCE); "
                              "raise it when a target covers a few tokens of hundreds")
    rank_weight: float = Field(0.0, ge=0, description="weight of an added listwise loss (softmax cross-entropy over "
                               "the view's tokens, foreground as the target); 0: BCE only, as in the paper")
    aux_weight: float = Field(0.0, ge=0, description="weight of an auxiliary loss on the twig's own state, "
                              "passed to run_stage1 as aux= (ZoomWorld's colour probes: recipes/zoomworld_tiny/"
                              "twig_aux.py); needs twig_T >= 2; 0: off, as in the paper")
    roi_mode: RoiMode | None = Field(
        None, description="box rule of the trained adapter and of the evaluation (QZoomConfig.roi_mode); None: the "
        "released rule of the family (roi_official)")
    roi_peak_ratio: float = Field(0.3, gt=0, le=1, description="peak mode's neighbourhood ratio")
    roi_min_side: float = Field(1.0, ge=0, le=64, description="minimum box side in global-view tokens for this "
                                "project's rules (QZoomConfig.roi_min_side_tokens); the released rule uses 28 px")
    roi_tokens: tuple[int, int] | None = Field(None, description="(min, max) visual tokens of the RoI crop in the "
                                               "adapter (QZoomConfig.roi_min/max_tokens); None: the global budget")
    cache_features: bool = Field(True, description="keep each question's frozen layer-K inputs in memory after "
                                 "its first epoch (about 1.5 MB each at 576 tokens): later epochs skip the scene "
                                 "rendering and the frozen prefill")
    steps: int = Field(0, ge=0, description="optimiser steps; 0: epochs * samples / batch_size")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(20, ge=0)
    batch_size: int = Field(8, ge=1, description="questions per optimiser step")

    @model_validator(mode="after")
    def _check(self) -> Stage1Config:
        if self.budget[0] > self.budget[1] or self.budget[0] < 1:
            raise ValueError(f"budget must be (min, max) with 1 <= min <= max, got {self.budget}")
        if self.roi_tokens is not None and not 1 <= self.roi_tokens[0] <= self.roi_tokens[1]:
            raise ValueError(f"roi_tokens must be (min, max) with 1 <= min <= max, got {self.roi_tokens}")
        if self.aux_weight > 0 and self.twig_T == 1:
            raise ValueError(AUX_NEEDS_T2)
        if set(self.families) - set(FINE_FAMILIES) - {"color", "shape"} or sum(self.families.values()) <= 0:
            raise ValueError(f"families must weight ZoomWorld families with a positive sum, got {self.families}")
        return self

    @property
    def total_steps(self) -> int:
        return self.steps or max(1, round(self.epochs * self.samples / self.batch_size))

    def lr_factor(self, step: int) -> float:  # the schedule spans total_steps, not the raw ``steps`` field
        return OptimConfig.lr_factor(self.model_copy(update={"steps": self.total_steps}), step)


def load_stage1_config(path: str | Path) -> Stage1Config:
    """Read the ``stage1:`` section of a YAML file; raises ValueError naming the file on bad content."""
    return load_section(path, "stage1", Stage1Config, "configs/train/stage1_zoomworld_tiny.yaml")


