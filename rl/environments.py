"""The rollout environments of the GRPO recipes, one class per recipe for ``GRPOTrainer(environment_factory=...)``.

* ``zoom``: the internal, zero-cost zoom (`qzoom_agent.tools.trl_env.zoom_environment`): the policy writes no
  coordinates, and the box comes from its own Q-Zoom heads on the layer-K states of the row's image and question.
* ``crop``: an external crop in a dialect of the baselines (`qzoom_agent.tools.dialects`, DeepEyes' by default):
  the policy writes ``bbox_2d`` text, the dialect reads and checks it exactly as its agent does, and the crop comes
  back as the dialect's reply.
* ``none``: no environment at all, so the rollouts are single-turn (the no-tool ablation).

Cost of a ``zoom`` call under GRPO. TRL's generation owns its KV caches, so the zoom cannot reuse the rollout's
prefill as the agent loop does: each call runs the vision tower on the row's image and the decoder layers below K
plus the heads' T layers on the first turn's tokens (eval mode, no gradient), and no decoding. With vLLM
generation the same partial prefill runs on the trainer's HF model, which holds the weights being trained.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from PIL import Image

from ..boxes import Box
from ..tools.crop import ToolImage
from ..tools.dialects import Dialect, get_dialect
from ..tools.output import ToolOutput
from ..tools.trl_env import _RolloutEnvironment, zoom_environment

if TYPE_CHECKING:
    from ..model import QZoomModel
    from .config import RecipeArguments

logger = logging.getLogger(__name__)

__all__ = ["DialectEnvironment", "build_environment", "TOOL_NAMES"]

ViewSizeOf = Callable[[Image.Image], tuple[int, int]]


class DialectEnvironment(_RolloutEnvironment):
    """One GRPO rollout with an external-crop tool in a dialect; subclassed per dialect by `build_environment`.

    The original image is index 0 of the conversation's images and every returned crop is appended, so a dialect
    that zooms into earlier crops (Qwen3-VL's ``img_idx``, Pixel-Reasoner's ``target_image``) finds them. Settings
    are underscored class attributes because TRL makes every public function of the class a tool.
    """

    _dialect: ClassVar[Dialect]
    _view_size_of: ClassVar[ViewSizeOf]
    _tool_name: ClassVar[str]

    def _start(self) -> None:
        self.images: list[ToolImage] = []
        if self.image is not None:
            self.images.append(ToolImage(self.image, tuple(self._view_size_of(self.image)), 0,
                                         Box(0, 0, self.image.width, self.image.height)))

    def _run(self, arguments: dict[str, Any]) -> list[dict]:
        """Read the call as the dialect's agent does (its own text, re-serialised), crop, and reply."""
        d = self._dialect
        if self.image is None:
            return self._record(ToolOutput.error(f"{self._tool_name} needs an image: {self.row_error}"),
                                d.reply(False, error=f"no image: {self.row_error}"))
        text = f'<tool_call>\n{json.dumps({"name": self._tool_name, "arguments": arguments})}\n</tool_call>'
        turn = d.parse(text)
        if turn.call is None:
            error = turn.error or "the call could not be read"
            return self._record(ToolOutput.error(error), d.reply(False, error=error))
        try:
            box = d.locate(turn.call, self.images)
            view = d.view(self.image, box)  # boxes are in the one original's pixels
        except Exception as err:  # ToolCallError for a refused box; anything else must not stop the batch
            error = " ".join(str(err).split())[:300]
            return self._record(ToolOutput.error(error), d.reply(False, error=error))
        self.images.append(ToolImage(view, view.size, 0, box))
        blocks = d.reply(True, observation=len(self.images) - 1, size=view.size)
        out = ToolOutput(image=view, text=f"Cropped {list(box.as_tuple())}",
                         artifact={"box": list(box.as_tuple()), "view_size": list(view.size)})
        return self._record(out, [{"type": "image", "image": view} if b.get("type") == "image" else b
                                  for b in blocks])

    def _record(self, out: ToolOutput, content: list[dict] | None = None) -> list[dict]:  # type: ignore[override]
        chat = super()._record(out)
        return chat if content is None else content


def _deepeyes_tool(self: DialectEnvironment, bbox_2d: list[float], label: str | None = None) -> list[dict]:
    return self._run({"bbox_2d": bbox_2d, **({} if label is None else {"label": label})})


def _qwen3vl_tool(self: DialectEnvironment, bbox_2d: list[float], label: str | None = None,
                  img_idx: int | None = None) -> list[dict]:
    args: dict[str, Any] = {"bbox_2d": bbox_2d}
    if label is not None:
        args["label"] = label
    if img_idx is not None:
        args["img_idx"] = img_idx
    return self._run(args)


def _pixelreasoner_tool(self: DialectEnvironment, bbox_2d: list[float], target_image: int) -> list[dict]:
    return self._run({"bbox_2d": bbox_2d, "target_image": target_image})


