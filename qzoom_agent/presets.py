"""The released evaluation settings per task: RoI threshold, gate threshold and the global view's token budget.

The released checkpoints do not carry these; their evaluation scripts set them per benchmark. A preset applies them
by name: ``QZoomModel.from_pretrained(path, preset="hr")`` or ``qzoom-agent ask ... --preset hr``. The values come
from the released scripts for Qwen2.5-VL-7B and Qwen3-VL-4B; SD-RPN's LLaVA evaluation uses its module's RoI
threshold (0.15) at its fixed 576-token view for every task and has no gate.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """One task's settings.

    Attributes:
        roi_threshold: foreground threshold of the box rule.
        gate_threshold: zoom when the gate's score is at least this (None: leave the checkpoint's).
        min_tokens, max_tokens: the global view's visual-token budget (None: leave the config's).
    """

    roi_threshold: float
    gate_threshold: float | None
    min_tokens: int | None
    max_tokens: int | None

    def overrides(self) -> dict[str, float | int]:
        """The QZoomConfig fields this preset sets."""
        fields = {"roi_threshold": self.roi_threshold, "gate_threshold": self.gate_threshold,
                  "min_tokens": self.min_tokens, "max_tokens": self.max_tokens}
        return {k: v for k, v in fields.items() if v is not None}


_DOC, _HR = (256, 576), (512, 4096)
# task -> family -> preset; group names (doc, chart, ocr, hr) are aliases of one task each
PRESETS: dict[str, dict[str, Preset]] = {
    "textvqa": {"qwen2_5_vl": Preset(0.15, 0.05, *_DOC), "qwen3_vl": Preset(0.15, 0.10, *_DOC)},
    "infovqa": {"qwen2_5_vl": Preset(0.15, 0.05, *_DOC), "qwen3_vl": Preset(0.15, 0.10, *_DOC)},
    "chartqa": {"qwen2_5_vl": Preset(0.125, 0.05, *_DOC), "qwen3_vl": Preset(0.15, 0.10, *_DOC)},
    "docvqa": {"qwen2_5_vl": Preset(0.125, 0.05, *_DOC), "qwen3_vl": Preset(0.15, 0.10, *_DOC)},
    "ocrbench": {"qwen2_5_vl": Preset(0.15, 0.05, 128, 576), "qwen3_vl": Preset(0.125, 0.10, 128, 576)},
    "vstar": {"qwen2_5_vl": Preset(0.03, 0.02, *_HR), "qwen3_vl": Preset(0.10, 0.025, *_HR)},
    "mme-realworld": {"qwen2_5_vl": Preset(0.04, 0.02, *_HR), "qwen3_vl": Preset(0.10, 0.025, *_HR)},
    "hrbench": {"qwen2_5_vl": Preset(0.04, 0.02, *_HR), "qwen3_vl": Preset(0.10, 0.025, *_HR)},
}
ALIASES = {"doc": "textvqa", "chart": "chartqa", "ocr": "ocrbench", "hr": "hrbench"}
LLAVA = Preset(0.15, None, None, None)  # SD-RPN: one setting for every task; the view is always 576 tokens


# The released trade-off sweep (examples/multimax_tradeoff, Qwen2.5-VL) switches every task to one threshold set,
# its "Tab2" set, for global views of 2048 tokens and more: RoI 0.04 and gate 0.02, with RoI 0.03 on V*.
TAB2_FROM = 2048
TAB2 = {"roi_threshold": 0.04, "gate_threshold": 0.02}
TAB2_VSTAR_ROI = 0.03


def thresholds_at(name: str, family: str, tokens: int) -> dict[str, float]:
    """The RoI and gate thresholds of task ``name`` at a ``tokens``-token global view, as the released trade-off
    sweep sets them: the task's preset below `TAB2_FROM` tokens, the "Tab2" set from there on (Qwen2.5-VL only; other
    families keep their preset, since their scripts define no such set).

    Examples:
        >>> thresholds_at("docvqa", "qwen2_5_vl", 576), thresholds_at("docvqa", "qwen2_5_vl", 4096)
        ({'roi_threshold': 0.125, 'gate_threshold': 0.05}, {'roi_threshold': 0.04, 'gate_threshold': 0.02})
        >>> thresholds_at("vstar", "qwen2_5_vl", 2048)
        {'roi_threshold': 0.03, 'gate_threshold': 0.02}
    """
    preset = get_preset(name, family)
    if family != "qwen2_5_vl" or tokens < TAB2_FROM:
        own = {"roi_threshold": preset.roi_threshold, "gate_threshold": preset.gate_threshold}
        return {k: v for k, v in own.items() if v is not None}
    task = ALIASES.get(name, name)
    return {**TAB2, "roi_threshold": TAB2_VSTAR_ROI} if task == "vstar" else dict(TAB2)


def preset_names() -> list[str]:
    """Every accepted name, groups first."""
    return [*ALIASES, *PRESETS]


def get_preset(name: str, family: str) -> Preset:
    """The preset ``name`` (a task or a group alias) for a model ``family``.

    Raises:
        ValueError: an unknown name, listing the known ones.

    Examples:
        >>> get_preset("hr", "qwen2_5_vl")
        Preset(roi_threshold=0.04, gate_threshold=0.02, min_tokens=512, max_tokens=4096)
        >>> get_preset("docvqa", "llava").roi_threshold
        0.15
    """
    task = ALIASES.get(name, name)
    if task not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(preset_names())}")
    if family == "llava":
        return LLAVA
    return PRESETS[task].get(family, PRESETS[task]["qwen2_5_vl"])
