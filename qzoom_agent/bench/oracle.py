"""The oracle view: what an ideal zoom would show the model, used as a reading upper bound.

The target box (known to the benchmark, never to a real agent) with one box size of context on each side,
enlarged 3x and then encoded at <= 256 visual tokens. Training uses the same crop with random context and
enlargement (``recipes.zoomworld_tiny.answer_data``).
"""

from __future__ import annotations

from PIL import Image

from ..images import resize_to

ORACLE_MARGIN = 1.0  # context per side, in target sizes
ORACLE_ZOOM = 3.0  # enlargement of the target over its native size
ORACLE_TOKENS = 256  # token cap of the oracle view


def zoom_crop(image: Image.Image, box: tuple[int, int, int, int], margins: tuple[float, float, float, float],
              zoom: float) -> Image.Image:
    """Crop ``box`` with ``margins`` (left, top, right, bottom, in box sizes) of context and enlarge by ``zoom``.

    The context is clipped at the image border; the result is ``zoom`` times the clipped crop's size.
    """
    crop = image.crop(zoom_window(image.size, box, margins))
    return resize_to(crop, (max(1, round(crop.width * zoom)), max(1, round(crop.height * zoom))))


def zoom_window(size: tuple[int, int], box: tuple[int, int, int, int],
                margins: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    """The source window `zoom_crop` cuts from an image of ``size`` (width, height): ``box`` plus ``margins``
    (left, top, right, bottom, in box sizes), clipped at the border."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    left, top = max(0, round(x1 - margins[0] * w)), max(0, round(y1 - margins[1] * h))
    return left, top, min(size[0], round(x2 + margins[2] * w)), min(size[1], round(y2 + margins[3] * h))


def oracle_view(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """The oracle view of ``box`` in ``image`` (encode it with ``max_tokens=ORACLE_TOKENS``)."""
    return zoom_crop(image, box, (ORACLE_MARGIN,) * 4, ORACLE_ZOOM)
