"""Stage-1 pseudo-labels: where the model itself looks while it answers, turned into per-token RoI targets.

Self-distillation (SD-RPN): the base model answers a question greedily; the attention of its response tokens over
the visual tokens, averaged over chosen (layer, head) pairs, says where it looked. Strongly attended tokens become
foreground (1), tokens far from them and weakly attended become background (0), the rest are ignored (-100). The
twig then learns to predict that map from the layer-K state of the prompt alone, before any answer exists.

Label rule (Q-Zoom's ``create_pseudo_labels``; coefficients in :class:`LabelRule`): ``g`` = attention with sink
tokens zeroed; foreground ``g > fg_ratio * max(g)``; its bounding box after a 3x3 Gaussian blur (about one cell of
dilation); background = outside that box and ``g < bg_ratio * max(g)``. A sample whose box covers at least
``max_area_ratio`` of the map, or whose ``max(g)`` is below ``min_peak``, is ignored whole: it says nothing about
where to look.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..backbones import ImageInputs
from ..boxes import Box, box_to_cells
from ..roi import enclosing_cells, gaussian_blur3
from .common import eager_attention

IGNORE = -100


class LabelRule(BaseModel):
    """Coefficients that turn an attention map into tri-state labels (Q-Zoom's stage-1 values by default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fg_ratio: float = Field(0.25, gt=0.0, lt=1.0, description="foreground: attention above this fraction of peak")
    bg_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="background: below this fraction of peak, outside box")
    max_area_ratio: float = Field(0.5, gt=0.0, le=1.0, description="skip if the box covers this share; 1: never")
    min_peak: float = Field(5e-3, ge=0.0, description="skip samples whose peak attention is below this")
    sink_threshold: float = Field(1e-2, gt=0.0, description="sink-head attention at or above this marks a sink")


@dataclass
class AttentionMaps:
    """Response-to-image attention of one answered question.

    Attributes:
        maps: (layers, heads, gh, gw) attention of the response tokens over the visual tokens, averaged over the
            response tokens (rows sum to at most 1 over the whole sequence, so the visual part is a fraction).
        answer: the greedy answer the maps were taken from.
        image: the encoded view.
    """

    maps: torch.Tensor
    answer: str
    image: ImageInputs


@torch.inference_mode()
def response_attention(model, image, question: str, budget: tuple[int, int], max_new_tokens: int = 8,
                       answer: str | None = None) -> AttentionMaps:
    """Answer ``question`` greedily (unless ``answer`` is given), then take every layer's and head's attention of
    the response tokens over the image in one teacher-forced eager forward.

    The query rows are the response tokens fed back to the model (decode steps 1..n, as Q-Zoom records them;
    the prefill row is not used), i.e. the positions of the answer tokens and ``<|im_end|>`` minus the last.

    Args:
        model: a `QZoomModel` (heads not needed).
        image: PIL image, path or bytes.
        question: the question.
        budget: (min, max) visual tokens of the view.
        max_new_tokens: decoding budget of the greedy answer.
        answer: use this response instead of generating one.

    Returns:
        The maps, the answer and the encoded view.
    """
    from ..images import load_image

    adapter = model.adapter
    image = load_image(image)
    if answer is None:
        answer = model.answer(image, question, mode="never", budget=budget, max_new_tokens=max_new_tokens).text
    img = adapter.prepare_image(image, min_tokens=budget[0], max_tokens=budget[1])
    prompt = adapter.build_prompt(img, question, system=None)
    response = adapter.tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    ids = torch.cat([prompt.input_ids[0].cpu(), torch.tensor(response, dtype=torch.long)])[None]
    net = adapter.model
    with eager_attention(net):
        out = net(**adapter.hf_inputs(ids.to(adapter.device), [img]), output_attentions=True)
    start, end, first = prompt.image_start, prompt.image_end, prompt.input_ids.shape[1]
    rows = slice(first, ids.shape[1] - 1) if ids.shape[1] - 1 > first else slice(first - 1, first)
    gh, gw = img.grid
    maps = torch.stack([a[0, :, rows, start:end].float().mean(1) for a in out.attentions])  # (layers, heads, N)
    return AttentionMaps(maps.reshape(maps.shape[0], maps.shape[1], gh, gw).cpu(), answer, img)


