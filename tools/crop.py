"""The external-crop tool ``image_zoom_in_tool``: one box-mapping core for every dialect, and the tool itself.

External-crop agents (DeepEyes, Qwen3-VL's native tool, Mini-o3, Pixel-Reasoner) write a box as text and a harness
crops it. The box arrives in the policy's own coordinate frame, the most common source of silent bugs in these
agents, so every frame goes through one function, `map_box`, to pixels of the original image:

* ``absolute``: pixels of the *resized* view the model saw (Qwen2.5-VL);
* ``norm1000``: 0-1000 across the image (Qwen2-VL, Qwen3-VL);
* ``norm1``: 0-1 across the image (Mini-o3, Pixel-Reasoner, Zoom-Refine).

A policy writes anything: strings, booleans, NaN, 400-digit integers, ``1e999`` (an infinity once JSON-parsed).
`map_box` turns every such box into a `ToolCallError` whose message the policy reads, never an ``OverflowError``
that would stop a whole comparison run. The arithmetic is exact (fractions of the decimals the policy wrote), so
the mapping is monotone and rounds outward without off-by-one drift.

`ImageZoomInTool` wraps the core as a tool that never raises: a bad argument comes back as an error `ToolOutput`.
Crops of crops (``img_idx``) are mapped through each image's own region back to the original, and always cut from
the original's pixels, so zooming twice loses no resolution.
"""

from __future__ import annotations

import math
import numbers
import reprlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

from PIL import Image

from ..boxes import Box, Pair, check_pair, sanitize_box
from ..images import resize_to
from .output import ToolOutput

ZOOM_TOOL = "image_zoom_in_tool"
MIN_CROP_SIDE = 30  # px of the original image; a side at most this long is refused (DeepEyes' harness)
MAX_CROP_ASPECT = 100.0  # longest over shortest side; a thinner region is refused (DeepEyes' harness)
Frame = Literal["absolute", "norm1000", "norm1"]
FRAMES: tuple[str, ...] = ("absolute", "norm1000", "norm1")
Dialect = Literal["deepeyes", "qwen3vl"]  # the schema a policy was trained on: DeepEyes', or Qwen3-VL's native one
DIALECTS: tuple[str, ...] = ("deepeyes", "qwen3vl")
NATIVE_FRAME: dict[str, Frame] = {"deepeyes": "absolute", "qwen3vl": "norm1000"}
XYXY = tuple[float, float, float, float]

_repr = reprlib.Repr()  # bounded reprs: a policy's garbage must not make an error message huge
_repr.maxstring, _repr.maxother, _repr.maxlong, _repr.maxlist, _repr.maxdict, _repr.maxlevel = 40, 40, 24, 6, 4, 3


class ToolCallError(ValueError):
    """A tool call that cannot be carried out; its message (one line) is what the policy is told."""


def short_repr(value: object) -> str:
    """A bounded repr of an untrusted value, for error messages (huge ints, long strings and deep lists shortened)."""
    try:
        return _repr.repr(value)
    except Exception:  # e.g. an int past Python's digit limit for str(); the type is all the policy needs
        return f"<{type(value).__name__}>"


def check_bbox(bbox: object) -> XYXY:
    """``bbox`` as four finite floats, in the order written.

    Raises:
        ToolCallError: not a list or tuple of four real numbers (booleans and strings are not numbers), or a value
            that is NaN, infinite, or an integer too large to be a float.
    """
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise ToolCallError(f"bbox_2d must be four numbers [x1, y1, x2, y2], got {short_repr(bbox)}")
    values = []
    for v in bbox:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ToolCallError(f"bbox_2d must be four numbers [x1, y1, x2, y2], got {short_repr(bbox)}")
        try:
            f = float(v)
        except OverflowError:
            f = math.inf
        if not math.isfinite(f):
            raise ToolCallError(f"bbox_2d must be four finite numbers [x1, y1, x2, y2], got {short_repr(bbox)}")
        values.append(f)
    return values[0], values[1], values[2], values[3]


