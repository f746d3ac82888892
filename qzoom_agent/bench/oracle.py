"""The oracle view: what an ideal zoom would show the model, used as a reading upper bound.

The target box (known to the benchmark, never to a real agent) with one box size of context on each side,
enlarged 3x and then encoded at <= 256 visual tokens. Training uses the same crop with random context and
enlargement (``train.answer_data``).
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
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    left, top = max(0, round(x1 - margins[0] * w)), max(0, round(y1 - margins[1] * h))
    right, bottom = min(image.width, round(x2 + margins[2] * w)), min(image.height, round(y2 + margins[3] * h))
    crop = image.crop((left, top, right, bottom))
    return resize_to(crop, (max(1, round(crop.width * zoom)), max(1, round(crop.height * zoom))))


def oracle_view(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """The oracle view of ``box`` in ``image`` (encode it with ``max_tokens=ORACLE_TOKENS``)."""
    return zoom_crop(image, box, (ORACLE_MARGIN,) * 4, ORACLE_ZOOM)