def select_heads(maps: torch.Tensor, heads: dict[int, list[int]]) -> torch.Tensor:
    """Mean over the listed (layer, heads) pairs of ``maps`` (layers, heads, gh, gw) -> (gh, gw).

    Raises:
        ValueError: an empty selection or a layer/head out of range.
    """
    picked = []
    for layer, hs in heads.items():
        if not 0 <= layer < maps.shape[0] or any(not 0 <= h < maps.shape[1] for h in hs):
            raise ValueError(f"head selection {{{layer}: {hs}}} is outside {maps.shape[0]} layers x "
                             f"{maps.shape[1]} heads")
        picked += [maps[layer, h] for h in hs]
    if not picked:
        raise ValueError("the head selection is empty")
    return torch.stack(picked).mean(0)


def pseudo_labels(o2i: torch.Tensor, rule: LabelRule, sink: torch.Tensor | None = None) -> torch.Tensor:
    """Tri-state labels from a response-to-image attention map.

    Args:
        o2i: (gh, gw) attention map (non-negative).
        rule: coefficients.
        sink: (gh, gw) bool, tokens known to be attention sinks (never foreground or background), or None.

    Returns:
        (gh, gw) int64: 1 foreground, 0 background, -100 ignored; all -100 when the sample is skipped.
    """
    g = o2i.float().clamp(min=0)
    if sink is not None:
        g = g * (~sink)
    labels = torch.full(g.shape, IGNORE, dtype=torch.long)
    peak = float(g.max()) if g.numel() else 0.0
    if not peak >= rule.min_peak:  # also catches NaN
        return labels
    fg = g > rule.fg_ratio * peak
    cells = enclosing_cells(gaussian_blur3(g * fg) > 0)
    if cells is None:
        return labels
    r0, c0, r1, c1 = cells
    if rule.max_area_ratio < 1.0 and (r1 - r0) * (c1 - c0) >= rule.max_area_ratio * g.numel():
        return labels
    inside = torch.zeros_like(fg)
    inside[r0:r1, c0:c1] = True
    bg = ~inside & (g < rule.bg_ratio * peak)
    if sink is not None:
        bg &= ~sink
    labels[bg] = 0
    labels[fg] = 1
    return labels


def box_labels(box: tuple[int, int, int, int], image: ImageInputs) -> torch.Tensor:
    """Labels from a ground-truth box (the ablation): 1 on the tokens the box touches, 0 elsewhere.

    Args:
        box: [x1, y1, x2, y2] in source pixels.
        image: the encoded view (grid and sizes).

    Returns:
        (gh, gw) int64 labels.
    """
    r0, c0, r1, c1 = box_to_cells(Box(*box), image.grid, image.resized_size, image.source_size, image.canvas)
    labels = torch.zeros(image.grid, dtype=torch.long)
    labels[r0:r1, c0:c1] = 1
    return labels


def head_agreement(maps: torch.Tensor, box: tuple[int, int, int, int], image: ImageInputs) -> torch.Tensor:
    """Share of each (layer, head)'s visual attention that falls on the tokens of a ground-truth box.

    Args:
        maps: (layers, heads, gh, gw).
        box: target box in source pixels.
        image: the encoded view.

    Returns:
        (layers, heads) in [0, 1]; a head attending uniformly scores the box's share of the grid.
    """
    r0, c0, r1, c1 = box_to_cells(Box(*box), image.grid, image.resized_size, image.source_size, image.canvas)
    total = maps.sum((-1, -2)).clamp(min=1e-12)
    return maps[..., r0:r1, c0:c1].sum((-1, -2)) / total
