"""The released box rules, step by step: Q-Zoom's for Qwen2.5-VL and Qwen3-VL, SD-RPN's for LLaVA-1.5.

Released checkpoints were trained and evaluated with these rules, so loading one selects them (``roi_mode:
official``). Every step follows the released post-processing, including its arithmetic: the blur is torchvision's
3x3, sigma-1 Gaussian with **reflect** padding, and boxes are mapped to source pixels in float32 and truncated, as
the official ``get_bbox4src`` does, so the same score map gives the same integer box.

* Qwen (one box): ``sigmoid(logits) * keep`` -> blur -> ``> threshold`` -> the cell range around every foreground
  cell (nothing above: no zoom) -> source pixels, grown to at least 28 source pixels a side around the centre, slid
  back inside the image, clamped, truncated. ``keep`` is the sink mask: Qwen2.5-VL's corner strip (only on maps of
  more than 256 tokens, :func:`qzoom_agent.roi.qwen_sink_mask`) or Qwen3-VL's query-based mask
  (:func:`qwen3_sink_keep`). Nothing masks the map again after the blur. The cells of the mask, not cells
  re-derived from the pixel box, place the RoI's positions.
* LLaVA (SD-RPN, up to two boxes): blur the sigmoid map -> ``> threshold`` -> 8-connected components in raster order
  of their first cell; a one-cell component is dropped, one of 2-3 cells grows to at least 3x3 around its centre
  (its right and bottom ends clamped to ``W - 1`` and ``H - 1``, as released), one of more than 225 cells is dropped;
  no component or more than two: no zoom. Each box maps to the source image by undoing the square padding of the
  336 px input, with no minimum size.

The functions are pure and run on the CPU in float32; ``logits`` are raw twig scores on the merged-token grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .boxes import Box, Cells, Pair, check_pair
from .roi import enclosing_cells, flood

OFFICIAL_MIN_SIDE_PX = 28  # get_bbox4src's min_size: the smallest RoI side, in source pixels (Qwen families)
QWEN3_SINK_PROB = 0.75  # Qwen3-VL: visual tokens whose first-token score has sigmoid >= this are sinks
LLAVA_MIN_AREA = 4  # components of fewer cells grow to at least 3x3 (one-cell components are dropped)
LLAVA_MAX_AREA = 15 * 15  # components of more cells are dropped
LLAVA_MAX_BOXES = 2  # more components than this: the map is not trusted, no zoom


def _float_map(logits: torch.Tensor, caller: str) -> torch.Tensor:
    if logits.dim() != 2:
        raise ValueError(f"{caller} expects (gh, gw) logits, got shape {tuple(logits.shape)}")
    x = logits.detach().to("cpu", torch.float32)
    return torch.where(torch.isnan(x), torch.full_like(x, -math.inf), x)  # NaN never fires


def torchvision_blur3(prob: torch.Tensor) -> torch.Tensor:
    """torchvision's ``gaussian_blur(x, kernel_size=3, sigma=1.0)`` on a (gh, gw) float map.

    The kernel is built as torchvision builds it (``linspace(-1, 1, 3)``, ``exp(-x^2 / 2)``, normalised, outer
    product) and the border is padded by reflection. Reflection needs at least two cells along an axis; a 1-cell
    axis (where torchvision itself raises) is padded by replication instead, which blurs a single row or column as
    a copy of itself across that axis.

    Args:
        prob: (gh, gw) float32 map.

    Returns:
        (gh, gw) blurred map.
    """
    if prob.dim() != 2:
        raise ValueError(f"torchvision_blur3 expects a (gh, gw) map, got shape {tuple(prob.shape)}")
    if prob.numel() == 0:
        return prob.clone()
    x = torch.linspace(-1.0, 1.0, steps=3, dtype=prob.dtype)
    pdf = torch.exp(-0.5 * (x / 1.0).pow(2))
    k1 = pdf / pdf.sum()
    kernel = torch.mm(k1[:, None], k1[None, :]).view(1, 1, 3, 3)
    img = prob[None, None]
    for dim, pad in ((3, (1, 1, 0, 0)), (2, (0, 0, 1, 1))):  # columns, then rows
        img = F.pad(img, pad, mode="reflect" if img.shape[dim] > 1 else "replicate")
    return F.conv2d(img, kernel)[0, 0]


def qwen3_sink_keep(first_token_scores: torch.Tensor) -> torch.Tensor:
    """Qwen3-VL's sink mask: keep the visual tokens whose first-token score has a sigmoid below 0.75.

    Args:
        first_token_scores: (gh, gw) raw scores of the visual keys for the first sequence token's query, attention
            head 0, scaled by ``1/sqrt(head_dim)`` (`QZoomHeads.first_token_scores`).

    Returns:
        (gh, gw) bool, True = keep.
    """
    return torch.sigmoid(_float_map(first_token_scores, "qwen3_sink_keep")) < QWEN3_SINK_PROB


def qwen_mask(logits: torch.Tensor, threshold: float, keep: torch.Tensor | None) -> torch.Tensor:
    """The Qwen foreground mask: ``blur(sigmoid(logits) * keep) > threshold``; (gh, gw) bool."""
    prob = torch.sigmoid(_float_map(logits, "qwen_mask"))
    if keep is not None:
        if tuple(keep.shape) != tuple(prob.shape):
            raise ValueError(f"sink mask shape {tuple(keep.shape)} does not match logits {tuple(prob.shape)}")
        prob = prob * keep.to("cpu", torch.bool)
    return torchvision_blur3(prob) > float(threshold)


def _edges(cells: Cells, x_scale: float, y_scale: float) -> torch.Tensor:
    """(1, 4) float32 ``[x1, y1, x2, y2]``: the cell range's edges times the pixels per cell along each axis, in the
    released code's order of operations (long -> float, then an in-place multiply by a Python float)."""
    r0, c0, r1, c1 = cells
    b = torch.tensor([[c0, r0, c1, r1]], dtype=torch.long).float()
    b[:, 0::2] *= x_scale
    b[:, 1::2] *= y_scale
    return b


