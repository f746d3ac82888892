"""ViCrop ("MLLMs Know Where to Look", ICLR 2025), rel-att variant: a training-free crop from the model's attention.

Two forward passes over the one-image prompt, one with the question and one with a generic prompt, give the last
prompt token's attention to the visual tokens at one decoder layer (mean over heads). Their ratio, on the merged-token
grid, is the relative attention map; a window search over it (`adaptive_window`, the reference's
``bbox_from_att_image_adaptive``) gives one box in source pixels; the model then answers once, greedily, from one user
turn holding two images: the original view and the crop.

Deviations from the reference (``qwen2_5_methods.py``, ``utils.py``), each for a reason stated where it is coded:
the attention passes stop after the chosen layer (the layers above it cannot change its attention; only the layers run
are counted); the window's base side is the encoder's input side at this view's budget (`encoder_side`; the reference
hard-codes the fixed input of LLaVA-1.5, 336 px, which this gives for LLaVA too); the crop is enlarged ``zoom`` times
before it is encoded (the reference sends it at the encoder's resolution; the bundled ``zoomworld-tiny`` only reads
enlarged glyphs, like the oracle view; ``zoom=1`` restores the reference); a zero generic attention is guarded.

Eager attention is switched on for the text model during the two attention passes only (the attention weights do
not exist under SDPA or FlashAttention), through ``set_attn_implementation``, and restored afterwards: do not share
one model between threads running this agent. The cost ledger and prompt helpers here also serve `zoomeye_agent`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from ..backbones import BackboneAdapter, ImageInputs
from ..boxes import Box, check_int, sanitize_box
from ..config import budget_for
from ..images import load_image
from ..tools.crop import enlarge
from .agents import AgentResult, Ledger
from .oracle import ORACLE_ZOOM

if TYPE_CHECKING:
    from ..model import QZoomModel

logger = logging.getLogger(__name__)

SHORT_ANSWER = " Answer the question using a single word or phrase."  # the reference's suffix of both prompts
GENERIC_PROMPT = "Write a general description of the image."
WINDOW_RATIOS = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0)
REFERENCE_LAYER, REFERENCE_DEPTH = 22, 28  # attentions[22] of Qwen2.5-VL-7B's 28 decoder layers (0-based)


def default_att_layer(num_layers: int) -> int:
    """The reference's relative depth: 0-based layer 22 of 28, i.e. ``round(22 / 28 * num_layers)``, clipped.

    Examples:
        >>> default_att_layer(28), default_att_layer(36), default_att_layer(4)
        (22, 28, 3)
    """
    return min(num_layers - 1, max(0, round(num_layers * REFERENCE_LAYER / REFERENCE_DEPTH)))


def check_zoom(zoom: object) -> float:
    """``zoom`` as a float if it is a finite number >= 1, else ValueError."""
    if isinstance(zoom, bool) or not isinstance(zoom, (int, float)) or not math.isfinite(zoom) or zoom < 1:
        raise ValueError(f"zoom must be a finite number >= 1, got {zoom!r}")
    return float(zoom)


# ---- costs and prompts shared with zoomeye_agent -------------------------------------------------------------------
def chat_ids(adapter: BackboneAdapter, images: list[ImageInputs], text: str) -> torch.LongTensor:
    """(1, L) ids of one user turn holding ``images`` then ``text``, ending with the assistant header; rendered as
    `BackboneAdapter.build_prompt` renders a one-image prompt (the same ids for one image)."""
    parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    rendered = adapter.tokenizer.apply_chat_template([{"role": "user", "content": parts}], tokenize=False,
                                                     add_generation_prompt=True)
    ids = adapter.expand_images(adapter.tokenizer(rendered, add_special_tokens=False)["input_ids"], images)
    return torch.tensor([ids], dtype=torch.long, device=adapter.device)


def next_token_logits(adapter: BackboneAdapter, ids: torch.LongTensor, images: list[ImageInputs],
                      ledger: Ledger) -> torch.Tensor:
    """(V,) logits after the prompt: one full forward pass of the stock HF model, no cache, no decoding."""
    with torch.inference_mode():
        out = adapter.model(**adapter.hf_inputs(ids, images), use_cache=False, logits_to_keep=1)
    ledger.prefill(ids.shape[1], images, adapter.num_layers)
    return out.logits[0, -1].float()


def generate_answer(adapter: BackboneAdapter, ids: torch.LongTensor, images: list[ImageInputs], max_new_tokens: int,
                    ledger: Ledger) -> str:
    """Greedy answer with the stock HF ``generate``: one prefill, then one single-token pass per further token."""
    with torch.inference_mode():
        out = adapter.model.generate(**adapter.hf_inputs(ids, images), max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=sorted(adapter.eos_token_ids),
                                     pad_token_id=adapter.tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:]
    n = int(new.shape[0])
    ledger.prefill(ids.shape[1], images, adapter.num_layers)
    ledger.generated(n, adapter.num_layers)
    return adapter.tokenizer.decode(new, skip_special_tokens=True).strip()


def encoder_side(view: ImageInputs) -> float:
    """The side of a square holding as many pixels as ``view`` gives the encoder: what "the encoder's input size"
    means for a dynamic-resolution model at this budget (336 for LLaVA-1.5, about 448 for Qwen at 256 tokens)."""
    return math.sqrt(view.resized_size[0] * view.resized_size[1])


def zoom_view(adapter: BackboneAdapter, source: Image.Image, box: Box, zoom: float, tokens: int) -> ImageInputs:
    """The crop of ``box`` enlarged ``zoom`` times (no further than ``tokens`` keep), encoded at <= ``tokens``."""
    px = adapter.px_per_token
    crop = enlarge(source.crop(box.as_tuple()), zoom, max_pixels=tokens * px * px)
    return adapter.prepare_image(crop, min_tokens=min(4, tokens), max_tokens=tokens)


# ---- the window search -----------------------------------------------------------------------------------------
def adaptive_window(att_map: np.ndarray, image_size: tuple[int, int], base: float,
                    ratios: tuple[float, ...] = WINDOW_RATIOS) -> tuple[float, float, float, float]:
    """The reference's adaptive crop window over an attention map.

    For each ratio r, a square window of ``base * r`` pixels (in whole map cells, at least one) slides over the map;
    its peak position is the first maximum of the window sums in x-major order, and its contrast is the peak minus
    the mean of its (up to 4) neighbouring window sums, per cell. The ratio with the highest contrast wins (the first
    on ties); the window of ``base * r`` pixels is centred on its peak window and slid inside the image. When the
    smallest window already covers the whole map, the whole image is returned.

    Args:
        att_map: (gh, gw) finite attention map over the image.
        image_size: (width, height) in pixels of the image the map covers.
        base: the window side at r = 1, in the same pixels.
        ratios: window scales, in increasing order.

    Returns:
        (x1, y1, x2, y2) in pixels, inside the image (floats: round them outward).
    """
    gh, gw = att_map.shape
    width, height = image_size
    cell_w, cell_h = width / gw, height / gh
    integral = np.pad(np.asarray(att_map, dtype=np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    best: tuple[float, float, tuple[int, int], tuple[int, int]] | None = None  # contrast, ratio, (x, y), (nx, ny)
    for i, ratio in enumerate(ratios):
        # at least one cell: a window narrower than a cell would sum nothing (the reference divides by zero there)
        nx = max(1, min(int(base * ratio / cell_w), gw))
        ny = max(1, min(int(base * ratio / cell_h), gh))
        if nx >= gw and ny >= gh:
            if i == 0:
                return 0.0, 0.0, float(width), float(height)
            continue
        sums = integral[ny:, nx:] - integral[:-ny, nx:] - integral[ny:, :-nx] + integral[:-ny, :-nx]
        x, y = np.unravel_index(int(np.argmax(sums.T)), sums.T.shape)  # x-major, as the reference's loops
        around = [sums[y, x + d] for d in (-1, 1) if 0 <= x + d < sums.shape[1]]
        around += [sums[y + d, x] for d in (-1, 1) if 0 <= y + d < sums.shape[0]]
        contrast = (sums[y, x] - float(np.mean(around))) / (nx * ny)
        if best is None or contrast > best[0]:
            best = (contrast, ratio, (int(x), int(y)), (nx, ny))
    _, ratio, (x, y), (nx, ny) = best
    half = base * ratio // 2
    cx = min(max(int(x * cell_w + cell_w * nx / 2), half), width - half)
    cy = min(max(int(y * cell_h + cell_h * ny / 2), half), height - half)
    return max(0.0, cx - half), max(0.0, cy - half), min(float(width), cx + half), min(float(height), cy + half)


def map_to_source_box(att_map: np.ndarray, view: ImageInputs, base: float) -> Box | None:
    """`adaptive_window` on a view's map, in source pixels; a LLaVA map covers the padded square canvas, so the
    window is found on the canvas and shifted back onto the source. None when nothing of it lies on the source."""
    ox, oy, cw, ch = view.canvas if view.canvas is not None else (0, 0, *view.source_size)
    x1, y1, x2, y2 = adaptive_window(att_map, (cw, ch), base)
    return sanitize_box(x1 - ox, y1 - oy, x2 - ox, y2 - oy, view.source_size)


@contextmanager
def eager_text_attention(adapter: BackboneAdapter) -> Iterator[None]:
    """The text model under eager attention (the only one that returns attention weights), through the public
    ``set_attn_implementation``; its own implementation is restored on exit. The vision tower is left alone."""
    before = adapter.text_config._attn_implementation
    adapter.model.set_attn_implementation({"text_config": "eager"})
    try:
        yield
    finally:
        adapter.model.set_attn_implementation({"text_config": before})


class _Stop(Exception):
    """Ends an attention pass after the chosen layer."""


class ViCropAgent:
    """ViCrop's rel-att method around a plain VLM (its Q-Zoom heads, if any, are not used).

    Args:
        model: the loaded model.
        tokens: max visual tokens of the global view (min ``min(256, tokens)``), also the crop's cap by default.
        name: the agent's name in results.
        att_layer: the 0-based decoder layer whose attention is read; default `default_att_layer`.
        generic_prompt: the prompt whose attention normalises the question's.
        instruction: the suffix of the question and generic prompts (the reference's short-answer instruction).
        max_new_tokens: decoding budget of the answer.
        zoom: enlargement of the crop before encoding (1 sends it at native resolution, as the reference).
        crop_tokens: max visual tokens of the crop; default ``tokens`` (the reference caps both images alike).

    Raises:
        ValueError: a budget, layer or zoom out of range, or an empty prompt.
    """

    def __init__(self, model: QZoomModel, tokens: int, name: str, *, att_layer: int | None = None,
                 generic_prompt: str = GENERIC_PROMPT, instruction: str = SHORT_ANSWER, max_new_tokens: int = 8,
                 zoom: float = ORACLE_ZOOM, crop_tokens: int | None = None) -> None:
        self.model = model
        self.budget = budget_for(check_int("tokens", tokens, 1))
        self.name = name
        n_layers = model.adapter.num_layers
        self.att_layer = default_att_layer(n_layers) if att_layer is None else att_layer
        check_int("att_layer", self.att_layer, 0)
        if self.att_layer >= n_layers:
            raise ValueError(f"att_layer must be below the model's {n_layers} decoder layers, got {self.att_layer}")
        if not isinstance(generic_prompt, str) or not generic_prompt.strip():
            raise ValueError(f"generic_prompt must be a non-empty string, got {generic_prompt!r}")
        if not isinstance(instruction, str):
            raise ValueError(f"instruction must be a string, got {instruction!r}")
        self.generic_prompt, self.instruction = generic_prompt, instruction
        self.max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
        self.zoom = check_zoom(zoom)
        self.crop_tokens = tokens if crop_tokens is None else check_int("crop_tokens", crop_tokens, 1)
        self.last_error: str | None = None  # why the last question fell back to the global view, if it did

    def attention_row(self, view: ImageInputs, text: str, ledger: Ledger) -> np.ndarray:
        """(gh, gw) attention of the last prompt token to the visual tokens at `att_layer`, mean over heads.

        The pass runs layers 0..att_layer only and is counted as one forward pass over those layers. Call it under
        `eager_text_attention`.
        """
        a = self.model.adapter
        ids = chat_ids(a, [view], text)
        seen: dict[str, torch.Tensor] = {}

        def keep(module: torch.nn.Module, args: Any, out: Any) -> None:
            seen["weights"] = out[1]  # eager attention returns (output, weights (1, heads, q, k))

        def stop(module: torch.nn.Module, args: Any, out: Any) -> None:
            raise _Stop

        layer = a.layers[self.att_layer]
        hooks = [layer.self_attn.register_forward_hook(keep), layer.register_forward_hook(stop)]
        try:
            with torch.inference_mode():
                a.model(**a.hf_inputs(ids, [view]), use_cache=False)
        except _Stop:
            pass
        finally:
            for h in hooks:
                h.remove()
        ledger.prefill(ids.shape[1], [view], self.att_layer + 1)
        weights = seen.get("weights")
        if weights is None:
            raise RuntimeError(f"layer {self.att_layer} returned no attention weights (is eager attention honoured?)")
        at = (ids[0] == a.image_token_id).nonzero().flatten()
        row = weights[0, :, -1, at].float().mean(0)
        return row.reshape(view.grid).cpu().numpy()

    def relative_attention(self, view: ImageInputs, question: str, ledger: Ledger) -> np.ndarray:
        """(gh, gw) finite map ``att(question) / att(generic prompt)``; both passes under eager attention, restored
        to the model's own implementation afterwards."""
        with eager_text_attention(self.model.adapter):
            att_q = self.attention_row(view, question + self.instruction, ledger)
            att_g = self.attention_row(view, self.generic_prompt + self.instruction, ledger)
        # a softmax weight that underflowed to 0 would make the ratio infinite; floor it far below the map's scale
        floor = max(float(att_g.max()) * 1e-6, np.finfo(np.float32).tiny)
        return np.nan_to_num(att_q / np.maximum(att_g, floor), nan=0.0, posinf=0.0, neginf=0.0)

    def run(self, image: Any, question: str) -> AgentResult:
        """Answer ``question`` about ``image`` from the original view and ViCrop's crop, in one turn.

        A failure of the crop (no box, an empty crop, an error in the attention passes) falls back to answering from
        the global view alone: the result then has ``zooms=0`` and ``bbox=None``, its costs include the passes that
        ran, and `last_error` says why.
        """
        t0 = time.perf_counter()
        a, ledger = self.model.adapter, Ledger()
        source = load_image(image)
        view = a.prepare_image(source, min_tokens=self.budget[0], max_tokens=self.budget[1])
        self.last_error = None
        images, box = [view], None
        try:
            att = self.relative_attention(view, question, ledger)
            # the reference's window: the encoder's input side in source pixels, so r = 1 crops at native resolution
            box = map_to_source_box(att, view, encoder_side(view))
            if box is None:
                raise ValueError("the attention window lies outside the image")
            images = [view, zoom_view(a, source, box, self.zoom, self.crop_tokens)]
        except Exception as err:  # noqa: BLE001 - any failure of the search answers from the global view
            logger.warning("%s: no crop (%s); answering from the global view", self.name, err)
            self.last_error = f"{type(err).__name__}: {err}"
            images, box = [view], None
        prompt = question + self.instruction
        text = generate_answer(a, chat_ids(a, images, prompt), images, self.max_new_tokens, ledger)
        return ledger.result(text, t0, zooms=len(images) - 1, bbox=box)
