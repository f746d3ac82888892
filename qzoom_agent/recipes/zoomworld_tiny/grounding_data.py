"""Phase-4 data: grounding in the DeepEyes tool-call format, so the external-crop baseline has a real policy.

Three kinds of example, drawn per index from a seeded stream (a pure function of its arguments):

* ``zoom``: a ZoomWorld scene with a fine question, shown at a global-view budget drawn from ``view_tokens``
  under the DeepEyes agent's system prompt (`bench.deepeyes_agent`). The policy calls ``image_zoom_in_tool`` with
  a box around the target (``margin`` target sizes of context per side) in pixels of the resized view
  (Qwen2.5-VL's frame); the tool turn holds what the agent's tool returns for that region
  (`tool_response_view`); then the policy answers.
* ``direct``: a coarse question under the same system prompt, answered without a call.
* ``answer``: a phase-2/3 answer example (`answer_data`) without the system prompt, so that without it the model
  keeps answering directly (measured, it still loses some oracle-view reading: docs/zoomworld-tiny.md, "Grounding").

The call text and the answers (each with ``<|im_end|>``) are supervised; prompts and tool turns are not.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ...backbones import BackboneAdapter, ImageInputs
from ...bench.deepeyes_agent import TOOL_TOKENS, policy_messages, tool_response_view
from ...bench.oracle import zoom_window
from ...tools.deepeyes import MIN_CROP_SIDE, format_zoom_call
from ...zoomworld import VARIANTS, ZoomWorldSample, generate, seed_for
from ...zoomworld.questions import FINE_FAMILIES
from .answer_data import (
    END_TOKEN,
    IGNORE,
    AnswerBatch,
    AnswerDataConfig,
    check_range,
    check_weights,
    encode_example,
    make_example,
    padded_inputs,
)

KINDS = ("zoom", "direct", "answer")
MIN_WINDOW = 2 * MIN_CROP_SIDE + 4  # px: the smallest call region taught (tiny dots and tags get context)
TRAIN_OFFSET = 5 * 10**6  # train indices of phase-4 scenes start here, clear of phases 2-3 (< 1e6)
_COARSE_MIX = {"color": 1.0, "shape": 1.0}


class GroundingDataConfig(BaseModel):
    """How phase-4 examples are drawn (the ``grounding.data`` section of the training YAML)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mix: dict[str, float] = Field(default_factory=lambda: {"zoom": 0.6, "direct": 0.15, "answer": 0.25},
                                  description="weight per kind: zoom, direct, answer")
    fine_mix: dict[str, float] = Field(default_factory=lambda: {"read": 0.5, "mcq": 0.2, "relpos": 0.15,
                                                                "count": 0.15},
                                       description="ZoomWorld fine families of zoom examples")
    view_tokens: tuple[int, int] = Field((400, 700), description="range of the global view's token cap")
    margin: tuple[float, float] = Field((0.3, 1.0), description="box context per side, in target sizes")
    size_range: tuple[int, int] = Field((1024, 2048), description="ZoomWorld canvas side range (px)")
    answers: AnswerDataConfig = Field(default_factory=AnswerDataConfig,
                                      description="how the plain 'answer' examples are drawn")

    @field_validator("mix")
    @classmethod
    def _check_mix(cls, value: dict[str, float]) -> dict[str, float]:
        return check_weights(value, KINDS, "mix")

    @field_validator("fine_mix")
    @classmethod
    def _check_fine_mix(cls, value: dict[str, float]) -> dict[str, float]:
        return check_weights(value, FINE_FAMILIES, "fine_mix")

    @field_validator("view_tokens", "margin", "size_range")
    @classmethod
    def _check_range(cls, value: tuple) -> tuple:
        return check_range(value)


@dataclass
class PolicyExample:
    """One tool-using example before encoding.

    Attributes:
        sample: the ZoomWorld scene, question and answer.
        view_tokens: token cap of the global view.
        window: the region the policy zooms into (original pixels), or None for a direct answer.
    """

    sample: ZoomWorldSample
    view_tokens: int
    window: tuple[int, int, int, int] | None


def policy_example(cfg: GroundingDataConfig, alphabet: str, seed: int, rng: random.Random, *,
                   zoom: bool) -> PolicyExample:
    """A ``zoom`` (fine question, with its call window) or ``direct`` (coarse question) example of scene ``seed``."""
    mix = cfg.fine_mix if zoom else _COARSE_MIX
    s = generate(rng.choice(VARIANTS), seed, alphabet=alphabet, mix=mix, size_range=cfg.size_range)
    window = None
    if zoom:
        margins = tuple(rng.uniform(*cfg.margin) for _ in range(4))
        window = widen(zoom_window(s.image.size, tuple(s.target_box), margins), s.image.size, MIN_WINDOW)
    return PolicyExample(s, rng.randint(*cfg.view_tokens), window)