def qwen_box(cells: Cells, grid: Pair, resized_size: Pair, source_size: Pair,
             min_side: int = OFFICIAL_MIN_SIDE_PX) -> Box | None:
    """Cells of the token grid -> the source-pixel box, as the released ``get_bbox4src`` computes it.

    In float32: cell edges times the resized pixels per cell, times source over resized size; each side shorter
    than ``min_side`` grows by the difference around its centre; a box past an edge slides back inside (left and
    top first); the corners are clamped to the image and truncated to integers.

    Args:
        cells: ``(r0, c0, r1, c1)``, exclusive ends.
        grid, resized_size, source_size: ``(gh, gw)``, ``(rw, rh)`` and ``(W, H)`` (see :mod:`qzoom_agent.boxes`).
        min_side: the smallest side in source pixels.

    Returns:
        The box, or None when truncation leaves it empty (only for images under one pixel a side).
    """
    gh, gw = check_pair("grid", grid, 1)
    rw, rh = check_pair("resized_size", resized_size, 1)
    sw, sh = check_pair("source_size", source_size, 1)
    b = _edges(cells, rw / gw, rh / gh)
    src = torch.zeros_like(b)
    src[:, 0::2] = b[:, 0::2] * (sw / rw)
    src[:, 1::2] = b[:, 1::2] * (sh / rh)
    if min_side > 0:
        diff_w = torch.clamp(min_side - (src[:, 2] - src[:, 0]), min=0)
        diff_h = torch.clamp(min_side - (src[:, 3] - src[:, 1]), min=0)
        src[:, 0] -= diff_w / 2
        src[:, 2] += diff_w / 2
        src[:, 1] -= diff_h / 2
        src[:, 3] += diff_h / 2
        for lo, hi, limit in ((0, 2, None), (1, 3, None), (0, 2, sw), (1, 3, sh)):
            shift = -src[:, lo].clamp(max=0) if limit is None else -(src[:, hi] - limit).clamp(min=0)
            src[:, lo] += shift
            src[:, hi] += shift
    src[:, 0::2] = torch.clamp(src[:, 0::2], min=0, max=sw)
    src[:, 1::2] = torch.clamp(src[:, 1::2], min=0, max=sh)
    x1, y1, x2, y2 = src.long()[0].tolist()
    return Box(x1, y1, x2, y2) if x1 < x2 and y1 < y2 else None


