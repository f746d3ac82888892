"""Where the twig looks: its token scores for the question or any text, and the boxes the box rules make of them.

The twig reads the layer-K states of the perception's prompt. A query other than the question runs only its own
tokens below layer K, on a copy of the cached image prefix. The scores become boxes by the family's released rule
(`roi_official`) or by one of this project's rules (`roi`).
"""

from __future__ import annotations

from typing import Protocol

import torch

from . import boxes as box_lib
from . import roi as roi_lib
from . import roi_official
from .backbones import BackboneAdapter, Prompt
from .boxes import Cells
from .config import QZoomConfig
from .engine import DecoderRunner
from .heads import QZoomHeads
from .perception import PerceptionState


class QZoomModel(Protocol):
    """What these functions use of `qzoom_agent.model.QZoomModel` (named here, not imported: the model imports
    this module)."""

    adapter: BackboneAdapter
    config: QZoomConfig
    heads: QZoomHeads
    runner: DecoderRunner

    def _below_k(self, ids: torch.Tensor, positions: torch.Tensor, visual) -> tuple: ...


def query_pass(model: QZoomModel, fp: PerceptionState, query: str
           ) -> tuple[torch.Tensor, tuple, torch.Tensor | None, Prompt]:
    """Layers < K for the prompt built from ``query`` on the same image, for the twig only.

    The tokens up to the end of the image are the first pass's, so their cache below K is reused (in a new
    cache: the first pass's must stay as it is for the answer); only the query's own tokens run.

    Returns:
        ``(hidden_k, rotary, mask, prompt)`` for the query prompt, as in :class:`PerceptionState`.
    """
    a, k = model.adapter, model.config.twig_K
    img = fp.prompt.image
    prompt = a.build_prompt(img, query, system=fp.system)
    positions = a.positions(prompt.input_ids, [img])
    ids, old = prompt.input_ids, fp.prompt.input_ids
    p = fp.prompt.image_end
    shared = prompt.image_end == p and ids.shape[1] > p and torch.equal(ids[:, :p], old[:, :p])
    if not shared:  # a template that puts text before the image: run the query prompt in full
        hidden_k, rotary, mask, _ = model._below_k(ids, positions, fp.visual)
        fp.layer_tokens += ids.shape[1] * k
        return hidden_k, rotary, mask, prompt
    cache = model.runner.new_cache()  # the shared prefix's keys and values below K, not the question's
    for i in range(k):
        layer = fp.cache.layers[i]
        cache.update(layer.keys[..., :p, :], layer.values[..., :p, :], i)
    tail_ids = ids[:, p:]
    tail = a.embed(tail_ids, None)
    rotary = a.rotary(tail, positions)
    tail_rotary = (rotary[0][:, p:], rotary[1][:, p:])
    tail_mask = model.runner.causal_mask(tail, cache, layer_idx=0)
    tail = model.runner.run(0, k, tail, tail_rotary, tail_mask, cache, a.image_mask(tail_ids), None)
    fp.layer_tokens += tail_ids.shape[1] * k
    hidden_k = torch.cat([fp.hidden_k[:, :p], tail], 1)
    mask = model.runner.causal_mask(hidden_k, model.runner.new_cache())
    return hidden_k, rotary, mask, prompt

def twig_regions(model: QZoomModel, fp: PerceptionState, query: str | None = None
                 ) -> tuple[torch.Tensor, list[box_lib.Box], list[Cells]]:
    """The twig's (gh, gw) logits for ``query`` (default: the question) and the boxes and cells they give."""
    a, cfg, img = model.adapter, model.config, fp.prompt.image
    hidden_k, rotary, mask, prompt = (fp.hidden_k, fp.rotary, fp.mask, fp.prompt) if query is None else \
        query_pass(model, fp, query)
    states = model.heads.twig_states(hidden_k, rotary, mask)
    fp.layer_tokens += hidden_k.shape[1] * model.heads.T  # the last twig layer's q/k counted as a layer
    logits = model.heads.roi_scores(a, states, rotary, prompt.image_start, prompt.image_end, rope=cfg.twig_rope,
                                    multi_head=cfg.roi_multi_head).reshape(img.grid)
    if (cfg.roi_mode or "official") == "official":
        regions = official_regions(model, logits, states, rotary, prompt)
        return logits, [b for b, _ in regions], [c for _, c in regions]
    if a.family == "llava":
        raise ValueError(f"roi_mode {cfg.roi_mode!r} maps boxes on an unpadded view; LLaVA pads its view to a "
                         "square, so it zooms with SD-RPN's rule (roi_mode 'official')")
    roi_cfg = roi_lib.RoiConfig(
        threshold=cfg.roi_threshold,
        sink_min_tokens=cfg.sink_min_tokens,
        mode=cfg.roi_mode,
        peak_ratio=cfg.roi_peak_ratio,
        min_side_tokens=cfg.roi_min_side_tokens,
    )
    sink = None if roi_cfg.mode == "components" else roi_lib.qwen_sink_mask(*img.grid, roi_cfg.sink_min_tokens)
    boxes = roi_lib.propose_boxes(
        logits.float().cpu(),  # a few hundred scores: box geometry runs on the CPU, like the sink mask
        grid=img.grid,
        resized_size=img.resized_size,
        source_size=img.source_size,
        cfg=roi_cfg,
        sink_mask=sink,
    )
    # this project's rules take the cells a box overlaps for its positions
    return logits, boxes, [box_lib.box_to_cells(b, img.grid, img.resized_size, img.source_size) for b in boxes]

def official_regions(model: QZoomModel, logits: torch.Tensor, states: torch.Tensor, rotary: tuple, prompt: Prompt
                     ) -> list[tuple[box_lib.Box, Cells]]:
    """The released rule of the family (`roi_official`): Qwen2.5-VL's corner-strip sinks, Qwen3-VL's
    query-based sinks, SD-RPN's components on LLaVA."""
    a, cfg, img = model.adapter, model.config, prompt.image
    scores = logits.float().cpu()
    if a.family == "llava":
        return roi_official.llava_regions(scores, threshold=cfg.roi_threshold, grid=img.grid,
                                          image_side=img.resized_size[0], source_size=img.source_size)
    if a.family == "qwen3_vl":
        first = model.heads.first_token_scores(a, states, rotary, prompt.image_start, prompt.image_end)
        keep = roi_official.qwen3_sink_keep(first.reshape(img.grid))
    else:
        keep = roi_lib.qwen_sink_mask(*img.grid, cfg.sink_min_tokens)
    return roi_official.qwen_regions(scores, threshold=cfg.roi_threshold, keep=keep, grid=img.grid,
                                     resized_size=img.resized_size, source_size=img.source_size)
