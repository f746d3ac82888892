"""The throw-away dense probe of the vision warm-up: per-token present/char/colour logits, losses and accuracy.

The probe reads ``model.model.visual(...)``'s merged output: one vector per 28x28 px token, images concatenated
in order, each image's tokens in raster order (the order `dense_crops` writes its targets in). The answer phases
may widen it with a large-object shape head and a character-position head (`scene_targets`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .dense_crops import CHAR_CLASSES, COLOURS, IGNORE_INDEX, DenseCrop, tag_positions

LABEL_KINDS = ("present", "char", "colour", "shape", "index")


@dataclass
class DenseTargets:
    """Flat per-token targets of a batch, N = total tokens over its images (see `DenseCrop`).

    Attributes:
        present: (N,) float; 1, 0 or -1 (ignore).
        char: (N,) long; class index or -100.
        colour: (N,) long; class index or -100.
        shape: (N,) long; large-object shape index or -100; None: unlabelled.
        index: (N,) long; character position in its tag or -100; None: unlabelled.
    """

    present: torch.Tensor
    char: torch.Tensor
    colour: torch.Tensor
    shape: torch.Tensor | None = None
    index: torch.Tensor | None = None

    @staticmethod
    def cat(parts: list[DenseTargets]) -> DenseTargets:
        """Concatenate in order; a kind unlabelled in some part is filled with -100 there."""
        def column(name: str) -> torch.Tensor | None:
            if all(getattr(p, name) is None for p in parts):
                return None
            return torch.cat([getattr(p, name) if getattr(p, name) is not None
                              else torch.full_like(p.char, IGNORE_INDEX) for p in parts])
        return DenseTargets(*(column(f) for f in LABEL_KINDS[:3]), column("shape"), column("index"))


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
        index=torch.from_numpy(np.concatenate([tag_positions(c.tags, *c.grid).ravel() for c in crops])),
    )
    return ProbeBatch(out["pixel_values"], thw, targets)


class DenseProbe(nn.Module):
    """``Linear(dim, 1 + n_chars + n_colours [+ n_shapes + n_index])`` over merged vision tokens; never shipped.

    The heads' sizes are kept in the state (``head_sizes``), so `load_heads` can move a probe's heads into a probe
    with more or fewer heads (phase 1's probe into an answer phase's wider one) by name.
    """

    def __init__(self, dim: int, n_chars: int = len(CHAR_CLASSES), n_colours: int = len(COLOURS),
                 n_shapes: int = 0, n_index: int = 0) -> None:
        super().__init__()
        self.sizes = {"present": 1, "char": n_chars, "colour": n_colours, "shape": n_shapes, "index": n_index}
        self.proj = nn.Linear(dim, sum(self.sizes.values()))
        self.register_buffer("head_sizes", torch.tensor(list(self.sizes.values())))

    def forward(self, feats: torch.Tensor, frozen: bool = False) -> dict[str, torch.Tensor]:
        """(N, dim) token features -> ``{"present": (N,), "char": (N, n_chars), "colour": (N, n_colours),
        "shape": (N, n_shapes), "index": (N, n_index)}`` logits (a head of size 0 is left out); ``frozen``
        detaches the probe's weights, so a loss on the logits trains only what made ``feats``."""
        weight, bias = (self.proj.weight.detach(), self.proj.bias.detach()) if frozen else (self.proj.weight,
                                                                                          self.proj.bias)
        logits, out, at = F.linear(feats, weight, bias), {}, 0
        for kind, n in self.sizes.items():
            if n:
                out[kind] = logits[:, at] if kind == "present" else logits[:, at : at + n]
            at += n
        return out

    def load_heads(self, state: dict[str, torch.Tensor]) -> None:
        """Copy each head ``state`` shares with this probe; heads only this one has keep their init, heads only
        ``state`` has are dropped. A state without ``head_sizes`` is a present/char/colour probe.

        Raises:
            ValueError: a shared head differs in size, or the widths differ.
        """
        weight, bias = state["proj.weight"], state["proj.bias"]
        default = [1, self.sizes["char"], self.sizes["colour"], 0, 0]
        theirs = dict(zip(LABEL_KINDS, (int(n) for n in state.get("head_sizes", torch.tensor(default))), strict=True))
        if sum(theirs.values()) != weight.shape[0] or weight.shape[1] != self.proj.in_features:
            raise ValueError(f"cannot load a probe of shape {tuple(weight.shape)} with heads {theirs} into "
                             f"{tuple(self.proj.weight.shape)}")
        src = dict(zip(LABEL_KINDS, np.cumsum([0, *theirs.values()])[:-1].tolist(), strict=True))
        dst = dict(zip(LABEL_KINDS, np.cumsum([0, *self.sizes.values()])[:-1].tolist(), strict=True))
        with torch.no_grad():
            for kind in LABEL_KINDS:
                n = self.sizes[kind]
                if not n or not theirs[kind]:
                    continue
                if theirs[kind] != n:
                    raise ValueError(f"probe head {kind!r} has {theirs[kind]} classes, this one {n}")
                self.proj.weight[dst[kind] : dst[kind] + n] = weight[src[kind] : src[kind] + n]
                self.proj.bias[dst[kind] : dst[kind] + n] = bias[src[kind] : src[kind] + n]