def _size(name: str, size: object) -> tuple[int, int]:
    try:
        return check_pair(name, size, 1)  # type: ignore[arg-type]
    except ValueError as err:
        raise ToolCallError(str(err)) from err


def frame_extent(frame: str, view_size: Pair) -> tuple[int, int]:
    """The (width, height) that ``frame``'s coordinates span: the view for "absolute", 1000 or 1 otherwise.

    Raises:
        ToolCallError: an unknown frame, or a bad ``view_size`` for "absolute".
    """
    if frame == "absolute":
        return _size("view_size", view_size)
    if frame == "norm1000":
        return 1000, 1000
    if frame == "norm1":
        return 1, 1
    raise ToolCallError(f"frame must be one of {FRAMES}, got {short_repr(frame)}")


def map_box(bbox: Sequence[float], frame: Frame, view_size: Pair, source_size: Pair) -> Box:
    """Map a box the policy wrote in ``frame`` to whole pixels of the original image, clipped to it.

    The parts of the box outside the frame's extent are dropped, the rest is scaled exactly and rounded outward, so
    the result always covers what the policy pointed at (``boxes.sanitize_box`` makes the Box).

    Args:
        bbox: ``(x1, y1, x2, y2)`` as the policy wrote it: top-left, then bottom-right corner.
        frame: "absolute" (pixels of the view of ``view_size``), "norm1000" or "norm1".
        view_size: (width, height) of the resized image the policy saw; read for "absolute" only.
        source_size: (width, height) of the original image.

    Returns:
        A Box with ``0 <= x1 < x2 <= W`` and ``0 <= y1 < y2 <= H``.

    Raises:
        ToolCallError: for every bad input, and only this: not four finite numbers, ``x2 <= x1`` or ``y2 <= y1``
            (inverted or empty), a box wholly outside the image, an unknown frame, or bad sizes.
    """
    x1, y1, x2, y2 = check_bbox(bbox)
    fw, fh = frame_extent(frame, view_size)
    sw, sh = _size("source_size", source_size)
    if x2 <= x1 or y2 <= y1:
        raise ToolCallError(f"bbox_2d needs x1 < x2 and y1 < y2 (not inverted or empty), got {short_repr(bbox)}")
    if x2 <= 0 or y2 <= 0 or x1 >= fw or y1 >= fh:
        raise ToolCallError(f"bbox_2d {short_repr(bbox)} lies outside the image, which spans [0, 0, {fw}, {fh}]")

    def to_source(v: float, extent: int, size: int) -> Fraction:
        # Clip first (no overflow, whatever the magnitude), then scale the decimal the policy wrote, exactly: 0.4 is
        # 2/5, not the binary float just above it, whose exact product with 2000 would round out to 801.
        return Fraction(repr(min(max(v, 0.0), float(extent)))) * Fraction(size, extent)

    box = sanitize_box(to_source(x1, fw, sw), to_source(y1, fh, sh), to_source(x2, fw, sw), to_source(y2, fh, sh),
                       (sw, sh))
    if box is None:  # unreachable after the checks above; kept so no None ever escapes as a box
        raise ToolCallError(f"bbox_2d {short_repr(bbox)} lies outside the image")
    return box


def source_to_frame(box: Box | Sequence[float], frame: Frame, view_size: Pair, source_size: Pair) -> XYXY:
    """The inverse of `map_box`: a box in original pixels written in ``frame`` (floats), as a policy would write it.

    Scripted policies and tests use it; ``map_box(source_to_frame(b, ...), ...)`` covers ``b`` within a pixel.

    Raises:
        ToolCallError: an unknown frame or bad sizes.
    """
    fw, fh = frame_extent(frame, view_size)
    sw, sh = _size("source_size", source_size)
    x1, y1, x2, y2 = box.as_tuple() if isinstance(box, Box) else box
    return x1 * fw / sw, y1 * fh / sh, x2 * fw / sw, y2 * fh / sh


