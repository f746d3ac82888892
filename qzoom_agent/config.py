"""QZoomConfig: where the Q-Zoom branches attach, when to zoom, and the visual-token budgets."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# the box rules: "official" is roi_official's (the released rule of each family), the rest roi.propose_boxes'
RoiMode = Literal["official", "enclosing", "components", "peak"]

# Paper defaults (K, T) per released backbone; tiny models pick their own.
DEFAULT_BRANCH = {
    "Qwen2.5-VL-3B": (24, 3),
    "Qwen2.5-VL-7B": (18, 3),
    "Qwen3-VL-4B": (24, 3),
    "LLaVA-1.5-7B": (15, 3),
}
MIN_TOKENS_FLOOR = 256  # a budget of b visual tokens means (min(256, b), b)


def budget_for(tokens: int) -> tuple[int, int]:
    """The ``(min_tokens, max_tokens)`` of a view at ``tokens`` visual tokens: at most ``tokens``, and at least
    256 of them when the image allows (fewer when ``tokens`` itself is below 256). Comparison agents and the
    stage-3 ladder use it, so "the plain model at 1024 tokens" means one thing everywhere.

    Examples:
        >>> budget_for(4096), budget_for(64)
        ((256, 4096), (64, 64))
    """
    return min(MIN_TOKENS_FLOOR, tokens), tokens


class QZoomConfig(BaseModel):
    """Settings of the Q-Zoom heads and of gated two-pass inference.

    The twig (SD-RPN) and the gate both branch off the hidden state that enters decoder layer ``twig_K`` and
    each holds ``twig_T`` decoder layers initialised from base layers ``twig_K .. twig_K + twig_T - 1``.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    twig_K: int = Field(ge=1, description="Branch layer K: the heads read the input of base layer K (0-indexed).")
    twig_T: int = Field(ge=1, description="Decoder layers in each head; the twig's last one contributes only q/k.")
    gate_threshold: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Zoom when the gate's sigmoid score is at least this."
    )
    roi_threshold: float = Field(
        default=0.15, gt=0.0, lt=1.0, description="Foreground threshold on the blurred RoI probabilities."
    )
    min_tokens: int = Field(default=256, ge=1, description="Minimum visual tokens of the global (first-pass) view.")
    max_tokens: int = Field(default=576, ge=1, description="Maximum visual tokens of the global view.")
    roi_min_tokens: int | None = Field(
        default=None, ge=1, description="Minimum visual tokens of the RoI crop; both None: the call's global budget."
    )
    roi_max_tokens: int | None = Field(
        default=None, ge=1, description="Maximum visual tokens of the RoI crop; both None: the call's global budget."
    )
    reuse_src_pos: bool | None = Field(
        default=None,
        description="True: RoI positions interpolate the source positions of the cells its box came from; False: "
        "plain positions (two-image M-RoPE on Qwen, contiguous on LLaVA); None: by family (True on Qwen, the "
        "paper's alignment; False on LLaVA, as SD-RPN). Official checkpoints set it from their config.",
    )
    sink_min_tokens: int = Field(
        default=256, ge=0, description="Mask the attention-sink corner of the RoI map when it has more tokens."
    )
    roi_mode: RoiMode | None = Field(
        default=None,
        description="The box rule: 'official' (the released rule of each family: roi_official), or this "
        "project's 'enclosing', 'components' or 'peak' (roi.propose_boxes); None: 'official'.",
    )
    roi_peak_ratio: float = Field(
        default=0.3, gt=0.0, le=1.0, description="Peak mode: share of the peak probability a neighbour needs."
    )
    roi_query: Literal["prompt", "stem"] = Field(
        default="prompt",
        description="The twig's query token: the last token of the whole prompt (the paper), or of the prompt "
        "built from the question's stem, its text before any answer options (query.question_stem). A stem query "
        "reruns only the question's tokens below K, on the image prefix's cache; the gate and the answer still "
        "see the whole prompt.",
    )
    roi_multi_head: bool = Field(
        default=True,
        description="Twig score: the head-averaged q.k / sqrt(d) (True, as every released checkpoint trained); "
        "False: the unscaled dot product over all heads (the released modules' default when the key is absent).",
    )
    twig_norm: bool = Field(
        default=False, description="The twig normalises its state before the last layer's q/k (SD-RPN's twig_norm)."
    )
    twig_rope: bool = Field(
        default=True, description="Rotary embeddings on the twig's q/k (Q-Zoom); SD-RPN's LLaVA twig applies none."
    )
    gate: bool = Field(
        default=True,
        description="The heads hold a trained gate; False (a stage-1/2 or SD-RPN checkpoint): mode 'auto' runs the "
        "twig on every question, as the released code does without a gate.",
    )
    roi_min_side_tokens: float = Field(
        default=1.0, ge=0.0, le=64.0,
        description="Minimum RoI box side in global-view tokens; the box grows around its centre (the paper: one "
        "token, 28 px on Qwen2.5).",
    )

    @model_validator(mode="after")
    def _check_budgets(self) -> QZoomConfig:
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) is larger than max_tokens ({self.max_tokens}); lower min_tokens"
            )
        lo, hi = self.roi_budget
        if lo > hi:
            raise ValueError(f"roi_min_tokens ({lo}) is larger than roi_max_tokens ({hi})")
        return self

    @classmethod
    def for_backbone(cls, num_layers: int, min_branch_layer: int = 1, **fields) -> QZoomConfig:
        """A config for a backbone without released heads: K at mid-depth (at least ``min_branch_layer``) and up
        to three head layers, as in the paper's defaults."""
        k = max(min_branch_layer, num_layers // 2)
        return cls(twig_K=k, twig_T=min(3, num_layers - k), **fields)

    @property
    def roi_budget(self) -> tuple[int, int]:
        """(min, max) visual tokens of the RoI crop."""
        return (self.roi_min_tokens or self.min_tokens, self.roi_max_tokens or self.max_tokens)

    def check_backbone(self, num_layers: int, min_branch_layer: int) -> None:
        """Raise a ValueError if K and T do not fit a backbone of ``num_layers`` decoder layers."""
        if self.twig_K < min_branch_layer:
            raise ValueError(
                f"twig_K={self.twig_K} is too early for this backbone: the branch needs K >= {min_branch_layer} "
                "(Qwen3-VL adds deepstack features after its first layers)"
            )
        if self.twig_K + self.twig_T > num_layers:
            raise ValueError(
                f"twig_K + twig_T = {self.twig_K + self.twig_T} exceeds the {num_layers} decoder layers; "
                "lower twig_K or twig_T"
            )