# TRL builds each tool's schema from the method's signature and Google docstring, which the policy reads.
_DOCS = {
    "deepeyes": """Zoom in on a region of the image: crop it and look at it closely.

        Args:
            bbox_2d: The region as [x1, y1, x2, y2] in pixels of the image as you see it: (x1, y1) is its top-left
                corner and (x2, y2) its bottom-right one.
            label: The name or label of the object in the region (optional).
        """,
    "qwen3vl": """Zoom in on a region of an image: crop it and look at it closely.

        Args:
            bbox_2d: The region as [x1, y1, x2, y2], relative coordinates from 0 to 1000 across the image's width
                and height.
            label: The name or label of the object in the region (optional).
            img_idx: Which image to crop: 0 is the original, k the k-th crop returned (optional, default 0).
        """,
    "pixelreasoner": """Crop a region of an image given normalized coordinates and look at it closely.

        Args:
            bbox_2d: The region as [x1, y1, x2, y2], normalized coordinates from 0 to 1.
            target_image: Which image to crop: 1 is the original, k + 1 the k-th crop returned.
        """,
}
_TOOLS = {"deepeyes": ("image_zoom_in_tool", _deepeyes_tool), "qwen3vl": ("image_zoom_in_tool", _qwen3vl_tool),
          "pixelreasoner": ("crop_image_normalized", _pixelreasoner_tool)}
TOOL_NAMES = {"zoom": "zoom", **{d: name for d, (name, _) in _TOOLS.items()}}


def dialect_environment(dialect: Dialect, view_size_of: ViewSizeOf) -> type:
    """The environment class whose one tool is ``dialect``'s crop (deepeyes, qwen3vl or pixelreasoner).

    Args:
        dialect: the configured dialect (its sizing and reply text, e.g. `bench.deepeyes_agent.trained_settings`).
        view_size_of: the size the policy's processor shows an image at (absolute boxes are in those pixels).

    Raises:
        ValueError: a dialect whose calls TRL's Hermes parser cannot read (minio3).
    """
    if dialect.name not in _TOOLS:
        raise ValueError(f"dialect {dialect.name!r} has no GRPO environment; choose one of {', '.join(_TOOLS)}")
    name, fn = _TOOLS[dialect.name]

    names = list(inspect.signature(fn).parameters)[1:]

    def tool(self: DialectEnvironment, *args: Any, **kwargs: Any) -> list[dict]:
        # TRL calls a tool with the policy's arguments as keywords, whatever they are; the dialect reads them (a
        # missing or unknown one is an error reply and a counted failed call, never a TypeError). ``fn`` only
        # gives the schema TRL shows the policy.
        if len(args) > len(names):
            error = f"{name} takes at most {len(names)} arguments ({', '.join(names)}), got {len(args)}"
            return self._record(ToolOutput.error(error), self._dialect.reply(False, error=error))
        return self._run({**dict(zip(names, args, strict=False)), **kwargs})  # fewer positionals: fine

    tool = functools.wraps(fn)(tool)
    tool.__name__ = tool.__qualname__ = name
    tool.__doc__ = _DOCS[dialect.name]
    return type(f"{dialect.name.capitalize()}CropEnvironment", (DialectEnvironment,), {
        "_dialect": dialect, "_view_size_of": staticmethod(view_size_of), "_tool_name": name, name: tool,
        "__module__": __name__})


def build_environment(recipe: RecipeArguments, model: QZoomModel, view_size_of: ViewSizeOf) -> type | None:
    """The ``environment_factory`` of ``recipe``: a class for ``zoom`` or ``crop``, None for ``none``.

    The crop follows the conventions its policy was trained with: a bundled or recipe-trained DeepEyes policy gets
    `bench.deepeyes_agent.trained_settings` (crops enlarged, image-only replies), any other model the dialect's
    reference sizing and reply text.

    Raises:
        ValueError: ``zoom`` on a model without Q-Zoom heads.
    """
    if recipe.environment == "none":
        return None
    if recipe.environment == "zoom":
        if model.heads is None:
            raise ValueError(f"environment 'zoom' needs Q-Zoom heads; {recipe.model!r} has none (pass --qzoom DIR)")
        return zoom_environment(model, view_tokens=recipe.view_tokens)
    from ..bench.deepeyes_agent import trained_on_zoomworld, trained_settings

    if recipe.dialect == "deepeyes" and (model.policy is not None or trained_on_zoomworld(model)):
        dialect = trained_settings(model)["dialect"]
    else:
        from ..tools.dialects import DIALECTS

        px = float(model.adapter.px_per_token)
        most = round(recipe.view_tokens * px * px)
        least = min(DIALECTS[recipe.dialect].min_pixels, most)  # a small view_tokens lowers the dialect's floor too
        dialect = get_dialect(recipe.dialect, max_pixels=most, min_pixels=least)
    return dialect_environment(dialect, view_size_of)