def check_crop_size(width: int, height: int) -> None:
    """Refuse a region DeepEyes' harness refuses: a side of at most `MIN_CROP_SIDE` px of the original, or an
    aspect ratio above `MAX_CROP_ASPECT`; the one place these limits are checked.

    Raises:
        ToolCallError: the region is too small or too thin.
    """
    if min(width, height) <= MIN_CROP_SIDE:
        raise ToolCallError(f"the region is {width}x{height} px; each side must exceed {MIN_CROP_SIDE} px")
    if max(width, height) / min(width, height) > MAX_CROP_ASPECT:
        raise ToolCallError(f"the region's aspect ratio {max(width, height) / min(width, height):.0f} exceeds "
                            f"{MAX_CROP_ASPECT:.0f}")


def crop_for_tool(image: Image.Image, box: Box | tuple[int, int, int, int], *, zoom: float = 1.0,
                  max_pixels: int | None = None) -> Image.Image:
    """Cut ``box`` (original pixels) from ``image``, enlarged ``zoom`` times but to at most ``max_pixels``.

    Raises:
        ToolCallError: a side of at most `MIN_CROP_SIDE` px, or an aspect ratio above `MAX_CROP_ASPECT`.
    """
    box = box.as_tuple() if isinstance(box, Box) else box
    check_crop_size(box[2] - box[0], box[3] - box[1])
    return enlarge(image.crop(box), zoom, max_pixels)


def enlarge(crop: Image.Image, zoom: float, max_pixels: float | None = None) -> Image.Image:
    """``crop`` enlarged ``zoom`` times, but to at most ``max_pixels`` (no point enlarging past what the encoder
    will keep); returned as is when the scale comes out as 1."""
    w, h = crop.size
    if max_pixels is not None:
        zoom = min(zoom, math.sqrt(max_pixels / (w * h)))
    if abs(zoom - 1.0) < 1e-6:
        return crop
    return resize_to(crop, (max(1, round(w * zoom)), max(1, round(h * zoom))))


_BBOX_TEXT = ("The bounding box of the region to zoom in, as [x1, y1, x2, y2], where (x1, y1) is the top-left corner "
              "and (x2, y2) is the bottom-right corner.")
_FRAME_TEXT = {"absolute": "",
               "norm1000": " Coordinates are relative, from 0 to 1000 across the image's width and height.",
               "norm1": " Coordinates are relative, from 0 to 1 across the image's width and height."}


def zoom_tool_schema(dialect: Dialect = "deepeyes", frame: Frame | None = None) -> dict[str, Any]:
    """The function schema to pass as ``tools=[...]`` to a chat template that lists tools.

    "deepeyes" is DeepEyes' schema (``bbox_2d``, ``label``) with its ``required`` fixed to ``bbox_2d``; "qwen3vl" is
    Qwen3-VL's native tool, which adds ``img_idx`` to crop an earlier crop. The image itself is never an argument:
    the harness holds it, so the policy cannot point the tool at another file.

    Args:
        dialect: "deepeyes" or "qwen3vl".
        frame: the frame the policy's boxes are in, stated in ``bbox_2d``'s description; the dialect's own
            ("absolute" for DeepEyes, "norm1000" for Qwen3-VL) when None.

    Raises:
        ValueError: an unknown dialect or frame.
    """
    if dialect not in DIALECTS:
        raise ValueError(f"dialect must be one of {DIALECTS}, got {dialect!r}")
    frame = NATIVE_FRAME[dialect] if frame is None else frame
    if frame not in FRAMES:
        raise ValueError(f"frame must be one of {FRAMES}, got {frame!r}")
    properties: dict[str, Any] = {
        "bbox_2d": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4,
                    "description": _BBOX_TEXT + _FRAME_TEXT[frame]},
        "label": {"type": "string", "description": "The name or label of the object in the specified bounding box "
                                                   "(optional)."},
    }
    if dialect == "qwen3vl":
        properties["bbox_2d"]["description"] += " They refer to the image chosen by img_idx."
        properties["img_idx"] = {"type": "integer", "minimum": 0,
                                 "description": "The index of the image to zoom into: 0 is the original image, 1, "
                                                "2, ... the zoomed-in images this tool returned, in order."}
    return {"type": "function", "function": {
        "name": ZOOM_TOOL,
        "description": "Zoom in on a specific region of an image by cropping it based on a bounding box (bbox) and "
                       "an optional object label.",
        "parameters": {"type": "object", "properties": properties, "required": ["bbox_2d"]},
    }}


