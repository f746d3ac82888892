"""Tests for qzoom_agent.images: safe loading, mode conversion and token-budget sizing."""

from __future__ import annotations

import io
import math
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from qzoom_agent.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageLoadError,
    fit_to_token_budget,
    load_image,
    resize_to,
)

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def _noise(width: int, height: int) -> Image.Image:
    """Noise so that compressed files are large enough to cut in the middle of the pixel data."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _close(actual, expected, tol: int = 12) -> bool:
    return all(abs(int(a) - int(e)) <= tol for a, e in zip(actual, expected, strict=True))


def _row(image: Image.Image) -> list:
    return [image.getpixel((x, 0)) for x in range(image.width)]


def _load_error(source, **kwargs) -> str:
    with pytest.raises(ImageLoadError) as info:
        load_image(source, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message and message
    return message


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height 8-bit grey pixels while carrying only one row of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1))
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


# --------------------------------------------------------------------------------------------- bad inputs


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncated(tmp_path: Path, fmt: str) -> Path:
    data = io.BytesIO()
    _noise(256, 256).save(data, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    return path


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda tmp: _write(tmp / "empty.png", b""), "empty file"),
        (lambda tmp: _truncated(tmp, "PNG"), "truncated or corrupt"),
        (lambda tmp: _truncated(tmp, "JPEG"), "truncated or corrupt"),
        (lambda tmp: _write(tmp / "notes.txt", b"hello, not pixels\n"), "not an image file"),
        (lambda tmp: tmp / "missing.png", "image not found"),
        (lambda tmp: tmp, "directory"),
    ],
    ids=["empty", "truncated-png", "truncated-jpeg", "text", "missing", "directory"],
)
def test_bad_files_raise_one_line_error(tmp_path, make, words):
    path = make(tmp_path)
    message = _load_error(path)
    assert words in message
    assert str(path) in message
    assert isinstance(ImageLoadError(message), ValueError)


def test_empty_bytes_and_bad_type():
    assert "empty" in _load_error(b"")
    assert "not an image file" in _load_error(b"GIF89 but not really")
    with pytest.raises(TypeError):
        load_image(12345)  # type: ignore[arg-type]


def test_truncation_detected_even_if_pil_is_set_to_tolerate_it(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert "truncated" in _load_error(_truncated(tmp_path, "JPEG"))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored, not left changed


# --------------------------------------------------------------------------------------------- pixel limit


def test_bomb_header_rejected_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_bomb_png(30000, 30000))
    assert path.stat().st_size < 1000
    saved = Image.MAX_IMAGE_PIXELS
    start = time.perf_counter()
    message = _load_error(path)
    assert time.perf_counter() - start < 0.5
    assert "30000x30000" in message and "900,000,000" in message
    assert f"{DEFAULT_MAX_IMAGE_PIXELS:,}" in message
    assert "QZOOM_MAX_IMAGE_PIXELS" in message and "max_pixels" in message
    assert Image.MAX_IMAGE_PIXELS == saved
    # The same header as bytes, and with a lower explicit limit.
    assert "limit of 1,000" in _load_error(_bomb_png(30000, 30000), max_pixels=1000)


def test_max_pixels_argument_raises_or_lowers_the_limit(tmp_path):
    path = _save(Image.new("RGB", (3000, 3000), BLUE), tmp_path / "big.png")
    image = load_image(path, max_pixels=10_000_000)
    assert image.size == (3000, 3000) and image.mode == "RGB"
    assert "9,000,000" in _load_error(path, max_pixels=1_000_000)
    assert "max_pixels" in _load_error(path, max_pixels=0)


def test_env_var_overrides_default(tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (100, 100)), tmp_path / "small.png")
    monkeypatch.setenv("QZOOM_MAX_IMAGE_PIXELS", "9999")
    assert "limit of 9,999" in _load_error(path)
    assert load_image(path, max_pixels=10_000).size == (100, 100)  # explicit argument wins
    monkeypatch.setenv("QZOOM_MAX_IMAGE_PIXELS", "lots")
    assert "QZOOM_MAX_IMAGE_PIXELS" in _load_error(path)


def test_our_limit_replaces_pils_own(tmp_path, monkeypatch):
    # PIL errors above 2 * MAX_IMAGE_PIXELS; with it set tiny, only our (default) limit may decide.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    path = _save(Image.new("RGB", (200, 300), GREEN), tmp_path / "ok.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path).size == (200, 300)
    assert Image.MAX_IMAGE_PIXELS == 100


# --------------------------------------------------------------------------------------------- modes and formats


@pytest.mark.parametrize("size", [(1, 5000), (5000, 1)])
def test_extreme_strips_load_and_fit(tmp_path, size):
    image = load_image(_save(Image.new("L", size, 200), tmp_path / "strip.png"))
    assert image.mode == "RGB" and image.size == size
    for factor in (28, 32):
        for low, high in [(4, 1280), (1, 1), (256, 256), (1, 16384), (64, 100)]:
            new_w, new_h = fit_to_token_budget(*image.size, factor=factor, min_tokens=low, max_tokens=high)
            tokens = (new_w // factor) * (new_h // factor)
            assert new_w % factor == 0 and new_h % factor == 0 and new_w > 0 and new_h > 0
            assert low <= tokens <= high
            assert max(new_w, new_h) <= 200 * min(new_w, new_h)
            # The long side never becomes the short one.
            assert (new_w <= new_h) if size[0] < size[1] else (new_w >= new_h)
            assert resize_to(image, (new_w, new_h)).size == (new_w, new_h)


def test_16bit_gray_gradient_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 512).astype(np.uint16), (4, 1))
    path = _save(Image.fromarray(ramp), tmp_path / "deep.png")
    with Image.open(path) as raw:
        assert raw.mode == "I;16"
    row = np.asarray(load_image(path))[0, :, 0].astype(int)
    assert np.all(np.diff(row) >= 0)
    assert row.min() <= 2 and row.max() >= 253
    assert len(np.unique(row)) > 200


def test_32bit_int_and_float_images(tmp_path):
    ints = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32))
    assert ints.mode == "I"
    assert np.asarray(load_image(ints))[0, :, 0].tolist() == [0, 128, 255]
    floats = Image.fromarray(np.array([[0.0, 0.25, 1.0, np.nan]], dtype=np.float32))
    assert floats.mode == "F"
    assert np.asarray(load_image(floats))[0, :, 0].tolist() == [0, 64, 255, 0]  # min-max stretch, NaN black


def test_cmyk_jpeg(tmp_path):
    path = _save(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    image = load_image(path)
    assert image.mode == "RGB" and _close(image.getpixel((16, 16)), RED)


def test_palette_png_with_transparency(tmp_path):
    image = Image.new("P", (20, 10), 1)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(0, (0, 0, 10, 10))
    path = _save(image, tmp_path / "pal.png", transparency=0)
    with Image.open(path) as raw:
        assert raw.mode == "P"
    loaded = load_image(path)
    assert loaded.getpixel((2, 2)) == WHITE and loaded.getpixel((15, 5)) == BLUE


def test_rgba_la_pa_composite_over_white(tmp_path):
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(0, 0, 0, 0), (255, 0, 0, 255), (255, 0, 0, 128)])
    pixels = _row(load_image(_save(rgba, tmp_path / "a.png")))
    assert pixels[0] == WHITE and pixels[1] == RED and _close(pixels[2], (255, 127, 127), tol=2)

    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (0, 255)])
    assert _row(load_image(_save(la, tmp_path / "la.png"))) == [WHITE, BLACK]

    pa = Image.new("P", (2, 1), 1)
    pa.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pa = pa.convert("PA")
    pa.putalpha(Image.frombytes("L", (2, 1), b"\x00\xff"))
    assert pa.mode == "PA"
    assert _row(load_image(pa)) == [WHITE, GREEN]


def test_bilevel_and_grey(tmp_path):
    bilevel = Image.new("1", (8, 8), 0)
    bilevel.paste(1, (0, 0, 4, 8))
    loaded = load_image(_save(bilevel, tmp_path / "one.png"))
    assert loaded.mode == "RGB" and loaded.getpixel((1, 1)) == WHITE and loaded.getpixel((6, 1)) == BLACK
    assert load_image(Image.new("L", (2, 2), 77)).getpixel((0, 0)) == (77, 77, 77)


def test_exif_orientation_applied(tmp_path):
    image = Image.new("RGB", (80, 40), BLACK)
    image.paste(RED, (0, 0, 16, 16))  # stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    path = _save(image, tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    loaded = load_image(path)
    assert loaded.size == (40, 80)
    assert _close(loaded.getpixel((40 - 8, 8)), RED)  # now top-right
    assert _close(loaded.getpixel((8, 8)), BLACK)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animation_returns_first_frame(tmp_path, fmt):
    frames = [Image.new("RGB", (24, 16), colour) for colour in (RED, GREEN, BLUE)]
    path = tmp_path / f"anim.{fmt.lower()}"
    extra = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:], duration=50, loop=0, **extra)
    with Image.open(path) as raw:
        assert raw.n_frames == 3
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (24, 16)
    assert _close(loaded.getpixel((12, 8)), RED, tol=4)


def test_multiframe_tiff_first_frame(tmp_path):
    frames = [Image.new("RGB", (10 + i, 10), colour) for i, colour in enumerate((GREEN, RED))]
    path = tmp_path / "pages.tif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with Image.open(path) as raw:
        assert raw.n_frames == 2
    loaded = load_image(path)
    assert loaded.size == (10, 10) and loaded.getpixel((5, 5)) == GREEN


# --------------------------------------------------------------------------------------------- input kinds


def test_pil_input_is_not_mutated():
    original = Image.new("RGBA", (4, 4), (0, 0, 255, 0))
    loaded = load_image(original)
    assert loaded is not original and loaded.mode == "RGB" and loaded.getpixel((0, 0)) == WHITE
    assert original.mode == "RGBA" and original.getpixel((0, 0)) == (0, 0, 255, 0)
    rgb = Image.new("RGB", (4, 4), RED)
    assert load_image(rgb) is not rgb


def test_pil_multiframe_input_keeps_its_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (8, 8), colour) for colour in (RED, GREEN, BLUE)]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with Image.open(path) as animated:
        animated.seek(2)
        loaded = load_image(animated)
        assert animated.tell() == 2
    assert _close(loaded.getpixel((4, 4)), RED, tol=4)


def test_bytes_and_str_inputs(tmp_path):
    path = _save(Image.new("RGB", (7, 5), GREEN), tmp_path / "g.png")
    for source in (path.read_bytes(), bytearray(path.read_bytes()), str(path), path):
        image = load_image(source)
        assert image.size == (7, 5) and image.getpixel((3, 3)) == GREEN


def test_resize_to():
    image = Image.new("RGB", (56, 28), RED)
    assert resize_to(image, (56, 28)) is image
    resized = resize_to(image, (28, 84))
    assert resized.size == (28, 84) and _close(resized.getpixel((10, 40)), RED, tol=1)
    with pytest.raises(ValueError):
        resize_to(image, (0, 28))


# --------------------------------------------------------------------------------------------- token budget


def test_fit_matches_known_values_and_validates():
    # Qwen2.5-VL defaults: 4..16384 tokens of 28 px; the 42 MP photo is scaled down, aspect kept.
    assert fit_to_token_budget(8064, 5241, factor=28, min_tokens=4, max_tokens=16384) == (4424, 2884)
    assert fit_to_token_budget(1, 5000, factor=28, min_tokens=4, max_tokens=1280) == (28, 5012)
    # Already a fixed point: unchanged.
    assert fit_to_token_budget(280, 560, factor=28, min_tokens=4, max_tokens=1280) == (280, 560)
    for bad in (
        dict(width=0, height=5, factor=28, min_tokens=1, max_tokens=2),
        dict(width=5, height=5, factor=0, min_tokens=1, max_tokens=2),
        dict(width=5, height=5, factor=28, min_tokens=0, max_tokens=2),
        dict(width=5, height=5, factor=28, min_tokens=3, max_tokens=2),
        dict(width=5, height=5, factor=28, min_tokens=1, max_tokens=2, max_aspect=0.5),
    ):
        with pytest.raises(ValueError):
            fit_to_token_budget(**bad)


def test_fit_when_min_tokens_cannot_be_met():
    # 211 is prime: the only 211-token grid is 1x211, beyond the aspect clamp; stay under max and inside the clamp.
    new_w, new_h = fit_to_token_budget(1000, 1000, factor=28, min_tokens=211, max_tokens=211)
    tokens = (new_w // 28) * (new_h // 28)
    assert tokens == 210 and max(new_w, new_h) <= 200 * min(new_w, new_h)


def _min_feasible(min_tokens: int, max_tokens: int, max_aspect: float) -> bool:
    for short in range(1, math.isqrt(max_tokens) + 1):
        longest = min(max_tokens // short, math.floor(short * max_aspect))
        if longest >= max(short, min_tokens / short):
            return True
    return False


@st.composite
def _budgets(draw):
    factor = draw(st.sampled_from([28, 32]))
    width = draw(st.integers(1, 20000))
    height = draw(st.integers(1, 20000))
    max_tokens = draw(st.integers(1, 16384))
    min_tokens = draw(st.one_of(st.integers(1, max_tokens), st.integers(max(1, max_tokens - 3), max_tokens)))
    return factor, width, height, min_tokens, max_tokens


@settings(max_examples=200, deadline=None)
@given(_budgets())
def test_fit_properties(case):
    factor, width, height, min_tokens, max_tokens = case
    new_w, new_h = fit_to_token_budget(width, height, factor=factor, min_tokens=min_tokens, max_tokens=max_tokens)
    assert new_w > 0 and new_h > 0 and new_w % factor == 0 and new_h % factor == 0
    tokens = (new_w // factor) * (new_h // factor)
    assert tokens <= max_tokens
    aspect = max(new_w, new_h) / min(new_w, new_h)
    assert aspect <= 200
    if _min_feasible(min_tokens, max_tokens, 200.0):
        assert tokens >= min_tokens
    bounds = dict(factor=factor, min_pixels=min_tokens * factor**2, max_pixels=max_tokens * factor**2)
    if tokens >= min_tokens and aspect < 200:
        assert smart_resize(new_h, new_w, **bounds) == (new_h, new_w)
    # When Qwen's own answer already meets every guarantee, it is the answer.
    if max(width, height) <= 200 * min(width, height):
        qwen_h, qwen_w = smart_resize(height, width, **bounds)
        qwen_tokens = (qwen_h // factor) * (qwen_w // factor)
        if (
            qwen_h
            and qwen_w
            and min_tokens <= qwen_tokens <= max_tokens
            and max(qwen_h, qwen_w) <= 200 * min(qwen_h, qwen_w)
        ):
            assert (new_w, new_h) == (qwen_w, qwen_h)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 20000), st.integers(1, 20000), st.floats(1.0, 500.0), st.sampled_from([28, 32]))
def test_fit_respects_custom_max_aspect(width, height, max_aspect, factor):
    new_w, new_h = fit_to_token_budget(
        width, height, factor=factor, min_tokens=4, max_tokens=4096, max_aspect=max_aspect
    )
    assert max(new_w, new_h) <= max_aspect * min(new_w, new_h)
    tokens = (new_w // factor) * (new_h // factor)
    assert tokens <= 4096
    assert tokens >= 4 or not _min_feasible(4, 4096, max_aspect)


# --------------------------------------------------------------------------------------------- real images

_REAL_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".tif", ".tiff"}


def test_real_images_load(real_data):
    paths = sorted(p for p in real_data.rglob("*") if p.is_file() and p.suffix.lower() in _REAL_SUFFIXES)
    assert len(paths) >= 10
    for path in paths:
        image = load_image(path)
        assert image.mode == "RGB" and image.width > 0 and image.height > 0, path
    photo = load_image(real_data / "hrbench" / "dc2_demo.jpg")
    assert sorted(photo.size) == [5241, 8064]
    assert photo.width * photo.height < DEFAULT_MAX_IMAGE_PIXELS
