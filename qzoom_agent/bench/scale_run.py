"""The timed part of `bench-scale` (`scale`): a random-weight model, synthetic images, the variants and the rounds.

Kept apart from `scale` so that the CLI's parser does not import torch and transformers.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from ..boxes import Box
from ..checks import UsageError
from ..config import QZoomConfig, budget_for
from . import scale_report
from .scale_archs import ArchSpec, hf_config, parameter_counts

if TYPE_CHECKING:
    from ..model import QZoomModel

QUESTION = "What is written on the small green tag in the lower left corner of the image?"
ROI_FRACTION = 0.5  # the fixed RoI: a centred box of half the image's width and height (a quarter of its area)
VARIANTS = ("plain_prefill", "plain_answer", "plain_engine", "qzoom_rate0", "qzoom_rate1")


def synthetic_image(grid: tuple[int, int], px_per_token: int, source_scale: float, seed: int) -> Image.Image:
    """Random RGB noise whose global view is exactly ``grid = (rows, cols)`` tokens under a budget of rows * cols:
    the grid's pixel size times ``source_scale`` (1: the view is the image itself)."""
    rows, cols = grid
    width, height = round(cols * px_per_token * source_scale), round(rows * px_per_token * source_scale)
    g = torch.Generator().manual_seed(seed + rows * cols)
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy())


