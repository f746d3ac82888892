"""What `perceive` and `answer` return: plain records with per-answer cost statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .boxes import Box, Cells

if TYPE_CHECKING:
    from .perception import PerceptionState


@dataclass
class Perception:
    """The outcome of one low-resolution prefill up to layer K: gate score, RoI map and box. No decoding.

    Attributes:
        gate_score: sigmoid of the gate logit, or None when no gate ran.
        roi_logits: (gh, gw) raw SD-RPN scores on the merged-token grid, or None when the twig did not run.
        boxes: proposed zoom boxes in source pixels; empty means "do not zoom".
        grid: (gh, gw) visual tokens of the global view.
        resized_size: (width, height) of the global view as the model saw it.
        image_size: (width, height) of the source image.
        visual_tokens: visual tokens processed (the global view).
        latency_s: wall time of the call.
        cells: per box, the token cells ``(r0, c0, r1, c1)`` (exclusive ends) it came from; they place the RoI
            positions.
        canvas: ``(ox, oy, cw, ch)`` when the global view was padded to a square (LLaVA), else None
            (:func:`qzoom_agent.boxes.box_to_cells`).
        state: the prefill below layer K that `QZoomModel.answer`, `locate`, `zoom` and `look` continue (on forks).
        roi_query: the text the twig scored when it was not the question itself, else None.
    """

    gate_score: float | None
    roi_logits: torch.Tensor | None
    boxes: list[Box]
    grid: tuple[int, int]
    resized_size: tuple[int, int]
    image_size: tuple[int, int]
    visual_tokens: int
    latency_s: float
    state: PerceptionState | None = field(default=None, repr=False)  # the prefill below K, never consumed
    cells: list[Cells] = field(default_factory=list)
    canvas: tuple[int, int, int, int] | None = None
    roi_query: str | None = None

    @property
    def box(self) -> Box | None:
        return self.boxes[0] if self.boxes else None


@dataclass
class Answer:
    """One answer and what it cost.

    Attributes:
        text: the decoded answer, special tokens removed.
        zoomed: True when a RoI crop was spliced in and the answer was decoded from the spliced sequence.
        gate_score: sigmoid gate score, or None when the gate did not run (``mode="never"``/``"always"``
            without heads).
        bbox: the (first) zoom box in source pixels, or None.
        visual_tokens: visual tokens processed: the global view plus the RoI crops, if any.
        roi_tokens: visual tokens of the RoI crops (0 when not zoomed); each view obeys the token cap.
        forward_passes: prefills (the first pass, plus the partial re-prefill when zoomed) plus decode steps. A
            stem or explicit RoI query's own text tokens, rerun below layer K for the twig, are part of the first
            pass here, like the twig itself; their time is in ``latency_s``.
        generated_tokens: tokens produced, including a final end-of-turn token.
        latency_s: wall time from image to text.
        image_size: (width, height) of the source image.
        grid: (gh, gw) visual tokens of the global view.
        roi_logits: (gh, gw) SD-RPN scores when the twig ran, for heat maps.
        boxes: every box spliced in (SD-RPN on LLaVA may splice two); ``[bbox]`` or ``[]`` elsewhere.
        cells: per box, the token cells it came from.
        layer_tokens: decoder layer-tokens run (tokens x layers, Q-Zoom heads included): a hardware-free cost.
    """

    text: str
    zoomed: bool
    gate_score: float | None
    bbox: Box | None
    visual_tokens: int
    roi_tokens: int
    forward_passes: int
    generated_tokens: int
    latency_s: float
    image_size: tuple[int, int]
    grid: tuple[int, int]
    roi_logits: torch.Tensor | None = field(default=None, repr=False)
    boxes: list[Box] = field(default_factory=list)
    cells: list[Cells] = field(default_factory=list)
    layer_tokens: int = 0

    def to_json(self) -> dict[str, Any]:
        """The CLI's ``--json`` record."""
        return {
            "answer": self.text,
            "zoomed": self.zoomed,
            "gate_score": self.gate_score,
            "bbox": self.bbox.to_json() if self.bbox else None,
            "boxes": [b.to_json() for b in self.boxes],
            "visual_tokens": self.visual_tokens,
            "roi_tokens": self.roi_tokens,
            "forward_passes": self.forward_passes,
            "generated_tokens": self.generated_tokens,
            "layer_tokens": self.layer_tokens,
            "latency_s": round(self.latency_s, 4),
            "image_size": list(self.image_size),
        }
