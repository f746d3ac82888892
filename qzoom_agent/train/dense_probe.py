"""The throw-away dense probe of the vision warm-up: per-token present/char/colour logits, losses and accuracy.

The probe reads ``model.model.visual(...)``'s merged output: one vector per 28x28 px token, images concatenated
in order, each image's tokens in raster order (the order `dense_crops` writes its targets in).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .dense_crops import CHAR_CLASSES, COLOURS, IGNORE_INDEX, DenseCrop


@dataclass
class DenseTargets:
    """Flat per-token targets of a batch, N = total tokens over its images (see `DenseCrop`).

    Attributes:
        present: (N,) float; 1, 0 or -1 (ignore).
        char: (N,) long; class index or -100.
        colour: (N,) long; class index or -100.
    """

    present: torch.Tensor
    char: torch.Tensor
    colour: torch.Tensor


@dataclass
class ProbeBatch:
    """Vision-tower inputs and targets for a list of crops.

    Attributes:
        pixel_values: (P, 3 * 2 * 14 * 14) flattened patches of all images (P = 4 N).
        grid_thw: (B, 3) patch grid (t, h, w) per image.
        targets: the images' per-token targets, concatenated in the same order.
    """

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    targets: DenseTargets

    @property
    def n_images(self) -> int:
        return int(self.grid_thw.shape[0])


def encode_crops(crops: list[DenseCrop], processor) -> ProbeBatch:
    """Run the Qwen image processor on ``crops`` (of any sizes) and concatenate their patches and targets.

    Crop sides are multiples of 28 inside the processor's pixel bounds, so its ``smart_resize`` keeps every size
    and the token grid equals each crop's target grid (checked). The vision tower separates the images itself
    through ``grid_thw`` (per-image full attention and windows), so one call serves mixed sizes.

    Raises:
        RuntimeError: if the processor resized a crop (its pixel bounds exclude that size).
    """
    out = processor(images=[c.image for c in crops], return_tensors="pt")
    thw = out["image_grid_thw"]
    merge = processor.merge_size
    for crop, (_, h, w) in zip(crops, thw.tolist(), strict=True):
        if (h // merge, w // merge) != crop.grid:
            raise RuntimeError(f"image processor resized a {crop.image.size} crop to grid {(h // merge, w // merge)}")
    targets = DenseTargets(
        present=torch.from_numpy(np.concatenate([c.present.ravel() for c in crops])),
        char=torch.from_numpy(np.concatenate([c.char.ravel() for c in crops])),
        colour=torch.from_numpy(np.concatenate([c.colour.ravel() for c in crops])),
    )
    return ProbeBatch(out["pixel_values"], thw, targets)


class DenseProbe(nn.Module):
    """``Linear(dim, 1 + n_chars + n_colours)`` over merged vision tokens; discarded after the warm-up."""

    def __init__(self, dim: int, n_chars: int = len(CHAR_CLASSES), n_colours: int = len(COLOURS)) -> None:
        super().__init__()
        self.n_chars, self.n_colours = n_chars, n_colours
        self.proj = nn.Linear(dim, 1 + n_chars + n_colours)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, dim) token features -> present logits (N,), char logits (N, n_chars), colour logits (N, n_colours)."""
        logits = self.proj(feats)
        return logits[:, 0], logits[:, 1 : 1 + self.n_chars], logits[:, 1 + self.n_chars :]


def vision_tokens(model: nn.Module, batch: ProbeBatch) -> torch.Tensor:
    """Merged vision features (N, out_hidden) of ``batch``: images in order, each in raster order."""
    return model.model.visual(batch.pixel_values, grid_thw=batch.grid_thw).pooler_output


def dense_losses(
    logits: tuple[torch.Tensor, torch.Tensor, torch.Tensor], targets: DenseTargets, weights: dict[str, float]
) -> dict[str, torch.Tensor]:
    """Probe losses: BCE on present (ignoring -1), CE on char and colour (ignoring -100), and their weighted sum.

    Args:
        logits: the probe's output for N tokens.
        targets: the N tokens' targets.
        weights: ``{"present": w, "char": w, "colour": w}``.

    Returns:
        Scalar tensors ``present``, ``char``, ``colour`` and ``total``; a term with no labelled token is 0.
    """
    present_logit, char_logits, colour_logits = logits
    zero = present_logit.sum() * 0.0  # keeps the graph (and dtype/device) when a batch has no label of a kind
    valid = targets.present >= 0
    losses = {
        "present": F.binary_cross_entropy_with_logits(present_logit[valid], targets.present[valid])
        if valid.any() else zero,
        "char": F.cross_entropy(char_logits, targets.char, ignore_index=IGNORE_INDEX)
        if (targets.char != IGNORE_INDEX).any() else zero,
        "colour": F.cross_entropy(colour_logits, targets.colour, ignore_index=IGNORE_INDEX)
        if (targets.colour != IGNORE_INDEX).any() else zero,
    }
    losses["total"] = sum(weights[k] * losses[k] for k in ("present", "char", "colour"))
    return losses


def probe_counts(logits: tuple[torch.Tensor, torch.Tensor, torch.Tensor], targets: DenseTargets) -> dict[str, list]:
    """``{kind: [correct, labelled]}`` for present (logit > 0), char and colour (argmax), over labelled tokens."""
    present_logit, char_logits, colour_logits = logits
    out = {}
    valid = targets.present >= 0
    out["present"] = [int(((present_logit[valid] > 0).float() == targets.present[valid]).sum()), int(valid.sum())]
    for kind, lg, tg in (("char", char_logits, targets.char), ("colour", colour_logits, targets.colour)):
        lab = tg != IGNORE_INDEX
        out[kind] = [int((lg[lab].argmax(-1) == tg[lab]).sum()), int(lab.sum())]
    return out


@torch.no_grad()
def evaluate_probe(model: nn.Module, probe: DenseProbe, processor, sets: dict[str, list[DenseCrop]],
                   batch_size: int = 32) -> dict[str, float]:
    """Held-out probe accuracy per crop set: ``{f"{kind}_acc_{set}": acc, f"{kind}_n_{set}": count}``."""
    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    for name, crops in sets.items():
        totals = {"present": [0, 0], "char": [0, 0], "colour": [0, 0]}
        for i in range(0, len(crops), batch_size):
            batch = encode_crops(crops[i : i + batch_size], processor)
            counts = probe_counts(probe(vision_tokens(model, batch)), batch.targets)
            for kind, (correct, n) in counts.items():
                totals[kind][0] += correct
                totals[kind][1] += n
        for kind, (correct, n) in totals.items():
            metrics[f"{kind}_acc_{name}"] = correct / max(n, 1)
            metrics[f"{kind}_n_{name}"] = n
    model.train(was_training)
    return metrics