def roi_box(image: Image.Image) -> Box:
    """The fixed RoI: the centred box of `ROI_FRACTION` of the image's width and height."""
    w, h = image.size
    bw, bh = max(1, round(w * ROI_FRACTION)), max(1, round(h * ROI_FRACTION))
    x1, y1 = (w - bw) // 2, (h - bh) // 2
    return Box(x1, y1, x1 + bw, y1 + bh)


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU (`loading.resolve_device`'s rule); ``cuda`` without a GPU is a
    `UsageError`."""
    from ..loading import resolve_device as run_device

    try:
        device = torch.device(run_device(name)[0])
    except RuntimeError:
        raise UsageError(f"--device must be auto, cpu or cuda[:N], got {name!r}") from None
    if device.type not in ("cuda", "cpu"):
        raise UsageError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but torch sees no CUDA device (torch.cuda.is_available() is "
                         "False); use --device cpu")
    return device


def check_memory(spec: ArchSpec, device: torch.device, dtype: torch.dtype) -> float:
    """The weights' size in GiB (base model and heads); a `UsageError` when it exceeds the device's memory (total
    RAM on the CPU, free memory on CUDA), before anything is allocated."""
    counts = parameter_counts(spec)
    per_layer = counts["decoder"] / spec.layers
    params = sum(counts.values()) + 2 * spec.twig_T * per_layer  # the twig and the gate copy T layers each
    need = params * torch.empty((), dtype=dtype).element_size() / 2**30
    if device.type == "cuda":
        have = torch.cuda.mem_get_info(device)[0] / 2**30
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    if need > have:
        raise UsageError(f"{spec.arch} at size {spec.size} needs about {need:.0f} GiB for its weights in "
                         f"{str(dtype).removeprefix('torch.')}, more than the {have:.0f} GiB of {device}; use "
                         "--size medium on the CPU, or a GPU for --size full")
    return need


def build_model(spec: ArchSpec, device: torch.device, dtype: torch.dtype, seed: int = 0) -> QZoomModel:
    """A random-weight model of ``spec`` on ``device`` in ``dtype`` (sdpa attention), with fresh Q-Zoom heads.

    The weights are created on ``device`` directly (a full 7B in bf16 never passes through CPU memory).

    Returns:
        A `QZoomModel` whose twig and gate are copies of base layers K..K+T-1 (K, T from ``spec``).
    """
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    from ..backbones import adapter_class_for
    from ..model import QZoomModel
    from ..tokenization import build_char_tokenizer

    tok = build_char_tokenizer(spec.family)
    config = hf_config(spec, tok)
    cls = Qwen2_5_VLForConditionalGeneration if spec.family == "qwen2_5_vl" else Qwen3VLForConditionalGeneration
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    adapter_cls = adapter_class_for(model.config)
    adapter = adapter_cls(model, tok, adapter_cls.default_image_processor(model.config))
    qm = QZoomModel(adapter, None, QZoomConfig(twig_K=spec.twig_K, twig_T=spec.twig_T))
    qm.init_heads()
    return qm


def set_attention(qm: QZoomModel, attn: str) -> None:
    """Switch the backbone to ``attn`` and rebuild the heads (copies of base layers keep the attention they were
    copied under)."""
    qm.adapter.model.set_attn_implementation(attn)
    qm.init_heads()


class Clock:
    """``perf_counter`` that first waits for queued CUDA work, so a split holds the work done inside it."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def _plain_inputs(qm: QZoomModel, image: Image.Image, budget: int) -> tuple[dict[str, torch.Tensor], int]:
    """The HF inputs of the image at ``budget`` and `QUESTION` (taken through ``load_image`` as Q-Zoom's side),
    and the prompt length."""
    from ..images import load_image

    a = qm.adapter
    lo, hi = budget_for(budget)
    img = a.prepare_image(load_image(image), min_tokens=lo, max_tokens=hi)
    prompt = a.build_prompt(img, QUESTION)
    return a.hf_inputs(prompt.input_ids.to(a.device), [img]), int(prompt.input_ids.shape[1])


def make_variants(qm: QZoomModel, image: Image.Image, budget: int, new_tokens: int, clock: Clock
                  ) -> dict[str, Callable[[], dict[str, float]]]:
    """The timed variants at one budget; each call returns wall times in seconds (``total`` and its splits).

    The global view holds ``budget`` visual tokens; the RoI view of `roi_box` what ``prepare_roi`` gives it under
    the same budget (returned as ``roi_tokens``, with the sequence ``length`` and the decode steps).
    """
    box = roi_box(image)
    span = budget_for(budget)
    model = qm.adapter.model

    def plain_prefill() -> dict[str, float]:
        t0 = clock()
        inputs, _ = _plain_inputs(qm, image, budget)
        model(**inputs, logits_to_keep=1)
        return {"total": clock() - t0}

    def plain_answer() -> dict[str, float]:
        t0 = clock()
        inputs, length = _plain_inputs(qm, image, budget)
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        total = clock() - t0
        if out.shape[1] - length != new_tokens:
            raise RuntimeError(f"generate made {out.shape[1] - length} tokens, not {new_tokens}")
        return {"total": total}

    def plain_engine() -> dict[str, float]:
        """The plain model on this library's engine (no gate, no twig): the like-for-like baseline of Q-Zoom's
        answer, whose prefill, cache and decode loop are the same code."""
        t0 = clock()
        pre = qm.look(qm.prefill(image, QUESTION, budget=span))
        qm.runner.decode(pre.logits, pre.cache, pre.next_position, new_tokens, stop_ids=set())
        return {"total": clock() - t0}

    def qzoom(zoom: bool) -> dict[str, float]:
        t0 = clock()
        p = qm.perceive(image, QUESTION, roi="always" if zoom else "never", budget=span)
        t1 = clock()
        pre = qm.zoom(p, box) if zoom else qm.look(p)
        t2 = clock()
        out = qm.runner.decode(pre.logits, pre.cache, pre.next_position, new_tokens, stop_ids=set())
        t3 = clock()
        return {"total": t3 - t0, "perceive": t1 - t0, "finish": t2 - t1, "decode": t3 - t2,
                "decode_steps": float(out.steps), "roi_tokens": float(pre.roi_tokens), "length": float(pre.length)}

    return {"plain_prefill": plain_prefill, "plain_answer": plain_answer, "plain_engine": plain_engine,
            "qzoom_rate0": lambda: qzoom(False), "qzoom_rate1": lambda: qzoom(True)}


def measure_budget(qm: QZoomModel, budget: int, grid: tuple[int, int], *, rounds: int, new_tokens: int,
                   source_scale: float, seed: int, clock: Clock, bar: Any = None) -> dict[str, Any]:
    """One warm-up pass of every variant, then ``rounds`` rounds, each running every variant once in an order that
    rotates by one per round; the medians as one `scale_report.make_row` row (``bar`` advances once per pass)."""
    image = synthetic_image(grid, qm.adapter.px_per_token, source_scale, seed)
    variants = make_variants(qm, image, budget, new_tokens, clock)
    with torch.inference_mode():
        for fn in variants.values():
            fn()
        if bar is not None:
            bar.update(1)
        samples: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
        for r in range(rounds):
            shift = r % len(VARIANTS)
            for name in VARIANTS[shift:] + VARIANTS[:shift]:
                samples[name].append(variants[name]())
            if bar is not None:
                bar.update(1)
    medians = {name: {key: statistics.median(s[key] for s in runs) for key in runs[0]}
               for name, runs in samples.items()}
    totals = {name: [s["total"] for s in runs] for name, runs in samples.items()}
    return scale_report.make_row(budget, grid, image.size, roi_box(image), medians, new_tokens, totals)


def measure_on_device(qm: QZoomModel, budget: int, grid: tuple[int, int], device: torch.device,
                      **settings: Any) -> dict[str, Any]:
    """`measure_budget` with the CUDA cache emptied first and the peak memory added (``peak_memory_gib``)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    row = measure_budget(qm, budget, grid, **settings)
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` is running out of GPU or CPU memory."""
    text = str(err).lower()
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text \
        or "can't allocate memory" in text


def free_memory(device: torch.device) -> None:
    """Give cached CUDA blocks back after a failure."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
