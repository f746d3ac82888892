"""Safe image loading (every failure is a one-line :class:`ImageLoadError`) and resizing to a visual-token budget."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import threading
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .checks import one_line

logger = logging.getLogger(__name__)

DEFAULT_MAX_IMAGE_PIXELS = 250_000_000
MAX_PIXELS_ENV = "QZOOM_MAX_IMAGE_PIXELS"

# PIL's limits are module globals; we swap them only briefly and under this lock so that concurrent load_image
# calls never restore each other's values.
_PIL_GLOBALS_LOCK = threading.Lock()


class ImageLoadError(ValueError):
    """An image could not be loaded; ``str(err)`` is a single line meant to be shown to the user."""


def max_image_pixels(max_pixels: int | None = None) -> int:
    """Return the pixel limit in force.

    Args:
        max_pixels: An explicit limit; wins over ``$QZOOM_MAX_IMAGE_PIXELS``, which wins over the default.

    Returns:
        The limit, a positive integer.

    Raises:
        ImageLoadError: If the explicit value or the environment variable is not a positive integer.
    """
    source, value = "max_pixels", max_pixels
    if max_pixels is None:
        source, value = MAX_PIXELS_ENV, os.environ.get(MAX_PIXELS_ENV, "").strip()
        if not value:
            return DEFAULT_MAX_IMAGE_PIXELS
    try:
        limit = int(value) if isinstance(value, str) else value
    except ValueError:
        limit = None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise ImageLoadError(f"{source} must be a positive integer, got {one_line(repr(value))}")
    return limit


@contextlib.contextmanager
def _pil_limits(bomb_limit: int | None) -> Iterator[None]:
    """Temporarily make PIL use ``bomb_limit`` (None: off) instead of its ~89/179 MP default and refuse truncation."""
    with _PIL_GLOBALS_LOCK, warnings.catch_warnings():
        # Our limit is enforced explicitly; PIL's "between 1x and 2x the limit" warning is just noise here.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved_limit, saved_truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
        Image.MAX_IMAGE_PIXELS = bomb_limit
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved_limit
            ImageFile.LOAD_TRUNCATED_IMAGES = saved_truncated


def _check_size(size: tuple[int, int], limit: int, label: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"image has zero size ({width}x{height}): {label}")
    pixels = width * height
    if pixels > limit:
        raise ImageLoadError(
            f"image is {width}x{height} = {pixels:,} pixels, over the limit of {limit:,}; "
            f"pass max_pixels=... or set {MAX_PIXELS_ENV} to raise it ({label})"
        )


def _open_source(source: str | os.PathLike | bytes | bytearray, label: str) -> tuple[Image.Image, io.IOBase]:
    """Open lazily (header only) with PIL's bomb check off, so that our own check can name the size.

    PIL gets our own handle rather than the path so that closing it after decoding leaves the pixels usable.
    """
    handle: io.IOBase
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageLoadError("empty image data (0 bytes)")
        handle = io.BytesIO(bytes(source))
    else:
        path = os.path.expanduser(os.fspath(source))
        if not path:
            raise ImageLoadError("empty image path")
        if not os.path.exists(path):
            raise ImageLoadError(f"image not found: {label}")
        if os.path.isdir(path):
            raise ImageLoadError(f"is a directory, not an image file: {label}")
        try:
            if os.path.getsize(path) == 0:
                raise ImageLoadError(f"empty file (0 bytes): {label}")
            handle = open(path, "rb")  # closed by load_image once decoding is done
        except PermissionError:
            raise ImageLoadError(f"cannot read image file (permission denied): {label}") from None
        except OSError as err:
            raise ImageLoadError(f"cannot read image file: {label} ({one_line(err.strerror or err)})") from None
    try:
        with _pil_limits(None):
            return Image.open(handle), handle
    except UnidentifiedImageError:
        handle.close()
        raise ImageLoadError(f"not an image file (unrecognised format): {label}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        # A recognised signature followed by a broken header.
        handle.close()
        raise ImageLoadError(f"truncated or corrupt image file: {label} ({one_line(err)})") from None


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    """Map 16/32-bit integer and float grey images to 8 bits without clipping everything to white.

    ``I;16*``: top 8 bits (``>> 8``, linear 0..65535 -> 0..255). ``I``: PIL readers mostly put 16-bit data here, so
    values within 0..65535 also get ``>> 8``; other ranges cannot be 16-bit and are min-max stretched. ``F``: min-max
    stretched over the finite values, since float data has no fixed range (0..1, metres, ...); NaN becomes black,
    +-inf saturates, and a constant image keeps its value clipped to 0..255.
    """
    data = np.asarray(image)
    if image.mode.startswith("I;16"):
        out = (data.astype(np.uint32) >> 8).astype(np.uint8)
    elif image.mode == "I" and (data.size == 0 or (data.min() >= 0 and data.max() <= 0xFFFF)):
        out = (data.astype(np.int64) >> 8).astype(np.uint8)
    else:
        values = data.astype(np.float64)
        finite = np.isfinite(values)
        if not finite.any():
            out = np.zeros(values.shape, dtype=np.uint8)
        else:
            low, high = float(values[finite].min()), float(values[finite].max())
            nan = np.isnan(values)
            values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
            if high > low:
                values = (values - low) * (255.0 / (high - low))
            out = np.clip(np.rint(values), 0, 255).astype(np.uint8)
            out[nan] = 0
    return Image.fromarray(out, mode="L").convert("RGB")


def _to_rgb(image: Image.Image, label: str) -> Image.Image:
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        return _high_bit_depth_to_rgb(image)
    if image.has_transparency_data:
        # Covers RGBA/LA/PA, premultiplied modes, RGBA palettes and tRNS colour keys on P/L/RGB images.
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise ImageLoadError(f"unsupported image mode {mode!r}: {label} ({one_line(err)})") from None


def _decode(image: Image.Image, limit: int, label: str, *, owned: bool) -> Image.Image:
    """Check the size, take frame 0, decode, apply EXIF orientation, convert to RGB; never alter a caller's image."""
    _check_size(image.size, limit, label)
    multi_frame = getattr(image, "n_frames", 1) > 1
    try:
        with _pil_limits(limit):
            frame = image.tell() if multi_frame else 0
            if frame:
                image.seek(0)
            try:
                # load() is what actually decompresses; with LOAD_TRUNCATED_IMAGES off it raises on short data.
                image.load()
                # Detach frame 0 from the file (owned) or from the caller's frame position (not owned).
                first = image.copy() if multi_frame else image
            finally:
                if frame:
                    image.seek(frame)  # leave a caller's image on the frame it was on
            # Frame 0 of GIF/TIFF/MPO may differ in size from the header values checked above.
            _check_size(first.size, limit, label)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError:
        msg = f"image frame is over the limit of {limit:,} pixels; pass max_pixels=... or set {MAX_PIXELS_ENV}"
        raise ImageLoadError(f"{msg} to raise it ({label})") from None
    except MemoryError:
        raise ImageLoadError(f"not enough memory to decode {image.width}x{image.height} image: {label}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as err:
        raise ImageLoadError(f"truncated or corrupt image file: {label} ({one_line(err)})") from None

    in_place = owned or first is not image
    try:
        if in_place:
            ImageOps.exif_transpose(first, in_place=True)
            oriented = first
        else:
            oriented = ImageOps.exif_transpose(first)  # a copy even when there is nothing to rotate
    except Exception as err:  # a broken EXIF block must not make a decodable image unusable
        logger.warning("ignoring unreadable EXIF orientation in %s: %s", label, one_line(err))
        oriented = first if in_place else first.copy()
    return _to_rgb(oriented, label)


def load_image(source: str | os.PathLike | bytes | Image.Image, *, max_pixels: int | None = None) -> Image.Image:
    """Load an image fully into memory as an RGB ``PIL.Image.Image``.

    Args:
        source: A filesystem path, the encoded file contents, or an existing PIL image (never mutated; the result
            is always a new object).
        max_pixels: Largest accepted ``width * height``. Defaults to ``$QZOOM_MAX_IMAGE_PIXELS`` or
            :data:`DEFAULT_MAX_IMAGE_PIXELS`. Checked from the header, before any pixel data is decoded.

    Returns:
        A fully decoded image in mode ``"RGB"``: first frame of animated/multi-frame files, EXIF orientation applied,
        transparency composited over white, 16-bit and float data scaled to 8 bits.

    Raises:
        ImageLoadError: For any unusable input (missing, empty, non-image, corrupt, over the limit), in one line.
        TypeError: If ``source`` is of an unsupported type.
    """
    limit = max_image_pixels(max_pixels)
    if isinstance(source, Image.Image):
        return _decode(source, limit, "<PIL image>", owned=False)
    if isinstance(source, (bytes, bytearray)):
        label = f"<{len(source)} bytes>"
    elif isinstance(source, (str, os.PathLike)):
        label = one_line(os.fspath(source))
    else:
        raise TypeError(f"load_image expects a path, bytes or PIL.Image.Image, got {type(source).__name__}")
    image, handle = _open_source(source, label)
    try:
        return _decode(image, limit, label, owned=True)
    finally:
        handle.close()


def _aspect_ok(a: int, b: int, max_aspect: float) -> bool:
    return max(a, b) <= max_aspect * min(a, b)


def _closest_grid(rows: float, cols: float, min_tokens: int, max_tokens: int, max_aspect: float) -> tuple[int, int]:
    """Search the grid nearest (summed log error per side) to the ideal ``rows x cols`` one, within the budget.

    ``max_tokens`` and the aspect clamp are hard; the smallest ``min_tokens`` shortfall wins first, so ``min_tokens``
    is met whenever any grid can meet it. ``r <= sqrt(max_tokens * max_aspect)`` bounds the loop (~1,800 steps).
    """
    max_aspect = min(max_aspect, float(max_tokens))  # no grid within the budget is thinner; keeps floats finite
    area = rows * cols
    scale = math.sqrt(min(max(area, min_tokens), max_tokens) / area)
    ideal_r, ideal_c = rows * scale, cols * scale
    best: tuple[int, int] = (1, 1)
    best_key = (math.inf, math.inf)
    r_max = min(max_tokens, math.isqrt(int(max_tokens * max_aspect)) + 1)
    for r in range(1, r_max + 1):
        lo = max(1, math.ceil(r / max_aspect))
        hi = min(max_tokens // r, math.floor(r * max_aspect))
        if lo > hi:
            continue
        need = max(lo, -(-min_tokens // r))
        candidates = (hi,) if need > hi else {min(max(c, need), hi) for c in (math.floor(ideal_c), math.ceil(ideal_c))}
        for c in candidates:
            if not _aspect_ok(r, c, max_aspect):
                continue
            key = (max(0, min_tokens - r * c), abs(math.log(r / ideal_r)) + abs(math.log(c / ideal_c)))
            if key < best_key:
                best, best_key = (r, c), key
    return best


def fit_to_token_budget(
    width: int, height: int, *, factor: int, min_tokens: int, max_tokens: int, max_aspect: float = 200.0
) -> tuple[int, int]:
    """Choose an output size whose ``factor``-pixel token grid fits a visual-token budget.

    First tries exactly Qwen's ``smart_resize`` rounding (sides rounded to multiples of ``factor``; floor-scaled down
    if over budget, ceil-scaled up if under) on the input with its aspect ratio clamped to ``max_aspect``; if that
    breaks a guarantee (its ceil step can overshoot a tight budget), the nearest valid grid is searched for.
    With ``tokens = (new_width // factor) * (new_height // factor)``:

    * both sides are positive multiples of ``factor``; ``tokens <= max_tokens`` always;
    * the output aspect ratio is at most ``max_aspect`` always: a 1x5000 strip is stretched along its thin side
      (to ``(28, 5012)`` for 4..1280 tokens of 28 px) instead of raising like ``smart_resize``;
    * ``tokens >= min_tokens`` whenever any grid meets the two rules above (at aspect 200 only odd budgets such as
      ``min_tokens == max_tokens == 211``, a prime, cannot; then the largest grid under it is used);
    * if ``tokens >= min_tokens`` and the aspect is at most 200, the result is a fixed point of ``smart_resize``
      with ``min_pixels=min_tokens * factor**2``, ``max_pixels=max_tokens * factor**2`` (the Qwen processor will not
      resize it again), and when ``smart_resize(height, width)`` itself meets every rule the result equals it.

    Args:
        width: Input width in pixels.
        height: Input height in pixels.
        factor: Pixels per visual token side (28 for Qwen2.5-VL, 32 for Qwen3-VL).
        min_tokens: Lower bound on the token count.
        max_tokens: Upper bound on the token count.
        max_aspect: Largest allowed long/short side ratio of the output (at least 1).

    Returns:
        ``(new_width, new_height)``.

    Raises:
        ValueError: If any size, factor or budget is not positive, ``min_tokens > max_tokens`` or ``max_aspect < 1``.
    """
    named = {"width": width, "height": height, "factor": factor, "min_tokens": min_tokens, "max_tokens": max_tokens}
    for name, value in named.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if min_tokens > max_tokens:
        raise ValueError(f"min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens})")
    if not max_aspect >= 1:
        raise ValueError(f"max_aspect must be >= 1, got {max_aspect!r}")

    # Clamp the aspect ratio first by widening the thin side; ints are kept when no clamp is needed so the
    # arithmetic below matches smart_resize bit for bit.
    h: float = height
    w: float = width
    if w > max_aspect * h:
        h = w / max_aspect
    elif h > max_aspect * w:
        w = h / max_aspect

    min_pixels, max_pixels = min_tokens * factor * factor, max_tokens * factor * factor
    h_bar = round(h / factor) * factor
    w_bar = round(w / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((h * w) / max_pixels)
        h_bar = max(factor, math.floor(h / beta / factor) * factor)
        w_bar = max(factor, math.floor(w / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        h_bar = math.ceil(h * beta / factor) * factor
        w_bar = math.ceil(w * beta / factor) * factor

    rows, cols = h_bar // factor, w_bar // factor
    if rows >= 1 and cols >= 1 and min_tokens <= rows * cols <= max_tokens and _aspect_ok(rows, cols, max_aspect):
        return w_bar, h_bar
    rows, cols = _closest_grid(h / factor, w / factor, min_tokens, max_tokens, max_aspect)
    logger.debug(
        "smart_resize rounding gave %dx%d for %dx%d; using %dx%d tokens", w_bar, h_bar, width, height, cols, rows
    )
    return cols * factor, rows * factor


def resize_to(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize ``image`` to ``size`` = ``(width, height)`` with bicubic resampling.

    BICUBIC matches the Qwen image processors, and PIL widens its kernel when downscaling, so big reductions stay
    anti-aliased without LANCZOS. ``reducing_gap=3`` adds a cheap box pre-reduction for large downscales
    (e.g. 42 MP -> 1 MP) that PIL documents as close to exact resampling at that gap.

    Args:
        image: The image to resize.
        size: Target ``(width, height)``, both positive.

    Returns:
        ``image`` itself when it already has that size, otherwise a new image.

    Raises:
        ValueError: If a target side is not a positive integer.
    """
    width, height = size
    if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in (width, height)):
        raise ValueError(f"size must be two positive integers, got {size!r}")
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=3.0)
