"""What every external-crop dialect shares (`tools.dialects` has the dialects): the `Call` and `Turn` a policy's
text parses into, and the `Dialect` config base with the steps common to all of them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from PIL import Image

from ..boxes import Box, check_int, crop
from ..images import resize_to
from . import dialect_rules as rules
from .crop import Frame, ToolCallError, ToolImage, enlarge

Block = dict[str, Any]
IMAGE_BLOCK: Block = {"type": "image"}


def text_block(text: str) -> Block:
    return {"type": "text", "text": text}


@dataclass(frozen=True)
class Call:
    """A zoom call as the policy wrote it.

    Attributes:
        bbox: (x1, y1, x2, y2) in the dialect's frame, as written.
        label: the object's name, when given as a string.
        source: the image it zooms into: 0 the original, k the k-th crop returned.
    """

    bbox: tuple[float, float, float, float]
    label: str | None = None
    source: int = 0


@dataclass(frozen=True)
class Turn:
    """What one policy turn amounts to. At most one field is set; all None means the turn has neither a call nor an
    answer tag, and the caller takes the text itself as the final answer (policies trained without tags answer so).

    Attributes:
        answer: the final answer (the episode ends).
        call: the zoom call to run.
        error: one line telling the policy why its call cannot run (the episode goes on).
    """

    answer: str | None = None
    call: Call | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if sum(v is not None for v in (self.answer, self.call, self.error)) > 1:
            raise ValueError(f"a Turn holds at most one of answer, call and error, got {self!r}")


@dataclass(frozen=True)
class Dialect:
    """What every dialect shares; use a subclass (`DIALECTS`). Subclasses are frozen, validated configs.

    Class attributes: ``name``; ``stop_strings`` (where generation stops: the closing tag of a call);
    ``frame`` (what ``bbox_2d`` means: "absolute", "norm1000" or "norm1"); ``reply_role`` (the role of the turn
    `reply` fills); ``factor`` (pixels per visual token side of the smart_resize in `view`).

    Attributes:
        max_turns: assistant turns per question before the loop gives up (the reference's limit by default).
        zoom: None (the default) returns crops sized by the reference's rule; a number returns them enlarged that
            many times up to ``max_pixels``, which is how this project's bundled tiny policy was trained (it reads
            only enlarged glyphs).
        min_pixels: fewest pixels of a returned crop under the reference's rule.
        max_pixels: most pixels of a returned crop (also the cap of ``zoom``).
        reply_text: True (the default) renders a successful reply with the reference's text; False returns the
            image alone, for a policy trained on image-only tool turns (the bundled tiny policy). Error replies are
            text either way.

    Raises:
        ValueError: a field out of range (each message names the field and what it takes).
    """

    name: ClassVar[str] = ""
    stop_strings: ClassVar[tuple[str, ...]] = ("</tool_call>",)
    frame: ClassVar[Frame] = "absolute"
    reply_role: ClassVar[str] = "user"  # the role of the turn `reply` fills, as the reference renders it
    factor: ClassVar[int] = 28  # pixels per merged visual token side, for the smart_resize of `view`

    max_turns: int = 5  # assistant turns per question before the loop gives up
    zoom: float | None = None  # enlarge crops this many times (up to max_pixels); None: the reference's sizing
    min_pixels: int = 4 * 28 * 28  # fewest pixels of a returned crop (reference sizing only)
    max_pixels: int = 16384 * 28 * 28  # most pixels of a returned crop
    reply_text: bool = True  # False: a successful reply is the image alone (a policy trained on image-only turns)

    def __post_init__(self) -> None:
        check_int("max_turns", self.max_turns, 1)
        check_int("min_pixels", self.min_pixels, 1)
        check_int("max_pixels", self.max_pixels, 1)
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels})")
        if self.zoom is not None and (isinstance(self.zoom, bool) or not isinstance(self.zoom, (int, float))
                                      or not (math.isfinite(self.zoom) and self.zoom > 0)):
            raise ValueError(f"zoom must be a finite number > 0 (None: the reference's sizing), got {self.zoom!r}")
        for name in ("reply_text", "map_from_view"):
            if not isinstance(getattr(self, name, True), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    # ---- parsing ----

    def parse(self, text: str) -> Turn:
        """Read one policy turn; never raises on its content (a bad call is a `Turn` with ``error``).

        Raises:
            TypeError: ``text`` is not a string.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        try:
            return self._parse(text)
        except ToolCallError as err:
            return Turn(error=" ".join(str(err).split()))

    def _parse(self, text: str) -> Turn:
        """DeepEyes' episode rule, shared by the Hermes dialects: an answer anywhere ends the episode, else the last
        call runs, else the turn holds neither."""
        answer = rules.last_answer_tag(text)
        if answer is not None:
            return Turn(answer=answer)
        block = rules.last_block(text, "<tool_call>", "</tool_call>")
        return Turn() if block is None else Turn(call=self._call(block.inner))

    def _call(self, raw: str) -> Call:
        raise NotImplementedError

    # ---- the region and the crop ----

    def locate(self, call: Call, images: Sequence[ToolImage]) -> Box:
        """The region ``call`` points at, in pixels of the original image that ``images[call.source]`` comes from.

        Args:
            call: the call (any values: every bad one is refused).
            images: the conversation's images, as `ImageZoomInTool.images` holds them: originals, then crops, each
                with the view size the policy saw and its region of its original.

        Raises:
            ToolCallError: for every bad call, and only this.
        """
        raise NotImplementedError

    def view(self, original: Image.Image, box: Box) -> Image.Image:
        """The crop of ``box`` (original pixels) as this dialect returns it: ``zoom`` times larger up to
        ``max_pixels`` when ``zoom`` is set, else resized by the reference's rule.

        Raises:
            ValueError: ``box`` does not lie inside ``original``.
        """
        region = crop(original, box)
        if self.zoom is not None:
            return enlarge(region, self.zoom, self.max_pixels)
        size = self._view_size(*region.size)
        return region if size == region.size else resize_to(region, size)

    def _view_size(self, width: int, height: int) -> tuple[int, int]:
        return rules.smart_size(width, height, self.factor, self.min_pixels, self.max_pixels)

    # ---- prompting ----

    def reply(self, ok: bool, *, error: str | None = None, observation: int | None = None,
              size: tuple[int, int] | None = None) -> list[Block]:
        """The content blocks of the turn that returns a call's result (``{"type": "image"}``: attach the crop).

        Args:
            ok: the call ran and a crop comes back.
            error: why it did not (required when not ``ok``); an error reply is always text.
            observation: the observation number Mini-o3's text shows.
            size: (width, height) of the returned crop, which Pixel-Reasoner's text states.

        Raises:
            ValueError: ``error`` missing for a failed call or given for a successful one, or a number the dialect's
                text needs missing.
        """
        if ok == (error is not None):
            raise ValueError("pass error=... exactly when ok is False")
        if not ok:
            return [text_block(self._error_text(" ".join(str(error).split())))]
        return self._reply_blocks(observation, size) if self.reply_text else [dict(IMAGE_BLOCK)]

    def _error_text(self, error: str) -> str:
        return f"Error: {error}"

    def _reply_blocks(self, observation: int | None, size: tuple[int, int] | None) -> list[Block]:
        return [dict(IMAGE_BLOCK)]

    def system_prompt(self) -> str | None:
        """The system prompt the reference uses; None where the chat template renders `schema` itself."""
        return None

    def instruction(self) -> str | None:
        """Text the reference appends to the user's question, or None."""
        return None

    def schema(self) -> dict[str, Any] | None:
        """The function schema for a chat template's ``tools=[...]``; None for a dialect without one."""
        return None

    def format_call(self, bbox: Sequence[float], label: str | None = None, source: int = 0) -> str:
        """The text a policy writes for this call (scripted policies, tests)."""
        raise NotImplementedError
