"""Focus loss: teach the language model's answer positions to look at the asked object.

Measured on the shipped ``zoomworld-tiny``: its visual tokens say what they show (a probe names the glyph under
every glyph token), yet it answers colour questions with one constant word and reads the wrong tag where two
stand side by side. What is missing is the binding of the question ("the green tag", "the large square") to
the tokens that answer it. ZoomWorld knows every target box, so that binding can be supervised directly.

For each example with a target, the attention of the positions that predict the answer (the last prompt token
and the answer tokens but the last), averaged over the chosen layers and all heads, is renormalised over the
image tokens; the loss is ``-log`` of the share that falls on tokens the target box touches. Attention to the
text is left free, and a head may look at any part of the target (the glyphs, the panel edge).

The same maps are what stage 1 of Q-Zoom distils into the SD-RPN twig (``stage1_labels``), and the twig's last
layer starts as a copy of a base layer, so a base model that looks at the asked tag gives the twig focused
pseudo-labels and a good start.
"""

from __future__ import annotations

import numpy as np
import torch

from .dense_crops import cell_overlap
from .scene_targets import view_mapper

Box = tuple[float, float, float, float]
_EPS = 1e-6


def focus_mask(window: Box, box: Box, grid: tuple[int, int]) -> torch.Tensor:
    """Tokens of a view that ``box`` touches.

    Args:
        window: (x1, y1, x2, y2) of the source image the view shows; the view stretches it onto the grid.
        box: the target (x1, y1, x2, y2) in the same source pixels.
        grid: (rows, cols) of merged visual tokens of the encoded view.

    Returns:
        (rows * cols,) bool in raster order; all False when the box lies outside the window.
    """
    rows, cols = grid
    view = view_mapper(window, grid)(box)
    return torch.from_numpy(np.ascontiguousarray(cell_overlap(view, rows, cols) > 0).reshape(-1))


def focus_losses(attentions: tuple[torch.Tensor, ...], image_positions: list[torch.Tensor],
                 query_rows: list[tuple[int, int]], masks: list[torch.Tensor | None],
                 layers: list[int]) -> torch.Tensor:
    """Per-example focus loss.

    Args:
        attentions: per decoder layer, (B, H, L, L) attention weights of one forward.
        image_positions: per example, (N_i,) sequence positions of its visual tokens in raster order.
        query_rows: per example, ``(first, end)``: the positions predicting the answer, ``first..end-1``.
        masks: per example, (N_i,) bool target tokens, or None for no target.
        layers: decoder layers whose head-averaged maps are supervised.

    Returns:
        (E,) losses of the examples whose mask has a token (E may be 0).
    """
    out = []
    for b, (positions, (first, end), mask) in enumerate(zip(image_positions, query_rows, masks, strict=True)):
        if mask is None or not bool(mask.any()) or end <= first:
            continue
        maps = torch.stack([attentions[layer][b, :, first:end][..., positions] for layer in layers])
        maps = maps.float().mean(dim=(0, 1))  # (rows, N_i): layers and heads averaged
        share = maps[:, mask.to(maps.device)].sum(-1) / maps.sum(-1).clamp(min=_EPS)
        out.append(-torch.log(share.clamp(min=_EPS)).mean())
    if not out:
        return attentions[0].new_zeros(0)
    return torch.stack(out)
