"""Data of the tool-calling policy (`tool_policy`): ZoomWorld conversations rendered exactly as `ChatSession` does.

Each training index draws a ZoomWorld TRAIN scene (a pure function of the index) and becomes one conversation,
with no system prompt and no tool listing, so the first turn's prompt is the one the Q-Zoom perception runs on:

* fine question: ``user(image, question)`` -> the zoom call -> ``tool(crop, one line)`` -> ``answer<|im_end|>``;
* coarse question: ``user(image, question)`` -> ``answer<|im_end|>``.

The call tokens (through ``</tool_call>``, where inference stops) and the answers are supervised, nothing else.

``call`` chooses the tool. ``"zoom"`` (``zoomworld-tiny-tool``): the internal zoom, called with no arguments; the
crop is what the zoom tool returns at test time (`tools.zoom.zoom_output`) for a box chosen per example:

* ``twig``: the box of the bundled heads for that image and question (`tools.zoom.zoom_once`, cached per scene in
  a JSONL file since it costs 0.1-0.3 s), when it holds the target (>= 70% of it): what the policy will see;
* ``truth``: a jittered box around the ground-truth target, 1.5-4x its size, drawn for a share ``gt_share`` of fine
  examples and, with chance ``gt_on_miss``, instead of a twig box that misses the target. An answer taught on a
  crop that does not show the target teaches guessing, while the gate score and the box line stay the real ones;
* ``miss``: the twig's box that misses, kept (with chance ``1 - gt_on_miss``) with its answer supervised.

``"crop"`` (``zoomworld-tiny-deepeyes``): DeepEyes' external crop. The call is DeepEyes' text
``<tool_call>\n{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [x1, y1, x2, y2]}}\n</tool_call>`` with the
box in whole pixels of the resized view the policy saw (the model config's token budget), and the tool turn holds
only the crop as `bench.deepeyes_agent.DeepEyesAgent` returns it (`tool_response_view`: 3x, at most 256 tokens).
There is no twig box to imitate, so every fine example writes a jittered ground-truth box (``truth``, drawn as
above with ``gt_scale``; ``gt_share`` and ``gt_on_miss`` are unused), rounded outward to view pixels; the crop is
the region the agent locates for that text, so training and inference crop the same pixels.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm import tqdm

from ...bench.deepeyes_agent import tool_response_view
from ...boxes import ROI_COVERAGE, Box, coverage
from ...chat import ChatSession
from ...tools.crop import ToolCallError, ToolImage
from ...tools.dialect_base import Call
from ...tools.dialects import get_dialect
from ...tools.output import ToolOutput
from ...tools.zoom import ZOOM_TOOL_NAME, zoom_once, zoom_output
from ...train.common import resume_jsonl
from ...zoomworld import VARIANTS, ZoomWorldSample, generate, seed_for
from ...zoomworld.questions import COARSE_FAMILIES, FINE_FAMILIES
from .answer_data import END_TOKEN, IGNORE, check_range, check_weights, padded_inputs

if TYPE_CHECKING:
    from ...backbones import ImageInputs
    from ...model import QZoomModel

TRAIN_OFFSET = 7 * 10**6  # train-split indices of tool-policy scenes: clear of phases 2-3 (< 1e6) and 4 (5e6 on)
EVAL_OFFSET = 4 * 10**6  # val-split indices of the in-training check: clear of joint_eval (< 3e6) and phase 4 (3e6)
CALL_END = "</tool_call>"  # one added token; generation stops there
CALL_MESSAGE = {"role": "assistant", "content": "",
                "tool_calls": [{"type": "function", "function": {"name": ZOOM_TOOL_NAME, "arguments": {}}}]}
BOX_SOURCES = ("twig", "truth", "miss", "coarse")
CallKind = Literal["zoom", "crop"]
DEEPEYES = get_dialect("deepeyes")  # writes the call text and locates it, as `DeepEyesAgent` does (view pixels)


class ToolPolicyDataConfig(BaseModel):
    """How tool-policy conversations are drawn (the ``tool_policy.data`` section of the YAML)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    call: CallKind = Field("zoom", description="the tool the policy calls: 'zoom' (the internal zoom, no arguments; "
                           "crops at the twig's box) or 'crop' (DeepEyes' image_zoom_in_tool with bbox_2d in pixels "
                           "of the resized view; crops at a jittered ground-truth box)")
    fine_share: float = Field(0.8, ge=0.0, le=1.0, description="share of fine questions (the rest coarse)")
    fine_mix: dict[str, float] = Field(default_factory=lambda: {"read": 0.5, "mcq": 0.2, "relpos": 0.15,
                                                                "count": 0.15},
                                       description="ZoomWorld fine families (default: ZoomWorld's own fine mix)")
    coarse_mix: dict[str, float] = Field(default_factory=lambda: {"color": 1.0, "shape": 1.0},
                                         description="ZoomWorld coarse families")
    size_range: tuple[int, int] = Field((1024, 4096), description="canvas side range (px); ZoomWorld's default, "
                                        "the test split's")
    pool: int | None = Field(None, ge=1, description="distinct scenes: example k uses scene k % pool (each scene's "
                             "twig box is computed once); None: a new scene per example")
    gt_share: float = Field(0.2, ge=0.0, le=1.0, description="fine examples cropped at a jittered ground-truth box "
                            "even when the twig's box holds the target")
    gt_on_miss: float = Field(1.0, ge=0.0, le=1.0, description="chance that a fine example whose twig box misses "
                              "the target is cropped at a jittered ground-truth box instead")
    gt_scale: tuple[float, float] = Field((1.5, 4.0), description="side of a jittered ground-truth box over the "
                                          "target's (twig boxes are about 2-4x a tag)")
    coarse_calls: float = Field(0.0, ge=0.0, le=1.0, description="share of coarse examples that also call zoom "
                                "(crop at the twig's box) before answering: a start for RL that zooms on coarse "
                                "questions too, which GRPO then has to unlearn ('zoom' calls only)")

    @field_validator("fine_mix")
    @classmethod
    def _check_fine(cls, value: dict[str, float]) -> dict[str, float]:
        return check_weights(value, FINE_FAMILIES, "fine_mix")

    @field_validator("coarse_mix")
    @classmethod
    def _check_coarse(cls, value: dict[str, float]) -> dict[str, float]:
        return check_weights(value, COARSE_FAMILIES, "coarse_mix")

    @field_validator("size_range", "gt_scale")
    @classmethod
    def _check_range(cls, value: tuple) -> tuple:
        return check_range(value)