def widen(box: tuple[int, int, int, int], size: tuple[int, int], side: int) -> tuple[int, int, int, int]:
    """``box`` grown about its centre to at least ``side`` px per side, shifted to stay inside ``size``."""
    out = list(box)
    for axis in (0, 1):
        lo, hi, extent = box[axis], box[axis + 2], size[axis]
        length = min(max(hi - lo, side), extent)
        start = min(max(0, (lo + hi - length) // 2), extent - length)
        out[axis], out[axis + 2] = start, start + length
    return tuple(out)


def view_box(window: tuple[int, int, int, int], view: ImageInputs) -> tuple[int, int, int, int]:
    """``window`` (original pixels) in whole pixels of the resized view (Qwen2.5-VL's absolute frame), rounded
    outwards so the view box still holds the window."""
    sx, sy = view.resized_size[0] / view.source_size[0], view.resized_size[1] / view.source_size[1]
    x1, y1, x2, y2 = window
    return (math.floor(x1 * sx), math.floor(y1 * sy), min(view.resized_size[0], math.ceil(x2 * sx)),
            min(view.resized_size[1], math.ceil(y2 * sy)))


@dataclass
class EncodedPolicy:
    """A tool-using example as token ids: ``input_ids`` and ``labels`` (L,), and its images in sequence order."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    images: list[ImageInputs]


def _ids(adapter: BackboneAdapter, text: str) -> list[int]:
    return adapter.tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_policy(adapter: BackboneAdapter, ex: PolicyExample) -> EncodedPolicy:
    """Tokenise ``ex`` as inference renders it; supervise the call and the answer (each with ``<|im_end|>``)."""
    s = ex.sample
    view = adapter.prepare_image(s.image, min_tokens=4, max_tokens=ex.view_tokens)
    render = adapter.tokenizer.apply_chat_template
    prompt = render(policy_messages(s.question), tokenize=False, add_generation_prompt=True)
    pieces: list[tuple[str, bool]] = [(prompt, False)]
    images = [view]
    if ex.window is not None:
        call = format_zoom_call(view_box(ex.window, view))
        full = render(policy_messages(s.question, [(call, None)]), tokenize=False, add_generation_prompt=True)
        head = prompt + call + END_TOKEN
        if not full.startswith(head):
            raise RuntimeError("the chat template does not render an assistant turn as its content + <|im_end|>")
        pieces += [(call + END_TOKEN, True), (full[len(head):], False)]
        images.append(adapter.prepare_image(tool_response_view(s.image, ex.window, adapter.px_per_token), min_tokens=4,
                                            max_tokens=TOOL_TOKENS))
    pieces.append((s.answer + END_TOKEN, True))
    ids: list[int] = []
    labels: list[int] = []
    used = 0  # images expanded so far: each unsupervised piece takes as many as it has placeholders
    for text, supervised in pieces:
        part = _ids(adapter, text)
        if not supervised:
            count = part.count(adapter.image_token_id)
            part = adapter.expand_images(part, images[used : used + count])
            used += count
        ids += part
        labels += part if supervised else [IGNORE] * len(part)
    return EncodedPolicy(torch.tensor(ids), torch.tensor(labels), images)


def grounding_kind(cfg: GroundingDataConfig, index: int) -> tuple[str, random.Random]:
    """The kind of training example ``index`` and the stream that draws the rest of it."""
    rng = random.Random(f"grounding/{index}")
    return rng.choices(KINDS, weights=[cfg.mix.get(k, 0.0) for k in KINDS])[0], rng


def make_grounding_batch(adapter: BackboneAdapter, cfg: GroundingDataConfig, alphabet: str, start: int,
                         size: int) -> AnswerBatch:
    """Training examples ``start .. start + size - 1`` of phase 4, encoded and right-padded into one batch."""
    encoded: list[EncodedPolicy] = []
    kinds: list[str] = []
    for index in range(start, start + size):
        kind, rng = grounding_kind(cfg, index)
        if kind == "answer":
            e = encode_example(adapter, make_example(cfg.answers, alphabet, TRAIN_OFFSET + index))
            encoded.append(EncodedPolicy(e.input_ids, e.labels, [e.image]))
        else:
            ex = policy_example(cfg, alphabet, seed_for("train", TRAIN_OFFSET + index), rng, zoom=kind == "zoom")
            encoded.append(encode_policy(adapter, ex))
        kinds.append(kind)
    return collate_policies(adapter, encoded, kinds)


def collate_policies(adapter: BackboneAdapter, encoded: list[EncodedPolicy], kinds: list[str]) -> AnswerBatch:
    """Right-pad multi-image examples into one stock-HF batch (images flattened in sequence order)."""
    images = [im for e in encoded for im in e.images]
    inputs, labels = padded_inputs(adapter, [(e.input_ids, e.labels) for e in encoded], images)
    return AnswerBatch(inputs, labels, [im.n_tokens for im in images], None, [], kinds)