def qwen_regions(logits: torch.Tensor, *, threshold: float, keep: torch.Tensor | None, grid: Pair,
                 resized_size: Pair, source_size: Pair) -> list[tuple[Box, Cells]]:
    """The Qwen rule end to end: ``[]`` (no zoom) or ``[(box, cells)]``; ``cells`` place the RoI positions."""
    cells = enclosing_cells(qwen_mask(logits, threshold, keep))
    box = None if cells is None else qwen_box(cells, grid, resized_size, source_size)
    return [] if box is None else [(box, cells)]


def llava_cells(logits: torch.Tensor, threshold: float) -> list[Cells]:
    """SD-RPN's components on LLaVA's map: ``[]`` (no zoom) or one or two ``(r0, c0, r1, c1)`` ranges.

    Args:
        logits: (gh, gw) raw twig scores.
        threshold: foreground threshold on the blurred sigmoid map.
    """
    mask = torchvision_blur3(torch.sigmoid(_float_map(logits, "llava_cells"))) > float(threshold)
    gh, gw = mask.shape
    ranges: list[Cells] = []
    todo = {(int(r), int(c)) for r, c in torch.nonzero(mask).tolist()}
    while todo:  # components in raster order of their first cell, as scikit-image numbers them
        comp, (y0, x0, y1, x1) = flood(todo, min(todo))
        todo -= comp
        area = len(comp)
        if area == 1:
            continue
        if area < LLAVA_MIN_AREA:  # the released growth, truncating with int() and clamping the ends at W-1, H-1
            xc, yc = (x0 + x1) / 2, (y0 + y1) / 2
            w_min, h_min = max(3, x1 - x0 + 1), max(3, y1 - y0 + 1)
            x0, y0 = max(0, int(xc - w_min / 2)), max(0, int(yc - h_min / 2))
            x1, y1 = min(gw - 1, int(xc + w_min / 2)), min(gh - 1, int(yc + h_min / 2))
        if area > LLAVA_MAX_AREA:
            continue
        ranges.append((y0, x0, y1, x1))
    return ranges if 0 < len(ranges) <= LLAVA_MAX_BOXES else []


def llava_box(cells: Cells, grid: Pair, image_side: int, source_size: Pair) -> Box | None:
    """Cells of LLaVA's square grid -> the source-pixel box, undoing the square padding, as SD-RPN maps it.

    In float32: cell edges times ``image_side / grid``, minus the padding the released mapping assumes (the image
    scaled by ``min(side / W, side / H)``, its integer size centred in the square), divided by that scale, clamped
    to the image and truncated. There is no minimum size.

    Returns:
        The box, or None when it lies wholly in the padding (empty after clamping).
    """
    gh, gw = check_pair("grid", grid, 1)
    sw, sh = check_pair("source_size", source_size, 1)
    b = _edges(cells, image_side / gw, image_side / gh)
    ratio = min(image_side / sw, image_side / sh)
    b[:, 0::2] -= (image_side - int(sw * ratio)) / 2
    b[:, 1::2] -= (image_side - int(sh * ratio)) / 2
    src = b / ratio
    src[:, 0::2] = torch.clamp(src[:, 0::2], min=0, max=sw)
    src[:, 1::2] = torch.clamp(src[:, 1::2], min=0, max=sh)
    x1, y1, x2, y2 = src.long()[0].tolist()
    return Box(x1, y1, x2, y2) if x1 < x2 and y1 < y2 else None


def llava_regions(logits: torch.Tensor, *, threshold: float, grid: Pair, image_side: int,
                  source_size: Pair) -> list[tuple[Box, Cells]]:
    """The SD-RPN rule end to end: ``[]`` or up to two ``(box, cells)``, in component order."""
    out = []
    for cells in llava_cells(logits, threshold):
        box = llava_box(cells, grid, image_side, source_size)
        if box is not None:
            out.append((box, cells))
    return out