def user_message(image, question: str) -> dict:
    """The first turn: the image, then the question."""
    return {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}


def tool_message(out: ToolOutput) -> dict:
    """The tool turn carrying the zoom tool's output (its crop, then its line)."""
    return {"role": "tool", "content": out.chat_content()}


def scene_index(cfg: ToolPolicyDataConfig, index: int) -> int:
    """The scene of training example ``index`` (examples cycle over ``cfg.pool`` scenes)."""
    return index if cfg.pool is None else index % cfg.pool


def scene_draw(cfg: ToolPolicyDataConfig, scene: int, split: str = "train") -> tuple[bool, str]:
    """Whether scene ``scene`` of ``split`` asks a fine question, and its variant (known without rendering)."""
    rng = random.Random(f"tool-policy/{split}/{scene}")
    return rng.random() < cfg.fine_share, rng.choice(VARIANTS)


def training_scene(cfg: ToolPolicyDataConfig, alphabet: str, scene: int, split: str = "train") -> ZoomWorldSample:
    """Scene ``scene`` of ``split`` (train: from ``TRAIN_OFFSET``; val: from ``EVAL_OFFSET``), fine with chance
    ``fine_share``; a pure function of its arguments."""
    fine, variant = scene_draw(cfg, scene, split)
    offset = TRAIN_OFFSET if split == "train" else EVAL_OFFSET
    return generate(variant, seed_for(split, offset + scene), alphabet=alphabet,
                    mix=cfg.fine_mix if fine else cfg.coarse_mix, size_range=cfg.size_range)


def crop_call(box: Box, image_size: tuple[int, int], view_size: tuple[int, int]) -> tuple[list[int], Box]:
    """The ``bbox_2d`` a DeepEyes policy writes for ``box`` (source pixels) and the region the DeepEyes agent crops
    for it (`Dialect.locate`, source pixels).

    The box is written in whole pixels of the resized view (``view_size``), rounded outward so the region holds
    ``box``. A region DeepEyes refuses (a side of at most 30 source px: ~2% of jittered boxes around the smallest
    targets) is grown by 2 px a side, inside the image, until it is accepted.

    Raises:
        ValueError: no accepted region (an image too small to hold a 31 px side).
    """
    (w, h), (vw, vh) = image_size, view_size
    original = [ToolImage(None, view_size, 0, Box(0, 0, w, h))]
    for _ in range(max(w, h)):
        written = [max(0, math.floor(box.x1 * vw / w)), max(0, math.floor(box.y1 * vh / h)),
                   min(vw, math.ceil(box.x2 * vw / w)), min(vh, math.ceil(box.y2 * vh / h))]
        try:
            return written, DEEPEYES.locate(Call(tuple(written)), original)
        except ToolCallError:
            box = Box(max(0, box.x1 - 2), max(0, box.y1 - 2), min(w, box.x2 + 2), min(h, box.y2 + 2))
    raise ValueError(f"no region DeepEyes accepts around {box} in an image of {image_size}")