@dataclass(frozen=True)
class ToolImage:
    """One image of the conversation that the tool can crop.

    Attributes:
        image: what the policy was shown: an original, or a crop as the tool returned it (enlarged).
        view_size: (width, height) the policy saw it at; "absolute" boxes are in these pixels.
        source: index of the original it comes from (its own index for an original).
        box: its region in that original's pixels (the whole image for an original).
    """

    image: Image.Image
    view_size: tuple[int, int]
    source: int
    box: Box


def _label(label: object) -> str | None:
    if label is None or isinstance(label, str):
        return label
    raise ToolCallError(f"label must be a string, got {short_repr(label)}")


class ImageZoomInTool:
    """``image_zoom_in_tool`` over one conversation's images: crops a region and returns it enlarged.

    The tool holds the images (the policy's schema never carries one). Index 0 is the first original; every crop
    the tool returns is appended, so a later call can crop it again with ``img_idx``. A call's box is in the
    tool's ``frame`` relative to the image it names, mapped through that image's own region to the original's
    pixels, and cut from the original.

    Args:
        images: the conversation's original image(s).
        view_sizes: (width, height) each original was shown to the policy at (the resized view "absolute" boxes
            are in); ``view_size_of(image)`` of each when None.
        frame: the frame of the policy's boxes: "absolute", "norm1000" or "norm1".
        zoom: enlargement of the returned crop.
        max_pixels: cap on the returned crop's pixels (enlargement stops there); None for no cap.
        view_size_of: the size the policy will see an image at (a crop this tool returns, or an original without
            a view size), e.g. the processor's resize; the image's own size when None.

    Raises:
        ValueError: no images, a view size per image missing, or a bad frame, zoom or max_pixels.
    """

    def __init__(self, images: Image.Image | Sequence[Image.Image], view_sizes: Sequence[Pair] | None = None,
                 frame: Frame = "absolute", *, zoom: float = 1.0, max_pixels: int | None = None,
                 view_size_of: Callable[[Image.Image], Pair] | None = None) -> None:
        originals = [images] if isinstance(images, Image.Image) else list(images)
        if not originals or not all(isinstance(im, Image.Image) for im in originals):
            raise ValueError("images must be one PIL image or a non-empty list of them")
        if view_sizes is not None and len(view_sizes) != len(originals):
            raise ValueError(f"view_sizes needs one (width, height) per image: {len(originals)}, got {view_sizes!r}")
        if frame not in FRAMES:
            raise ValueError(f"frame must be one of {FRAMES}, got {frame!r}")
        if isinstance(zoom, bool) or not isinstance(zoom, numbers.Real) or not (math.isfinite(zoom) and zoom > 0):
            raise ValueError(f"zoom must be a finite number > 0, got {zoom!r}")
        if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int)
                                       or max_pixels < 1):
            raise ValueError(f"max_pixels must be an int >= 1 or None, got {max_pixels!r}")
        self.frame = frame
        self.zoom = float(zoom)
        self.max_pixels = max_pixels
        self.view_size_of = view_size_of
        self._images: list[ToolImage] = []
        for i, image in enumerate(originals):
            self.add_image(image, None if view_sizes is None else view_sizes[i])

    @property
    def images(self) -> tuple[ToolImage, ...]:
        """Every image the policy can crop, by ``img_idx``: the originals, then the crops in the order returned."""
        return tuple(self._images)

    def add_image(self, image: Image.Image, view_size: Pair | None = None) -> int:
        """Add another original (e.g. a new user image); returns its ``img_idx``.

        Raises:
            ValueError: not a PIL image, or a bad view size.
        """
        if not isinstance(image, Image.Image):
            raise ValueError(f"image must be a PIL image, got {type(image).__name__}")
        view = self._view_size(image) if view_size is None else check_pair("view_size", view_size, 1)
        check_pair("image size", image.size, 1)
        self._images.append(ToolImage(image, view, len(self._images), Box(0, 0, image.width, image.height)))
        return len(self._images) - 1

    def schema(self, dialect: Dialect = "deepeyes") -> dict[str, Any]:
        """`zoom_tool_schema` for ``dialect``, stating this tool's frame."""
        return zoom_tool_schema(dialect, self.frame)

    def _view_size(self, image: Image.Image) -> tuple[int, int]:
        return check_pair("view_size", self.view_size_of(image) if self.view_size_of else image.size, 1)

    def __call__(self, bbox_2d: list[float], label: str | None = None, img_idx: int | None = None) -> ToolOutput:
        """Zoom in on a region of an image: crop it from the original and look at it closely.

        Args:
            bbox_2d: The region as [x1, y1, x2, y2]: (x1, y1) is its top-left corner, (x2, y2) its bottom-right
                one, in the tool's coordinate frame over the image chosen by img_idx.
            label: The name or label of the object in the region (optional).
            img_idx: Which image to zoom into: 0 is the original image, 1, 2, ... the zoomed-in images this tool
                returned, in order (optional; the original by default).

        Returns:
            The crop as the image, one line of text, and the artifact ``{"box": [x1, y1, x2, y2] in the original's
            pixels, "img_idx", "label", "frame", "crop_idx", "source"}``; an error output with one line saying why
            for any bad argument (this never raises on one).
        """
        try:
            return self._zoom(bbox_2d, label, img_idx)
        except ToolCallError as err:
            return ToolOutput.error(str(err), frame=self.frame)

    def _index(self, img_idx: object) -> int:
        if img_idx is None:
            return 0
        if isinstance(img_idx, bool) or not isinstance(img_idx, numbers.Integral):
            raise ToolCallError(f"img_idx must be an integer (0 for the original), got {short_repr(img_idx)}")
        if not 0 <= img_idx < len(self._images):
            raise ToolCallError(f"img_idx {short_repr(img_idx)} does not exist; the images are 0 to "
                                f"{len(self._images) - 1}")
        return int(img_idx)

    def _zoom(self, bbox_2d: object, label: object, img_idx: object) -> ToolOutput:
        idx, label = self._index(img_idx), _label(label)
        parent = self._images[idx]
        local = map_box(bbox_2d, self.frame, parent.view_size, (parent.box.width, parent.box.height))
        ox, oy = parent.box.x1, parent.box.y1
        box = Box(ox + local.x1, oy + local.y1, ox + local.x2, oy + local.y2)
        original = self._images[parent.source].image
        view = crop_for_tool(original, box, zoom=self.zoom, max_pixels=self.max_pixels)
        crop_idx = len(self._images)
        self._images.append(ToolImage(view, self._view_size(view), parent.source, box))
        what = f" {' '.join(label.split())[:80]!r}" if label else ""
        text = (f"Zoomed in on{what} at {box.to_json()} of the {original.width}x{original.height} original "
                f"(image {parent.source}); this crop is image {crop_idx}.")
        return ToolOutput(text=text, image=view, artifact={
            "box": box.to_json(), "img_idx": idx, "label": label, "frame": self.frame, "crop_idx": crop_idx,
            "source": parent.source})
