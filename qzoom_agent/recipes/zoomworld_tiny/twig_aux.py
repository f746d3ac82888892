"""Colour probes on the twig's own hidden state: a ZoomWorld-only auxiliary loss for stage 1 (``aux_weight``),
handed to it as ``run_stage1(cfg, out, aux=TwigAuxProbe)`` (the CLI does this when the config asks for it).

A ZoomWorld fine question names its target by colour ("What is written on the green tag?"), so the twig must score
the tokens of *that* tag above the other tags. On the bundled base the frozen layer-K states hold both halves:
linear probes read the asked colour off the last prompt token and a tag's colour off its tokens. A q.k scorer
trained on box labels alone still picks tags of any colour, because 1-4 foreground tokens a question are thin
evidence for a colour-to-colour match. These probes add dense evidence on the twig's state after its first T-1
layers (the input of the q/k projections):

* ``present``: BCE, a tag covers the token (ignore where it only touches it);
* ``colour``: cross-entropy on the tokens of tags, the tag's colour;
* ``asked``: cross-entropy on the query token, the colour of the asked tag (read and mcq questions).

The probe is thrown away after training; only the twig layers it shaped ship.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...zoomworld import ZoomWorldSample
from .dense_crops import COLOURS, IGNORE_INDEX
from .scene_targets import scene_targets


@dataclass
class TwigAuxTargets:
    """Per-question targets on the global view's merged-token grid (raster order).

    Attributes:
        present: (N,) float32 in {1, 0, -1 (ignore)}.
        colour: (N,) int64 tag colour index on tag tokens, else -100.
        asked: index of the asked tag's colour, or -100 when the question names no single tag.
    """

    present: torch.Tensor
    colour: torch.Tensor
    asked: int


def aux_targets(sample: ZoomWorldSample, grid: tuple[int, int]) -> TwigAuxTargets:
    """Targets for ``sample`` seen whole on a ``grid`` of merged tokens.

    Args:
        sample: a ZoomWorld question with its recorded panels.
        grid: (rows, cols) of the encoded global view.
    """
    t = scene_targets(sample, (0, 0, *sample.image.size), grid)
    present = torch.from_numpy(t.present.ravel().copy()).float()
    colour = torch.from_numpy(t.colour.ravel().copy()).long()
    colour[present != 1] = IGNORE_INDEX  # large objects carry colours too; only tags are asked about
    asked = IGNORE_INDEX
    if sample.family in ("read", "mcq"):
        target = list(sample.target_box)
        colours = [p["colour"] for p in sample.panels if list(p["box"]) == target]
        if colours:
            asked = COLOURS.index(colours[0])
    return TwigAuxTargets(present, colour, asked)


class TwigAuxProbe(nn.Module):
    """``Linear(D, 1 + n_colours)`` on image tokens and ``Linear(D, n_colours)`` on the query token; never shipped."""

    def __init__(self, dim: int, n_colours: int = len(COLOURS)) -> None:
        super().__init__()
        self.tokens = nn.Linear(dim, 1 + n_colours)
        self.query = nn.Linear(dim, n_colours)

    def targets(self, sample: ZoomWorldSample, grid: tuple[int, int]) -> TwigAuxTargets:
        """Stage 1's hook: :func:`aux_targets` of ``sample`` on ``grid``."""
        return aux_targets(sample, grid)

    def loss(self, states: torch.Tensor, image_start: int, image_end: int, targets: TwigAuxTargets,
             query_index: int = -1) -> torch.Tensor:
        """Sum of the three probe losses (each a mean over its labelled items; absent ones count 0).

        Args:
            states: (1, L, D) twig state (``QZoomHeads.twig_states``).
            image_start, image_end: the visual-token span, N = image_end - image_start tokens.
            targets: from :func:`aux_targets` for the same view.
            query_index: the twig's query position.

        Returns:
            Scalar loss.
        """
        out = self.tokens(states[0, image_start:image_end].float())  # (N, 1 + C)
        present, colour = targets.present.to(out.device), targets.colour.to(out.device)
        if out.shape[0] != present.shape[0]:
            raise RuntimeError(f"{present.shape[0]} aux targets for {out.shape[0]} visual tokens")
        loss = out.new_zeros(())
        valid = present >= 0
        if valid.any():
            loss = loss + F.binary_cross_entropy_with_logits(out[valid, 0], present[valid])
        if (colour >= 0).any():
            loss = loss + F.cross_entropy(out[:, 1:], colour, ignore_index=IGNORE_INDEX)
        if targets.asked >= 0:
            logits = self.query(states[0, query_index].float())[None]
            loss = loss + F.cross_entropy(logits, torch.tensor([targets.asked], device=out.device))
        return loss