def crop_call_text(written: list[int]) -> str:
    """DeepEyes' call text for ``written`` (`Dialect.format_call`: whole numbers, no decimal point)."""
    return DEEPEYES.format_call(written)


class TwigBoxes:
    """The bundled heads' box and gate score per training scene, computed once and appended to a JSONL file (a
    killed run resumes after its last complete row)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows = {r["scene"]: r for r in resume_jsonl(self.path)}

    def get(self, scene: int) -> tuple[Box | None, float | None]:
        """The cached ``(box, gate score)`` of ``scene``.

        Raises:
            KeyError: the scene was not precomputed (`fill`).
        """
        row = self.rows[scene]
        return (Box(*row["box"]) if row["box"] else None), row["gate"]

    def fill(self, model: QZoomModel, cfg: ToolPolicyDataConfig, alphabet: str, scenes: list[int]) -> None:
        """Run the zoom tool (`zoom_once`) on the fine ones of ``scenes`` (all of them with ``coarse_calls``) not
        cached yet, appending as it goes."""
        todo = [k for k in scenes if k not in self.rows and (scene_draw(cfg, k)[0] or cfg.coarse_calls > 0)]
        with open(self.path, "a") as f:
            for k in tqdm(todo, desc="twig boxes", dynamic_ncols=True, mininterval=2.0, disable=not todo):
                s = training_scene(cfg, alphabet, k)
                out, _ = zoom_once(model, s.image, s.question)
                row = {"scene": k, "box": out.artifact.get("box"), "gate": out.artifact.get("gate_score")}
                f.write(json.dumps(row) + "\n")
                f.flush()
                self.rows[k] = row


def jittered_box(rng: random.Random, target: tuple[int, int, int, int], size: tuple[int, int],
                 scale: tuple[float, float]) -> Box:
    """A box holding ``target`` whole (where the image allows), each side ``scale`` times the target's, placed at
    random around it inside an image of ``size`` (width, height)."""
    out = []
    for axis in (0, 1):
        lo, hi, extent = target[axis], target[axis + 2], size[axis]
        side = min(extent, max(hi - lo, round((hi - lo) * rng.uniform(*scale))))
        first, last = max(0, hi - side), min(lo, extent - side)
        start = rng.randint(first, last) if first <= last else max(0, min(lo, extent - side))
        out.append((start, start + side))
    (x1, x2), (y1, y2) = out
    return Box(x1, y1, x2, y2)


@dataclass
class ToolExample:
    """One conversation before encoding.

    Attributes:
        sample: the ZoomWorld scene, question and answer.
        box: the crop's box in source pixels (fine, and coarse with ``coarse_calls``), or None (no call).
        gate_score: the gate's score the tool line reports (the real one for the scene).
        box_source: ``"twig"``, ``"truth"``, ``"miss"`` (see the module doc), ``"coarse"`` (a coarse example that
            calls, at the twig's box) or ``""`` (no call).
        call: the tool called, ``"zoom"`` or ``"crop"`` (see the module doc).
    """

    sample: ZoomWorldSample
    box: Box | None
    gate_score: float | None
    box_source: str
    call: CallKind = "zoom"


def make_tool_example(cfg: ToolPolicyDataConfig, alphabet: str, index: int, boxes: TwigBoxes | None) -> ToolExample:
    """Training example ``index``: its scene, and for a fine question the box it is cropped at (see module doc;
    ``boxes`` is unused, and may be None, when ``cfg.call`` is "crop")."""
    scene = scene_index(cfg, index)
    s = training_scene(cfg, alphabet, scene)
    if s.kind != "fine":
        # its own draw, so that coarse_calls = 0 leaves every other example as it was
        if cfg.call == "zoom" and cfg.coarse_calls and random.Random(f"tool-policy/coarse/{index}").random() < \
                cfg.coarse_calls:
            if boxes is None:
                raise ValueError("a zoom-call policy's examples need the twig boxes")
            twig, gate = boxes.get(scene)
            if twig is not None:
                return ToolExample(s, twig, gate, "coarse")
        return ToolExample(s, None, None, "", cfg.call)
    rng = random.Random(f"tool-policy/box/{index}")  # per example: a repeated scene gets a new draw
    if cfg.call == "crop":
        box = jittered_box(rng, tuple(s.target_box), s.image.size, cfg.gt_scale)
        return ToolExample(s, box, None, "truth", "crop")
    if boxes is None:
        raise ValueError("a zoom-call policy's examples need the twig boxes")
    twig, gate = boxes.get(scene)
    holds = twig is not None and (coverage(twig, s.target_box) or 0.0) >= ROI_COVERAGE
    use_truth = (rng.random() < cfg.gt_share) if holds else (twig is None or rng.random() < cfg.gt_on_miss)
    if use_truth:
        return ToolExample(s, jittered_box(rng, tuple(s.target_box), s.image.size, cfg.gt_scale), gate, "truth")
    return ToolExample(s, twig, gate, "twig" if holds else "miss")


@dataclass
class EncodedTool:
    """A conversation as the renderer's token ids.

    Attributes:
        input_ids: (L,) the whole conversation, visual placeholders expanded.
        labels: (L,) the ids on supervised spans, -100 elsewhere.
        spans: ``(start, end, what)`` of each supervised span, ``what`` "call" or "answer".
        images: the conversation's images in sequence order.
        kind: "fine" or "coarse".
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    spans: list[tuple[int, int, str]]
    images: list[ImageInputs]
    kind: str


def call_turns(ex: ToolExample, view_size: tuple[int, int], px_per_token: int) -> list[dict]:
    """The call turn and the tool turn of fine example ``ex`` (``view_size``: its first image's resized size;
    ``px_per_token``: the backbone's, for the zoom tool's line and the crop's token cap)."""
    s = ex.sample
    if ex.call == "crop":
        written, region = crop_call(ex.box, s.image.size, view_size)
        crop = tool_response_view(s.image, region.as_tuple(), px_per_token)
        return [{"role": "assistant", "content": crop_call_text(written)},
                {"role": "tool", "content": [{"type": "image", "image": crop}]}]
    out = zoom_output(s.image, ex.box, ex.gate_score, "cached", px_per_token=px_per_token)
    return [CALL_MESSAGE, tool_message(out)]


def encode_tool_example(model: QZoomModel, ex: ToolExample) -> EncodedTool:
    """Render ``ex`` with `ChatSession.render` (no system prompt, no tool listing) and mark the supervised spans.

    Raises:
        RuntimeError: the rendered call turn does not extend the first prompt with ``<tool_call>...</tool_call>``.
    """
    s, a = ex.sample, model.adapter
    session = ChatSession(model)
    user = user_message(s.image, s.question)
    first = session.render([user])
    answer = a.tokenizer(s.answer + END_TOKEN, add_special_tokens=False)["input_ids"]
    n = len(first.ids)
    if ex.box is None:
        ids, images, spans = first.ids + answer, first.images, [(n, n + len(answer), "answer")]
    else:
        convo = session.render([user, *call_turns(ex, first.images[0].inputs.resized_size, a.px_per_token)])
        end_id = a.tokenizer.convert_tokens_to_ids(CALL_END)
        rest = convo.ids[n:]
        if convo.ids[:n] != first.ids or end_id not in rest:
            raise RuntimeError("the rendered call turn does not extend the first prompt with a </tool_call> token")
        call_end = n + rest.index(end_id) + 1
        ids, images = convo.ids + answer, convo.images
        spans = [(n, call_end, "call"), (len(convo.ids), len(ids), "answer")]
    labels = [IGNORE] * len(ids)
    for start, end, _ in spans:
        labels[start:end] = ids[start:end]
    return EncodedTool(torch.tensor(ids), torch.tensor(labels), spans, [im.inputs for im in images], s.kind)


@dataclass
class ToolBatch:
    """Right-padded conversations for one stock HF forward.

    Attributes:
        inputs: the stock forward's keyword arguments (``input_ids`` (B, L), ``attention_mask``, ...).
        labels: (B, L), -100 off the supervised spans and on padding.
        spans: per example, its supervised spans (see `EncodedTool`).
        kinds: per example, "fine" or "coarse".
        box_sources: per example, where its crop's box came from ("" for coarse).
    """

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    spans: list[list[tuple[int, int, str]]]
    kinds: list[str]
    box_sources: list[str]


def collate_tool(model: QZoomModel, encoded: list[EncodedTool], box_sources: list[str]) -> ToolBatch:
    """Right-pad ``encoded`` into one batch (images flattened in sequence order)."""
    images = [im for e in encoded for im in e.images]
    inputs, labels = padded_inputs(model.adapter, [(e.input_ids, e.labels) for e in encoded], images)
    return ToolBatch(inputs, labels, [e.spans for e in encoded], [e.kind for e in encoded], box_sources)


def make_tool_batch(model: QZoomModel, cfg: ToolPolicyDataConfig, alphabet: str, boxes: TwigBoxes, start: int,
                    size: int) -> ToolBatch:
    """Training examples ``start .. start + size - 1``, encoded and collated (a pure function of its arguments
    once their scenes' twig boxes are cached)."""
    examples = [make_tool_example(cfg, alphabet, k, boxes) for k in range(start, start + size)]
    return collate_tool(model, [encode_tool_example(model, ex) for ex in examples], [ex.box_source for ex in examples])
