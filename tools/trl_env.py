"""The zoom tools as TRL tools: an environment class for ``GRPOTrainer(environment_factory=...)``.

Use ``environment_factory``, not ``tools=``. A zoom needs the rollout's image (and, for the internal zoom, its
question), and neither is ever an argument the policy writes: the harness holds them. TRL's ``tools=`` takes
module-level typed functions that receive only the arguments of the call, so a bare function cannot know which of
the batch's images it is zooming into. ``environment_factory`` gives one instance per rollout: TRL calls
``reset(**row)`` with the dataset row before generating, and the instance's public methods become the tools, so
each call reads that rollout's image. This module therefore has no plain-function form.

`zoom_environment(model)` returns the class to pass:

* ``zoom(hint=None)``: the internal zoom of `zoom_once`: the box comes from the model's own Q-Zoom heads on the
  layer-K prefill of the row's image and question (or the hint), never from coordinates the policy writes.
* with ``crop=True``, ``image_zoom_in_tool(bbox_2d, label=None)`` instead: the external crop of `ImageZoomInTool`
  (DeepEyes / Qwen3-VL style), the box written by the policy in ``frame``.

Both return Hugging Face chat content (the crop as ``{"type": "image", "image": PIL}`` then one text line, or the
error line alone), which TRL renders into the next turn and, for the image, includes in the training forward.
Neither raises: a bad argument or a failed perception is an error line the policy reads.

Cost of ``zoom`` under GRPO: in a chat session the perception is the policy's own first prefill, already computed,
so the zoom is free (`session_zoom`). Under GRPO the policy's generation is TRL's, whose caches this module never
sees, so every call pays a fresh perception of the row's image and question: the vision encoder, layers 0..K-1
and the heads' T layers (gate and twig; a hint's own tokens too), not a full prefill, and no decoding.

The perception uses the model it was given. Pass ``model.adapter.model`` as the trainer's ``model``, so the policy
that is trained and the one that perceives are the same object, and call `freeze_perception` first, so training
leaves the embeddings, the vision tower and layers 0..K-1 as they were: the heads read layer K's input and were
trained on the base's, and a policy trained below K would drift away from them (as `qzoom_agent.policy` notes).

The crop's visual tokens count towards ``GRPOConfig.max_completion_length``: TRL silently drops a tool result that
would overflow it (the rollout then ends without the crop). Size the budget for ``view_tokens`` visual tokens,
plus the call and the result's text, per call.

On TRL 1.16.0 with ``environment_factory``, a tool-calling turn in which no rollout of the batch got an image back
(every call refused, e.g. all boxes bad) crashes TRL (``'list' object has no attribute 'prod'`` in
``split_pixel_values_by_grid``) when the processor's image processor returns numpy arrays, as the PIL Qwen
processors used without torchvision do; have it return torch tensors (``tests/test_trl_tool.py`` shows how).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from PIL import Image

from ..images import load_image
from ..policy import above_k_prefixes
from .crop import FRAMES, ZOOM_TOOL, Frame, ImageZoomInTool, short_repr
from .output import ToolOutput
from .zoom import VIEW_TOKENS, zoom_once, zoom_view

if TYPE_CHECKING:
    from torch import nn

    from ..model import QZoomModel

logger = logging.getLogger(__name__)

__all__ = ["ZoomEnvironment", "CropEnvironment", "zoom_environment", "freeze_perception", "row_image",
           "row_question"]


def row_image(row: Mapping[str, Any]) -> Image.Image | None:
    """The row's image as an RGB PIL image: ``image``, else the first of ``images``; None when it has none.

    Accepts what a ``datasets`` column holds: a PIL image, a path, bytes, or an undecoded ``{"bytes", "path"}``.

    Raises:
        ValueError: the image cannot be loaded (`qzoom_agent.images.ImageLoadError`) or has an unsupported type.
    """
    value = row.get("image")
    if value is None:
        images = row.get("images")
        if isinstance(images, (list, tuple)) and images:
            value = images[0]
        elif images is not None and not isinstance(images, (list, tuple)):
            value = images
    if value is None:
        return None
    if isinstance(value, Mapping):  # an undecoded datasets Image feature
        value = value.get("bytes") or value.get("path")
        if value is None:
            return None
    try:
        return load_image(value)
    except TypeError as err:
        raise ValueError(str(err)) from err


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        return " ".join(p["text"] for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str))
    return ""


def row_question(row: Mapping[str, Any]) -> str:
    """The row's question: ``question``, else the text of the prompt's last user turn (or a plain string prompt);
    ``""`` when there is none."""
    question = row.get("question")
    if isinstance(question, str) and question.strip():
        return question
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)):
        for message in reversed(prompt):
            if isinstance(message, Mapping) and message.get("role") == "user":
                return _text_of(message.get("content")).strip()
    return ""


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode for the block: the trainer keeps the policy in train mode during generation, and
    the perception must not depend on dropout."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class _RolloutEnvironment:
    """State shared by both environments: the row, and the counters reward functions and logs read.

    TRL's ``tools/failure_frequency`` counts only calls that raise, which these tools never do: a refused call is
    counted here, in ``failed_calls``.

    Attributes:
        image: the row's original image (None: the row had none, or it failed to load: see ``row_error``).
        question: the row's question.
        answer: the row's ``answer`` column, if any.
        target_box: the row's ``target_box`` column, if any.
        row_error: why the row's image could not be loaded, or None.
        calls: tool calls in this rollout.
        failed_calls: calls that returned an error line instead of a crop.
        boxes: the box of each call in source pixels ``[x1, y1, x2, y2]`` (None for a failed call).
        outputs: each call's `ToolOutput` (its artifact holds the box, gate score, source of the box).
    """

    def __init__(self) -> None:
        self._clear()

    def _clear(self) -> None:
        self.image: Image.Image | None = None
        self.question = ""
        self.answer: Any = None
        self.target_box: Any = None
        self.row_error: str | None = None
        self.calls = 0
        self.failed_calls = 0
        self.boxes: list[list[int] | None] = []
        self.outputs: list[ToolOutput] = []

    def reset(self, **row: Any) -> None:
        """Start a rollout on a dataset row: load its image, take its question, clear the counters.

        A row whose image cannot be loaded does not stop the batch: every call of the rollout then returns an
        error line, and ``row_error`` says why (also logged).
        """
        self._clear()
        self.question = row_question(row)
        self.answer = row.get("answer")
        self.target_box = row.get("target_box")
        try:
            self.image = row_image(row)
        except ValueError as err:
            self.row_error = f"the image of this example could not be loaded: {err}"
            logger.warning("%s", self.row_error)
        else:
            if self.image is None:
                self.row_error = "this example has no image to zoom into"
        self._start()
        return None

    def _start(self) -> None:
        """Per-tool setup once the row is loaded."""

    def _record(self, out: ToolOutput) -> list[dict[str, Any]]:
        self.calls += 1
        self.failed_calls += int(out.is_error)
        box = out.artifact.get("box") if not out.is_error else None
        self.boxes.append(list(box) if box is not None else None)
        self.outputs.append(out)
        return out.chat_content()


class ZoomEnvironment(_RolloutEnvironment):
    """One GRPO rollout with the internal zoom tool ``zoom``; subclassed by `zoom_environment` with its model.

    Each call runs `zoom_once` on the row's image and question: a fresh prefill below layer K and the twig (see
    the module docstring for its cost under GRPO), in eval mode, without gradients.
    """

    model: ClassVar[QZoomModel]
    view_tokens: ClassVar[int] = VIEW_TOKENS

    def zoom(self, hint: str | None = None) -> list[dict]:
        """Zoom in on the part of the image that matters for the question and look at it closely.

        Args:
            hint: What to look for, if not what the question asks about (optional), e.g. "the green tag".

        Returns:
            The zoomed-in region as an image, and one line giving its box in the image's pixels.
        """
        # The policy reads this docstring (TRL renders it into the prompt), so the engineering notes live in the
        # class and module docstrings. A bad call is an error line, never an exception: TRL would turn one into
        # an {"error": ...} dict too, but this rollout's counters would not see it.
        if hint is not None and not isinstance(hint, str):
            return self._record(ToolOutput.error(f"hint must be a string, got {short_repr(hint)}"))
        hint = hint if hint and hint.strip() else None  # an empty hint means the question, as an absent one
        if self.image is None:
            return self._record(ToolOutput.error(f"zoom needs an image: {self.row_error}"))
        model = self.model
        if model.heads is None:
            return self._record(ToolOutput.error("this model has no Q-Zoom heads, so it cannot zoom"))
        try:
            with _eval_mode(model.adapter.model):
                out, p = zoom_once(model, self.image, self.question, hint)
        except Exception as err:  # a failed perception must end this call, not the whole training batch
            logger.warning("zoom failed on %r: %s", self.question[:80], err, exc_info=True)
            return self._record(ToolOutput.error(f"zoom failed: {' '.join(str(err).split())[:200]}"))
        if out.image is not None and p.box is not None and self.view_tokens != VIEW_TOKENS:
            view = zoom_view(self.image, p.box, px_per_token=model.adapter.px_per_token, max_tokens=self.view_tokens)
            out = dataclasses.replace(out, image=view, artifact={**out.artifact, "view_size": list(view.size)})
        return self._record(out)


_CROP_DOC = """Zoom in on a region of the image: crop it and look at it closely.

        Args:
            bbox_2d: The region as [x1, y1, x2, y2]: (x1, y1) is its top-left corner and (x2, y2) its bottom-right
                one.{frame_words}
            label: The name or label of the object in the region (optional).

        Returns:
            The cropped region as an image, and one line giving its box in the image's pixels.
        """
_FRAME_WORDS = {"absolute": " Coordinates are pixels of the image as you see it.",
                "norm1000": " Coordinates are relative, from 0 to 1000 across the image's width and height.",
                "norm1": " Coordinates are relative, from 0 to 1 across the image's width and height."}


class CropEnvironment(_RolloutEnvironment):
    """One GRPO rollout with the external crop tool ``image_zoom_in_tool``; subclassed by `zoom_environment`.

    The policy writes the box in ``_frame``; `ImageZoomInTool` maps it to the original's pixels and crops it. Each
    rollout has its own tool, so the rollout's crops are numbered from 1 in it. Settings are underscored class
    attributes because TRL makes every public function of the class a tool.
    """

    _frame: ClassVar[Frame] = "norm1000"
    _view_size_of: ClassVar[Callable[[Image.Image], tuple[int, int]] | None] = None
    _max_pixels: ClassVar[int | None] = None

    def _start(self) -> None:
        size_of = self._view_size_of  # a staticmethod (or None) on the subclass: read through the instance
        self._tool = None if self.image is None else ImageZoomInTool(
            self.image, frame=self._frame, max_pixels=self._max_pixels, view_size_of=size_of)

    def image_zoom_in_tool(self, bbox_2d: list[float], label: str | None = None) -> list[dict]:
        # The docstring, which the policy reads, is _CROP_DOC with the frame's wording (set below and by
        # zoom_environment for its frame).
        if self._tool is None:
            return self._record(ToolOutput.error(f"{ZOOM_TOOL} needs an image: {self.row_error}"))
        return self._record(self._tool(bbox_2d, label))

    image_zoom_in_tool.__doc__ = _CROP_DOC.format(frame_words=_FRAME_WORDS["norm1000"])


def _tolerant(method: Callable[..., list[dict]]) -> Callable[..., list[dict]]:
    """``method`` with any arguments: ones its signature does not take are an error line and a counted failed
    call, not a TypeError (TRL would show the policy the Python message and the counters would miss the call).
    The signature and docstring, from which TRL builds the tool's schema, are ``method``'s."""
    signature = inspect.signature(method)

    @functools.wraps(method)
    def call(self: _RolloutEnvironment, *args: Any, **kwargs: Any) -> list[dict]:
        try:
            signature.bind(self, *args, **kwargs)
        except TypeError as err:
            return self._record(ToolOutput.error(f"{method.__name__}: {err}"))
        return method(self, *args, **kwargs)

    return call


def zoom_environment(model: QZoomModel, *, crop: bool = False, frame: Frame = "norm1000",
                     view_tokens: int = VIEW_TOKENS,
                     view_size_of: Callable[[Image.Image], tuple[int, int]] | None = None) -> type:
    """The environment class for ``GRPOTrainer(environment_factory=...)``: one instance per rollout.

    ``reset(**row)`` takes the dataset row (``image`` or ``images``; ``question``, else the prompt's last user
    text; optional ``answer`` and ``target_box``) and returns None. The public tool is ``zoom`` (the internal zoom),
    or ``image_zoom_in_tool`` with ``crop=True``. Counters on each instance (``calls``, ``failed_calls``, ``boxes``,
    ``outputs``) are there for reward functions, which TRL passes the rollouts' instances as ``environments=``.

    Under GRPO every ``zoom`` call costs a fresh prefill below layer K of the row's image and question (TRL's
    generation caches are not ours to reuse); pass ``model.adapter.model`` as the trainer's ``model``, after
    `freeze_perception`, so the perception is the policy's own and stays valid while it trains.

    Args:
        model: a model with Q-Zoom heads (the internal zoom); for ``crop=True`` only its pixels per visual token
            are read.
        crop: expose the external crop ``image_zoom_in_tool`` instead of ``zoom``.
        frame: the frame of the policy's boxes for ``crop=True``: "absolute", "norm1000" or "norm1".
        view_tokens: cap, in the model's visual tokens, on the size of the image a call returns (the crop's
            tokens count towards ``max_completion_length``).
        view_size_of: for ``crop=True`` with ``frame="absolute"``: the size the policy's processor shows an image
            at (absolute boxes are in those pixels); the image's own size when None.

    Returns:
        A subclass of `ZoomEnvironment` or `CropEnvironment` bound to ``model`` and these settings.

    Raises:
        ValueError: a bad frame or view_tokens.
    """
    if frame not in FRAMES:
        raise ValueError(f"frame must be one of {FRAMES}, got {frame!r}")
    if isinstance(view_tokens, bool) or not isinstance(view_tokens, int) or view_tokens < 1:
        raise ValueError(f"view_tokens must be an int >= 1, got {view_tokens!r}")
    if not crop:
        return type("QZoomEnvironment", (ZoomEnvironment,), {"model": model, "view_tokens": view_tokens,
                                                             "zoom": _tolerant(ZoomEnvironment.zoom),
                                                             "__module__": __name__})

    # TRL builds the tool's schema from the method's docstring, so this frame's wording goes on a copy of it.
    def image_zoom_in_tool(self: CropEnvironment, bbox_2d: list[float], label: str | None = None) -> list[dict]:
        return CropEnvironment.image_zoom_in_tool(self, bbox_2d, label)

    image_zoom_in_tool.__doc__ = _CROP_DOC.format(frame_words=_FRAME_WORDS[frame])
    image_zoom_in_tool = _tolerant(image_zoom_in_tool)
    px = float(model.adapter.px_per_token)
    return type("CropZoomEnvironment", (CropEnvironment,), {
        "_frame": frame, "_view_size_of": staticmethod(view_size_of) if view_size_of else None,
        "_max_pixels": round(view_tokens * px * px), "image_zoom_in_tool": image_zoom_in_tool,
        "__module__": __name__})


def freeze_perception(model: QZoomModel) -> list[str]:
    """Freeze what the Q-Zoom heads read, so a policy trained on ``model.adapter.model`` keeps its perception.

    Leaves trainable only the decoder layers from K on, the final norm and the LM head (not when it is tied to the
    input embeddings); the vision tower, the embeddings and layers 0..K-1 are frozen, as in a
    `qzoom_agent.policy` delta. The heads are not touched (they are not the trainer's parameters).

    Returns:
        The names of the parameters left trainable.
    """
    hf = model.adapter.model
    prefixes = tuple(above_k_prefixes(model))
    hf.requires_grad_(False)
    for name, p in hf.named_parameters():
        if name.startswith(prefixes):
            p.requires_grad_(True)
    return [name for name, p in hf.named_parameters() if p.requires_grad]

