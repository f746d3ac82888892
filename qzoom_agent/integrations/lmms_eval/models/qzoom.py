"""`QZoomLMM`: a Q-Zoom model (`qzoom_agent.model.QZoomModel`) as an lmms-eval model.

It follows the released Q-Zoom evaluation (a fork of lmms-eval): one request at a time (batch size 1), one image per
question, greedy decoding with each task's ``max_new_tokens``, "Answer the question using a single word or phrase."
appended to every prompt that lacks it, and per-task RoI and gate thresholds and view budgets
(:mod:`qzoom_agent.presets`; ``preset=auto`` picks them from the task name). It generates only: lmms-eval's
loglikelihood and multi-round requests raise ``NotImplementedError``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import PurePath
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from qzoom_agent.config import QZoomConfig
from qzoom_agent.engine import Sampling
from qzoom_agent.integrations.lmms_eval import preset_for_task
from qzoom_agent.loading import resolve_device
from qzoom_agent.model import QZoomModel
from qzoom_agent.presets import get_preset, preset_names

logger = logging.getLogger(__name__)

ANSWER_HINT = "Answer the question using a single word or phrase."
MODES = ("auto", "never", "always")
# QZoomConfig fields a model_args entry may set: those read per question, so a per-task config can swap them in
RUNTIME_FIELDS = ("roi_threshold", "gate_threshold", "min_tokens", "max_tokens", "roi_min_tokens", "roi_max_tokens",
                  "roi_mode", "reuse_src_pos")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class QZoomLMM(lmms):
    """lmms-eval's ``qzoom`` model: each ``generate_until`` request answered by `QZoomModel.answer`.

    Args:
        pretrained: a model directory (a released Q-Zoom checkpoint, or a base model with a ``qzoom/`` adapter) or
            ``"zoomworld-tiny"``, the bundled model.
        qzoom: a Q-Zoom adapter directory, or None to find the heads in ``pretrained`` (as
            `QZoomModel.from_pretrained` does).
        preset: ``"auto"`` picks the released settings of each request's task (``docvqa_val`` -> ``docvqa``,
            ``hrbench4k`` -> ``hrbench``, ...; a task without one is an error), a preset name (``docvqa``, ``hr``,
            ...) applies one to every task, and None or ``"none"`` keeps the checkpoint's config.
        device: ``"auto"`` (CUDA when available, on the process's ``LOCAL_RANK`` under a multi-process launch),
            ``"cpu"``, ``"cuda:0"``, ...
        dtype: ``"auto"`` (fp32 on the CPU, bf16 on a GPU) or a torch dtype name.
        mode: ``"auto"`` follows the gate, ``"never"`` answers from the global view only (the baseline),
            ``"always"`` zooms whenever the twig proposes a box.
        max_new_tokens: the decoding budget of a task whose ``generation_kwargs`` set none (the released
            wrapper's 128).
        batch_size: must be 1: Q-Zoom answers one question at a time.
        max_batch_size: accepted for lmms-eval's command line and ignored.
        system_prompt: a system prompt, or None for the chat template's default.
        answer_hint: append "Answer the question using a single word or phrase." to prompts that lack it, as the
            released evaluation does (also to multiple-choice prompts).
        **overrides: QZoomConfig fields that win over the preset: ``roi_threshold``, ``gate_threshold``,
            ``min_tokens``, ``max_tokens``, ``roi_min_tokens``, ``roi_max_tokens``, ``roi_mode``, ``reuse_src_pos``.

    Attributes:
        model: the loaded `QZoomModel`.
        records: one dict per answered request: task, doc_id, preset, gate_score, zoomed, bbox, visual_tokens,
            generated_tokens and latency_s.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str = "zoomworld-tiny",
        qzoom: str | bool | None = None,
        preset: str | None = None,
        device: str | None = "auto",
        dtype: str = "auto",
        mode: str = "auto",
        max_new_tokens: int = 128,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        system_prompt: str | None = None,
        answer_hint: bool = True,
        **overrides: Any,
    ) -> None:
        super().__init__()
        follow_lmms_verbosity()
        unknown = sorted(set(overrides) - set(RUNTIME_FIELDS))
        if unknown:
            raise TypeError(f"qzoom: unknown model_args {', '.join(unknown)}; the QZoomConfig fields accepted are "
                            f"{', '.join(RUNTIME_FIELDS)}")
        if str(batch_size) != "1":
            raise ValueError(f"qzoom answers one request at a time: batch_size must be 1, got {batch_size!r}")
        if mode not in MODES:
            raise ValueError(f"qzoom: mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"qzoom: max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        preset = None if preset in (None, "none", "None", "") else str(preset)
        if preset is not None and preset != "auto" and preset not in preset_names():
            raise ValueError(f"qzoom: unknown preset {preset!r}; choose auto, none or one of "
                             f"{', '.join(preset_names())}")
        self.preset, self.mode, self.max_new_tokens = preset, mode, max_new_tokens
        self.system_prompt, self.answer_hint, self.overrides = system_prompt, bool(answer_hint), dict(overrides)
        device_name, torch_dtype = _device(device, dtype)
        self.model = QZoomModel.from_pretrained(pretrained, qzoom, device=device_name, dtype=torch_dtype)
        if self.model.heads is None and mode != "never":
            raise ValueError(f"qzoom: {pretrained} has no Q-Zoom heads; pass qzoom=ADAPTER_DIR, or mode=never for the "
                             "baseline")
        self._device = torch.device(device_name)
        self._base_config = self.model.config
        self._configs: dict[str | None, QZoomConfig] = {}
        self._config_for(None if preset == "auto" else preset)  # a bad override fails here, not at the first doc
        self.records: list[dict[str, Any]] = []
        logger.info("qzoom: %s (%s) on %s, preset=%s, mode=%s", pretrained, self.model.adapter.family, device_name,
                    preset, mode)

    @property
    def device(self) -> torch.device:
        """The device the model runs on."""
        return self._device

    @property
    def batch_size(self) -> int:
        """Always 1."""
        return 1

    # ---- configuration per task --------------------------------------------------------------------------------
    def _preset_of(self, task: str) -> str | None:
        if self.preset != "auto":
            return self.preset
        name = preset_for_task(task)
        if name is None:
            raise ValueError(f"qzoom: preset=auto has no preset for the task {task!r}; pass preset=NAME (one of "
                             f"{', '.join(preset_names())}) or preset=none in --model_args")
        return name

    def _config_for(self, preset: str | None) -> QZoomConfig:
        """The checkpoint's config with ``preset``'s settings, then the model_args overrides (cached per preset)."""
        if preset not in self._configs:
            fields = get_preset(preset, self.model.adapter.family).overrides() if preset else {}
            self._configs[preset] = QZoomConfig.model_validate(
                {**self._base_config.model_dump(), **fields, **self.overrides})
        return self._configs[preset]

    # ---- lmms-eval requests ------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answer each request's question about its one image; the text is cut at the first ``until`` string."""
        answers = []
        zoomed = 0
        with tqdm(total=len(requests), disable=self.rank != 0, desc="qzoom") as bar:
            for request in requests:
                answers.append(self._generate_one(request))
                zoomed += self.records[-1]["zoomed"]
                bar.update(1)
        logger.info("qzoom: answered %d requests, zoomed on %d", len(requests), zoomed)
        return answers

    def _generate_one(self, request: Instance) -> str:
        if len(request.args) != 6:
            raise ValueError(f"qzoom is a simple lmms-eval model: a request's arguments are (context, gen_kwargs, "
                             f"doc_to_visual, doc_id, task, split), got {len(request.args)} of them")
        context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
        image = self._image(doc_to_visual, task, split, doc_id)
        max_new_tokens, until, sampling = _generation(gen_kwargs or {}, self.max_new_tokens)
        question = context
        if self.answer_hint and ANSWER_HINT not in question:
            question = f"{question}\n{ANSWER_HINT}"
        preset = self._preset_of(task)
        self.model.config = self._config_for(preset)
        answer = self.model.answer(image, question, mode=self.mode, max_new_tokens=max_new_tokens,
                                   system=self.system_prompt, sampling=sampling)
        text = answer.text
        for stop in until:
            text = text.split(stop, 1)[0]
        record = {"task": task, "doc_id": doc_id, "preset": preset, "gate_score": answer.gate_score,
                  "zoomed": answer.zoomed, "bbox": answer.bbox.to_json() if answer.bbox else None,
                  "visual_tokens": answer.visual_tokens, "generated_tokens": answer.generated_tokens,
                  "latency_s": answer.latency_s}
        self.records.append(record)
        logger.debug("qzoom %s doc %s: gate=%s zoomed=%s bbox=%s visual_tokens=%d %.3fs", task, doc_id,
                     answer.gate_score, answer.zoomed, record["bbox"], answer.visual_tokens, answer.latency_s)
        self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return text

    def _image(self, doc_to_visual: Callable[[Any], Any], task: str, split: str, doc_id: Any) -> Image.Image | str:
        """The request's one image: a PIL image, or the path of an image file."""
        try:
            doc = self.task_dict[task][split][doc_id]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"qzoom: no document {doc_id!r} in task_dict[{task!r}][{split!r}] (lmms-eval fills "
                             "task_dict before it sends requests)") from None
        visuals = doc_to_visual(doc)
        visuals = [] if visuals is None else [visuals] if not isinstance(visuals, (list, tuple)) else list(visuals)
        where = f"task {task!r}, doc {doc_id!r}"
        if len(visuals) != 1:
            raise ValueError(f"qzoom answers a question about one image; {where} has {len(visuals)} visuals")
        visual = visuals[0]
        if isinstance(visual, Image.Image):
            return visual
        if isinstance(visual, (str, os.PathLike)) and PurePath(visual).suffix.lower() in IMAGE_SUFFIXES:
            return os.fspath(visual)
        kind = "a video or other file" if isinstance(visual, (str, os.PathLike)) else type(visual).__name__
        raise ValueError(f"qzoom answers about still images only; {where} gives {kind}: {str(visual)[:80]!r}")

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Not supported: Q-Zoom decides to zoom while generating an answer."""
        raise NotImplementedError("qzoom generates answers only: loglikelihood (multiple_choice) tasks are not "
                                  "supported; use the task's generate_until variant")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        """Not supported: one question per image."""
        raise NotImplementedError("qzoom answers one question per image: multi-round tasks are not supported")


def follow_lmms_verbosity() -> None:
    """Show this module's log lines (one DEBUG line per answer: gate score, zoom, box) at lmms-eval's ``--verbosity``.

    lmms-eval logs through loguru and leaves the standard logging unconfigured; it exports ``--verbosity`` as
    ``$VERBOSITY``. When the program configured no logging, this module's logger gets its own stderr handler at that
    level; nothing else is touched.
    """
    level = logging.getLevelName(os.environ.get("VERBOSITY", "").upper())
    if not isinstance(level, int) or logging.getLogger().handlers or logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-8s | %(name)s - %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)


def _device(device: str | None, dtype: str) -> tuple[str, torch.dtype]:
    """The device and dtype to load on; ``auto`` under a multi-process launch takes the process's local GPU."""
    device = device or "auto"
    local_rank = os.environ.get("LOCAL_RANK")
    if device in ("auto", "cuda") and local_rank is not None and torch.cuda.is_available():
        device = f"cuda:{int(local_rank)}"
    if dtype != "auto" and not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise ValueError(f"qzoom: dtype must be auto or a torch dtype name such as bfloat16, got {dtype!r}")
    return resolve_device(device, dtype)


def _generation(gen_kwargs: dict[str, Any], default_tokens: int) -> tuple[int, list[str], Sampling | None]:
    """``(max_new_tokens, until, sampling)`` from a task's generation kwargs (greedy unless it asks to sample)."""
    max_new_tokens = int(gen_kwargs.get("max_new_tokens") or default_tokens)
    until = gen_kwargs.get("until") or []
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, (list, tuple)) or not all(isinstance(s, str) for s in until):
        raise ValueError(f"qzoom: gen_kwargs['until'] must be a string or a list of strings, got {until!r}")
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    sampling = None
    if gen_kwargs.get("do_sample") and temperature > 0:
        sampling = Sampling(temperature=temperature, top_p=float(gen_kwargs.get("top_p") or 1.0))
    return max_new_tokens, [s for s in until if s], sampling