def vision_tokens(model: nn.Module, batch: ProbeBatch) -> torch.Tensor:
    """Merged vision features (N, out_hidden) of ``batch``: images in order, each in raster order."""
    return model.model.visual(batch.pixel_values, grid_thw=batch.grid_thw).pooler_output


def dense_losses(logits: dict[str, torch.Tensor], targets: DenseTargets,
                 weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """Probe losses: BCE on present (ignoring -1), CE on the class heads (ignoring -100), and their weighted sum.

    Args:
        logits: the probe's output for N tokens.
        targets: the N tokens' targets.
        weights: weight per kind (``present``, ``char``, ``colour``, ``shape``, ``index``); a missing kind is 0.

    Returns:
        A scalar tensor per kind the probe has, plus ``total``; a term with no labelled token is 0.
    """
    zero = logits["present"].sum() * 0.0  # keeps the graph (and dtype/device) when a batch has no label of a kind
    valid = targets.present >= 0
    losses = {"present": F.binary_cross_entropy_with_logits(logits["present"][valid], targets.present[valid])
              if valid.any() else zero}
    for kind in LABEL_KINDS[1:]:
        if kind not in logits:
            continue
        target = getattr(targets, kind)
        labelled = target is not None and bool((target != IGNORE_INDEX).any())
        losses[kind] = F.cross_entropy(logits[kind], target, ignore_index=IGNORE_INDEX) if labelled else zero
    losses["total"] = sum(weights.get(k, 0.0) * v for k, v in losses.items())
    return losses


def probe_counts(logits: dict[str, torch.Tensor], targets: DenseTargets) -> dict[str, list]:
    """``{kind: [correct, labelled]}``: present (logit > 0) and each class head the probe has (argmax), over
    labelled tokens."""
    out = {}
    valid = targets.present >= 0
    out["present"] = [int(((logits["present"][valid] > 0).float() == targets.present[valid]).sum()),
                      int(valid.sum())]
    for kind in LABEL_KINDS[1:]:
        target = getattr(targets, kind)
        if kind not in logits or target is None:
            continue
        lab = target != IGNORE_INDEX
        out[kind] = [int((logits[kind][lab].argmax(-1) == target[lab]).sum()), int(lab.sum())]
    return out


@torch.no_grad()
def evaluate_probe(model: nn.Module, probe: DenseProbe, processor, sets: dict[str, list[DenseCrop]],
                   batch_size: int = 32) -> dict[str, float]:
    """Held-out probe accuracy per crop set: ``{f"{kind}_acc_{set}": acc, f"{kind}_n_{set}": count}``."""
    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    for name, crops in sets.items():
        totals: dict[str, list[int]] = {}
        for i in range(0, len(crops), batch_size):
            batch = encode_crops(crops[i : i + batch_size], processor)
            counts = probe_counts(probe(vision_tokens(model, batch)), batch.targets)
            for kind, (correct, n) in counts.items():
                totals.setdefault(kind, [0, 0])
                totals[kind][0] += correct
                totals[kind][1] += n
        for kind, (correct, n) in totals.items():
            metrics[f"{kind}_acc_{name}"] = correct / max(n, 1)
            metrics[f"{kind}_n_{name}"] = n
    model.train(was_training)
    return metrics
