"""The text dialects of external-crop agents: one class per agent, on the crop core of `tools.crop`.

An external-crop policy writes its zoom call as text, and each agent family has its own way to write it, its own
coordinate frame, its own limits and its own way to hand the crop back. Each dialect here does the same five
things, as its reference harness does (the notes in ``../shared/reference/external-crop-baselines.md`` give the
file:line of each rule; they are repeated on each class):

* `parse` the policy's turn into a `Turn`: an answer (the episode ends), a `Call`, an error the policy is told,
  or nothing (no call and no answer: the caller takes the text as the final answer);
* `locate` a call's region in pixels of the original image, through crops of crops, applying the dialect's limits
  on the exact region the policy wrote (then rounded outward to whole pixels for the crop);
* `view`: the crop as the dialect hands it back (its resizing rule, or ``zoom`` times larger when ``zoom`` is set);
* `reply`: the content blocks of the turn that returns it, with the reference's text;
* `system_prompt`, `instruction`, `schema` and `format_call` for prompting and for scripted policies.

Deliberate departures from the references are documented where they are made; the main one is DeepEyes'
``map_from_view``: boxes are mapped from the resized view the model saw to the original (DeepEyes#141).

`dialect_base` holds `Call`, `Turn` and the shared `Dialect` base, `dialect_rules` the parsing, geometry and sizing
rules, `dialect_prompts` the reference texts; this module re-exports what callers need.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from ..boxes import Box
from . import dialect_prompts as prompts
from . import dialect_rules as rules
from .crop import ZOOM_TOOL, Frame, ToolCallError, ToolImage, check_bbox, zoom_tool_schema
from .dialect_base import IMAGE_BLOCK, Block, Call, Dialect, Turn, text_block

__all__ = ["DIALECTS", "Call", "DeepEyesDialect", "Dialect", "MiniO3Dialect", "PixelReasonerDialect", "Qwen3VLDialect",
           "ToolDialect", "Turn", "get_dialect"]


@dataclass(frozen=True)
class DeepEyesDialect(Dialect):
    """DeepEyes (visual_toolbox_v2.py; the notes' section 2).

    * Parsing (L43-44, L60-72): a non-empty ``<answer>...</answer>`` anywhere ends the episode, even beside a call;
      else the last ``<tool_call>`` is read as JSON ``{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": ...}}``;
      any fault is an error turn and the episode goes on. Departures: a last call whose closing tag is missing
      (the stop string ate it) runs to the end of the text (trailing prose makes it an invalid-JSON error); an
      empty call is an error (the reference ends the episode on it). A non-string label is dropped (never read).
    * Region (L78-88, L129-165): DeepEyes crops the original (source 0 only) at the numbers written, clamped to it,
      then needs left < right, top < bottom, aspect <= 100 and each side > 30 px, all checked here on the exact
      region. ``map_from_view`` (default) first maps the numbers from the resized view the policy saw
      (``ToolImage.view_size``) to the original, our fix of DeepEyes#141; False uses them as original pixels.
    * View (parallel_env.py L85-106, eval_vstar.py L175-249): about native size: Qwen's smart_resize into
      [4*28*28, 16384*28*28] pixels, which upscales only tiny crops.
    * Reply (L102-105 and eval_vstar): ``<tool_response>``, the image, USER_PROMPT_V2, ``</tool_response>`` as a
      user turn; errors ``Error: ...`` (L68-72). Turns: 5 (max_turns in the training script).
    """

    name: ClassVar[str] = "deepeyes"
    frame: ClassVar[Frame] = "absolute"

    map_from_view: bool = True  # True: boxes are pixels of the policy's resized view; False: of the original

    def _call(self, raw: str) -> Call:
        args = rules.hermes_arguments(raw, ZOOM_TOOL)
        return Call(check_bbox(args["bbox_2d"]), rules.label_arg(args.get("label")))

    def locate(self, call: Call, images: Sequence[ToolImage]) -> Box:
        bbox = rules.written_box(call.bbox)
        if call.source != 0:
            raise ToolCallError(f"DeepEyes zooms into the original image only (source 0), got {call.source!r}")
        parent = rules.image_at(images, 0, "image")
        extent = parent.view_size if self.map_from_view else (parent.box.width, parent.box.height)
        region = rules.in_original(rules.unit_box(bbox, extent), parent)
        rules.deepeyes_limits(region)
        return rules.outward(region, parent)

    def _reply_blocks(self, observation: int | None, size: tuple[int, int] | None) -> list[Block]:
        return [text_block("<tool_response>"), dict(IMAGE_BLOCK), text_block(prompts.USER_PROMPT_V2),
                text_block("</tool_response>")]

    def system_prompt(self) -> str:
        """SYSTEM_PROMPT_V2 (prompt.py L40-58) around `schema` (its ``required`` fixed to ``bbox_2d``)."""
        return prompts.deepeyes_system(self.schema())

    def instruction(self) -> str:
        return prompts.USER_PROMPT_V2

    def schema(self) -> dict[str, Any]:
        return zoom_tool_schema("deepeyes", "absolute")

    def format_call(self, bbox: Sequence[float], label: str | None = None, source: int = 0) -> str:
        if source != 0:
            raise ValueError("DeepEyes calls zoom into the original image only (source 0)")
        args: dict[str, Any] = {"bbox_2d": [rules.number(v) for v in bbox]}
        if label is not None:
            args["label"] = label
        return prompts.hermes_call(ZOOM_TOOL, args)


@dataclass(frozen=True)
class Qwen3VLDialect(Dialect):
    """Qwen3-VL's native ``image_zoom_in_tool`` (Hermes ``<tool_call>``; the notes' section 1.1, DESIGN.md).

    No reference harness exists for it, so it follows DeepEyes' rules where it can: the same episode rule and
    parsing, plus ``img_idx`` (0 the original, k the k-th crop); boxes are 0-1000 relative to the image ``img_idx``
    names (Qwen3-VL's frame, Qwen3-VL#1741), clamped to it and mapped through its region to the original; DeepEyes'
    limits (aspect <= 100, each side > 30 px of the original). The view is smart_resize with Qwen3-VL's processor
    defaults (32 px per token, 65536 to 16777216 pixels); the reply is the image alone in a ``tool`` turn (its
    chat template adds the ``<tool_response>`` tags), errors ``Error: ...``. Turns: 5, as DeepEyes.
    """

    name: ClassVar[str] = "qwen3vl"
    frame: ClassVar[Frame] = "norm1000"
    reply_role: ClassVar[str] = "tool"
    factor: ClassVar[int] = 32

    min_pixels: int = 65536
    max_pixels: int = 16777216

    def _call(self, raw: str) -> Call:
        args = rules.hermes_arguments(raw, ZOOM_TOOL)
        img_idx = args.get("img_idx")
        source = 0 if img_idx is None else rules.index_arg(img_idx, "img_idx", 0)
        return Call(check_bbox(args["bbox_2d"]), rules.label_arg(args.get("label")), source)

    def locate(self, call: Call, images: Sequence[ToolImage]) -> Box:
        bbox = rules.written_box(call.bbox)
        parent = rules.image_at(images, call.source, "img_idx")
        region = rules.in_original(rules.unit_box(bbox, (1000, 1000)), parent)
        rules.deepeyes_limits(region)
        return rules.outward(region, parent)

    def schema(self) -> dict[str, Any]:
        return zoom_tool_schema("qwen3vl", "norm1000")

    def format_call(self, bbox: Sequence[float], label: str | None = None, source: int = 0) -> str:
        args: dict[str, Any] = {"bbox_2d": [rules.number(v) for v in bbox]}
        if label is not None:
            args["label"] = label
        args["img_idx"] = source
        return prompts.hermes_call(ZOOM_TOOL, args)


@dataclass(frozen=True)
class MiniO3Dialect(Dialect):
    """Mini-o3 (function_tools.py L29-74, vllm_rollout_spmd.py L757-787 and L906-936; the notes' section 3).

    * Parsing: ``<grounding>{"bbox_2d": [x0, y0, x1, y1], "source": "original_image" | "observation_k"}``, the last
      block (their regex is greedy), read as JSON (theirs uses ``eval``); ``<answer>`` anywhere ends the episode
      (the DeepEyes rule; the brief's choice). ``observation_k`` is the k-th crop: their observation list holds
      the original at 0 and appends each successful crop, and their first observation turn reads "Observation 1";
      ``observation_0`` is the original too.
    * Region: 0-1 relative to the source's stored (unmagnified) size, which for a crop is its region of the
      original, so the checks are in original pixels: clamped, width and height at least 1 px, aspect ratio below
      200. Departures: the checks use the exact region rather than ``int()``-truncated corners, and the clamp keeps
      the last row and column (theirs clamps to W-1, H-1).
    * View: resized into [40_000, 2_000_000] pixels by their ``process_image`` arithmetic (bicubic, theirs NEAREST).
    * Reply: "After the above Action {t}, here is the the zoom-in image (Observation {t+1}):" + image + the
      continue text (constants.py L7), with ``observation`` = t+1 (theirs numbers by turn, so after a refused call
      it runs ahead of the observation index); errors "ERROR occurs during grounding. ..." (L9). Turns: 12 (eval).
    """

    name: ClassVar[str] = "minio3"
    stop_strings: ClassVar[tuple[str, ...]] = ("</grounding>",)
    frame: ClassVar[Frame] = "norm1"

    max_turns: int = 12
    min_pixels: int = 40_000
    max_pixels: int = 2_000_000

    def _parse(self, text: str) -> Turn:
        answer = rules.last_answer_tag(text)
        if answer is not None:
            return Turn(answer=answer)
        block = rules.last_block(text, "<grounding>", "</grounding>")
        if block is None:
            return Turn()
        bbox, source = rules.grounding(block.inner)
        return Turn(call=Call(bbox, None, source))

    def locate(self, call: Call, images: Sequence[ToolImage]) -> Box:
        bbox = rules.written_box(call.bbox)
        parent = rules.image_at(images, call.source, "observation")
        region = rules.in_original(rules.unit_box(bbox, (1, 1)), parent)
        w, h = region[2] - region[0], region[3] - region[1]
        rules.check_sides(w, h, 1, strict=False, unit="of the original")
        rules.check_aspect(w, h, 200, inclusive=False)
        return rules.outward(region, parent)

    def _view_size(self, width: int, height: int) -> tuple[int, int]:
        return rules.minio3_size(width, height, self.min_pixels, self.max_pixels)

    def _reply_blocks(self, observation: int | None, size: tuple[int, int] | None) -> list[Block]:
        if isinstance(observation, bool) or not isinstance(observation, int) or observation < 1:
            raise ValueError(f"Mini-o3's reply states the observation number (>= 1); got observation={observation!r}")
        head = prompts.MINIO3_OBSERVATION.format(action=observation - 1, observation=observation)
        return [text_block(head), dict(IMAGE_BLOCK), text_block(prompts.MINIO3_CONTINUE)]

    def _error_text(self, error: str) -> str:
        return f"ERROR occurs during grounding. Error Information: {error}.\n{prompts.MINIO3_ERROR}"

    def system_prompt(self) -> str:
        return prompts.MINIO3_SYSTEM

    def format_call(self, bbox: Sequence[float], label: str | None = None, source: int = 0) -> str:
        where = "original_image" if source == 0 else f"observation_{source}"
        return f"<grounding>{json.dumps({'bbox_2d': [rules.number(v) for v in bbox], 'source': where})}</grounding>"


@dataclass(frozen=True)
class PixelReasonerDialect(Dialect):
    """Pixel-Reasoner (experience_maker.py: CropImageNormalized, parse_last_tool, execute_tool, the rollout loop;
    the notes' section 4).

    * Parsing: a turn that ends with a ``<tool_call>`` (closing tag present or eaten by the stop string) runs its
      last call ``{"name": "crop_image_normalized", "arguments": {"bbox_2d": [...], "target_image": k}}``
      (``require_tool``, L2240-2250); otherwise the last ``\\boxed{...}`` (nested braces kept) is the answer. So a
      boxed answer followed by a final call runs the call, as in the reference; a call followed by a boxed answer
      ends the episode. ``target_image`` is 1-based and required (1 is the original; source = target_image - 1).
    * Region (L124-160, L1150-1167, L1229-1237): normalized when all four values are < 1, else pixels of the
      target image as the harness holds it (its view), divided by its size; padded by 0.1 on every side, clamped
      to [0, 1]; each side of the padded crop must exceed 28 px of that image, checked on the exact region.
      Departure: inverted corners (x1 > x2) are refused as written; a point (x1 == x2) is padded like theirs.
    * View (L2306-2318): smart_resize into [4*28*28, 1000*28*28] pixels (training; 256*28*28 and 5120*28*28 in
      eval). Reply: "\\nHere is the cropped image (Image Size: {w}x{h}):" + image; errors
      "\\nExecution error:\\n{msg}\\n". Turns: 5, since the loop force-terminates once 4 calls ran (L2246, calls > 3).
    """

    name: ClassVar[str] = "pixelreasoner"
    frame: ClassVar[Frame] = "norm1"

    max_turns: int = 5
    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 1000 * 28 * 28

    def _parse(self, text: str) -> Turn:
        block = rules.last_block(text, "<tool_call>", "</tool_call>")
        if block is not None and not block.after.replace("<|im_end|>", "").strip():
            return Turn(call=self._call(block.inner))
        answer = rules.last_boxed(text)
        return Turn() if answer is None else Turn(answer=answer.strip())

    def _call(self, raw: str) -> Call:
        args = rules.hermes_arguments(raw, prompts.CROP_NORMALIZED)
        if "target_image" not in args:
            raise ToolCallError("arguments need target_image (1 for the original image)")
        target = rules.index_arg(args["target_image"], "target_image", 1)
        return Call(check_bbox(args["bbox_2d"]), None, target - 1)

    def locate(self, call: Call, images: Sequence[ToolImage]) -> Box:
        bbox = check_bbox(call.bbox)
        parent = rules.image_at(images, call.source, "target_image", offset=1)
        return rules.outward(rules.in_original(rules.padded_unit_box(bbox, parent.view_size), parent), parent)

    def _reply_blocks(self, observation: int | None, size: tuple[int, int] | None) -> list[Block]:
        if not (isinstance(size, tuple) and len(size) == 2 and all(isinstance(v, int) for v in size)):
            raise ValueError(f"Pixel-Reasoner's reply states the crop's size; pass size=(width, height), got {size!r}")
        return [text_block(f"\nHere is the cropped image (Image Size: {size[0]}x{size[1]}):"), dict(IMAGE_BLOCK)]

    def _error_text(self, error: str) -> str:
        return f"\nExecution error:\n{error}\n"

    def system_prompt(self) -> str:
        return "You are a helpful assistant."

    def instruction(self) -> str:
        return prompts.PIXELREASONER_GUIDELINES

    def schema(self) -> dict[str, Any]:
        return prompts.CROP_NORMALIZED_SCHEMA

    def format_call(self, bbox: Sequence[float], label: str | None = None, source: int = 0) -> str:
        args = {"bbox_2d": [rules.number(v) for v in bbox], "target_image": source + 1}
        return prompts.hermes_call(prompts.CROP_NORMALIZED, args)


ToolDialect = Dialect  # the base type under the name callers annotate with

DIALECTS: dict[str, type[Dialect]] = {cls.name: cls for cls in
                                      (DeepEyesDialect, Qwen3VLDialect, MiniO3Dialect, PixelReasonerDialect)}


def get_dialect(name: str, **overrides: Any) -> Dialect:
    """The dialect ``name`` with its config fields overridden, e.g. ``get_dialect("deepeyes", zoom=3.0)``.

    Raises:
        ValueError: an unknown name or field, or a bad value.
    """
    if name not in DIALECTS:
        raise ValueError(f"unknown dialect {name!r}; choose from {', '.join(DIALECTS)}")
    cls = DIALECTS[name]
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(f"{name} has no option {', '.join(unknown)}; its options are {', '.join(known)}")
    return cls(**overrides)
