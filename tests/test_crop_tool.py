"""The external-crop tool's mapping core (tools.crop.map_box) and `ImageZoomInTool`: every frame maps inside the
image, monotonically, round trips within a pixel, crops of crops stay inside their parent, and every bad argument
is a one-line error (a ToolCallError from the core, an error ToolOutput from the tool), never another exception."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from qzoom_agent.tools.crop import (
    FRAMES,
    MAX_CROP_ASPECT,
    MIN_CROP_SIDE,
    ZOOM_TOOL,
    ImageZoomInTool,
    ToolCallError,
    map_box,
    source_to_frame,
    zoom_tool_schema,
)
from qzoom_agent.tools.deepeyes import ToolCallError as DeepEyesToolCallError
from qzoom_agent.tools.deepeyes import parse_zoom_call, to_source_box
from qzoom_agent.tools.output import ToolOutput

from qzoom_agent.boxes import Box

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
sizes = st.tuples(st.integers(1, 5000), st.integers(1, 5000))
frames = st.sampled_from(FRAMES)


def _extent(frame: str, view: tuple[int, int]) -> tuple[int, int]:
    return {"absolute": view, "norm1000": (1000, 1000), "norm1": (1, 1)}[frame]


@st.composite
def framed_boxes(draw, inside: bool = False):
    """(frame, view, source, bbox): a box with x1 < x2, y1 < y2 in the frame, inside its extent when ``inside``."""
    frame, view, source = draw(frames), draw(sizes), draw(sizes)
    fw, fh = _extent(frame, view)
    lo, hi = (0.0, 1.0) if inside else (-0.5, 1.5)
    xs = sorted(draw(st.lists(st.floats(lo, hi), min_size=2, max_size=2, unique=True)))
    ys = sorted(draw(st.lists(st.floats(lo, hi), min_size=2, max_size=2, unique=True)))
    bbox = (xs[0] * fw, ys[0] * fh, xs[1] * fw, ys[1] * fh)
    if not (bbox[0] < bbox[2] and bbox[1] < bbox[3]):  # products of tiny distinct floats can collapse
        bbox = (bbox[0], bbox[1], bbox[0] + fw * 1e-3, bbox[1] + fh * 1e-3)
    return frame, view, source, bbox


def _inside(inner: Box, outer: Box) -> bool:
    return outer.x1 <= inner.x1 and outer.y1 <= inner.y1 and inner.x2 <= outer.x2 and inner.y2 <= outer.y2


# ---- the mapping core: properties ----

@SETTINGS
@given(framed_boxes())
def test_every_frame_maps_inside_the_image_with_sides_of_at_least_one_pixel(case):
    frame, view, (sw, sh), bbox = case
    fw, fh = _extent(frame, view)
    outside = bbox[2] <= 0 or bbox[3] <= 0 or bbox[0] >= fw or bbox[1] >= fh
    if outside:
        with pytest.raises(ToolCallError, match="outside"):
            map_box(bbox, frame, view, (sw, sh))
        return
    box = map_box(bbox, frame, view, (sw, sh))
    assert 0 <= box.x1 < box.x2 <= sw and 0 <= box.y1 < box.y2 <= sh
    # rounded outward: the box covers the part of the policy's box that lies on the image
    assert box.x1 <= max(0.0, bbox[0]) * sw / fw + 1e-6 and box.x2 >= min(fw, bbox[2]) * sw / fw - 1e-6
    assert box.y1 <= max(0.0, bbox[1]) * sh / fh + 1e-6 and box.y2 >= min(fh, bbox[3]) * sh / fh - 1e-6


@SETTINGS
@given(framed_boxes(inside=True), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1))
def test_the_mapping_is_monotone_a_box_inside_another_maps_inside_its_image(case, a, b, c, d):
    frame, view, source, outer = case
    x1, y1, x2, y2 = outer
    ix1, ix2 = sorted((x1 + a * (x2 - x1), x1 + b * (x2 - x1)))
    iy1, iy2 = sorted((y1 + c * (y2 - y1), y1 + d * (y2 - y1)))
    if not (ix1 < ix2 and iy1 < iy2):
        return
    assert _inside(map_box((ix1, iy1, ix2, iy2), frame, view, source), map_box(outer, frame, view, source))
    # and moving a corner right never moves the mapped corner left
    assert map_box((ix1, iy1, x2, y2), frame, view, source).x1 >= map_box(outer, frame, view, source).x1


@SETTINGS
@given(frames, sizes, sizes, st.data())
def test_a_source_box_round_trips_through_every_frame_within_a_pixel(frame, view, source, data):
    sw, sh = source
    x1 = data.draw(st.integers(0, sw - 1))
    y1 = data.draw(st.integers(0, sh - 1))
    box = Box(x1, y1, data.draw(st.integers(x1 + 1, sw)), data.draw(st.integers(y1 + 1, sh)))
    back = map_box(source_to_frame(box, frame, view, source), frame, view, source)
    assert _inside(box, back)
    assert max(box.x1 - back.x1, box.y1 - back.y1, back.x2 - box.x2, back.y2 - box.y2) <= 1


def test_frames_map_exactly_where_floats_would_drift():
    # 600 / 1000 of 4060 px is exactly 2436 and 0.4 of 2000 px exactly 800; float products land a pixel off
    assert map_box((97, 600, 467, 878.47), "norm1000", (1, 1), (1733, 4060)).y1 == 2436
    assert map_box((0.2, 0.2, 0.4, 0.4), "norm1", (1, 1), (2000, 1000)).as_tuple() == (400, 200, 800, 400)
    assert map_box((100, 50, 200, 100), "absolute", (500, 250), (2000, 1000)).as_tuple() == (400, 200, 800, 400)


def test_huge_finite_values_clip_instead_of_overflowing():
    # 1.7e308 * 4 is inf in floats; the box still means "to the far edge"
    assert map_box((0, 0, 1.7e308, 1.7e308), "absolute", (500, 250), (2000, 1000)).as_tuple() == (0, 0, 2000, 1000)
    assert to_source_box((-1e300, 0, 10**20, 1), "norm1", (1, 1), (640, 480)) == (0, 0, 640, 480)


# ---- the mapping core: every bad input is a ToolCallError ----

BAD_BOXES = [
    ("a string", "[0, 0, 10, 10]", "four numbers"),
    ("a string element", ["a", 0, 10, 10], "four numbers"),
    ("None", None, "four numbers"),
    ("a dict", {"x1": 0}, "four numbers"),
    ("nested lists", [[0], [0], [9], [9]], "four numbers"),
    ("a bool", [True, 0, 10, 10], "four numbers"),
    ("NaN", [0, 0, math.nan, 10], "finite"),
    ("+inf", [0, 0, math.inf, 10], "finite"),
    ("-inf", [-math.inf, 0, 10, 10], "finite"),
    ("a 400-digit int", [0, 0, 10**400, 10], "finite"),
    ("a negative 400-digit int", [-(10**400), 0, 10, 10], "finite"),
    ("an int past str()'s digit limit", [0, 0, 10**5000, 10], "finite"),
    ("three numbers", [0, 0, 10], "four numbers"),
    ("five numbers", [0, 0, 10, 10, 10], "four numbers"),
    ("no numbers", [], "four numbers"),
    ("inverted", [50, 50, 10, 10], "x1 < x2"),
    ("inverted in y", [10, 50, 50, 10], "x1 < x2"),
    ("zero width", [10, 10, 10, 50], "x1 < x2"),
    ("zero height", [10, 10, 50, 10], "x1 < x2"),
    ("right of the image", [600, 10, 700, 20], "outside"),
    ("above the image", [-100, -100, -1, -1], "outside"),
    ("ending at the left edge", [-10, 10, 0, 20], "outside"),
]


@pytest.mark.parametrize("what, bbox, match", BAD_BOXES, ids=[b[0] for b in BAD_BOXES])
def test_bad_boxes_raise_only_a_one_line_tool_call_error(what, bbox, match):
    with pytest.raises(ToolCallError, match=match) as info:
        map_box(bbox, "absolute", (500, 250), (2000, 1000))
    assert type(info.value) is ToolCallError and "\n" not in str(info.value) and len(str(info.value)) < 200


@pytest.mark.parametrize("frame, view, source", [("pixels", (5, 5), (5, 5)), ("absolute", (0, 5), (5, 5)),
                                                 ("absolute", (5, 5), (5, -1)), ("norm1", None, (True, 5))])
def test_bad_frames_and_sizes_are_tool_call_errors_too(frame, view, source):
    with pytest.raises(ToolCallError):
        map_box([0, 0, 1, 1], frame, view, source)


def test_deepeyes_uses_the_same_error_class_and_never_overflows():
    assert DeepEyesToolCallError is ToolCallError
    call = '<tool_call>{{"name": "{}", "arguments": {{"bbox_2d": {}}}}}</tool_call>'
    for bbox in ("[1e999, 0, 10, 10]", f"[0, 0, {'9' * 400}, 10]", "[0, 0, -1e999, 10]"):
        with pytest.raises(ToolCallError, match="finite"):
            parse_zoom_call(call.format(ZOOM_TOOL, bbox))
    for text in (call.format(ZOOM_TOOL, f"[0, 0, {'9' * 5000}, 10]"), "<tool_call>" + "[" * 100_000):
        with pytest.raises(ToolCallError, match="not valid JSON"):
            parse_zoom_call(text)
    with pytest.raises(ToolCallError, match="finite"):
        to_source_box((0, 0, 10**400, 10), "absolute", (500, 250), (2000, 1000))


# ---- the tool ----

def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_the_tool_crops_the_original_and_crops_of_crops_map_back_to_it():
    original = _noise(2000, 1000)
    tool = ImageZoomInTool(original, [(500, 250)], "absolute")
    out = tool([100, 50, 200, 100], label="the tag")
    assert not out.is_error and out.artifact == {"box": [400, 200, 800, 400], "img_idx": 0, "label": "the tag",
                                                 "frame": "absolute", "crop_idx": 1, "source": 0}
    assert np.array_equal(np.asarray(out.image), np.asarray(original.crop((400, 200, 800, 400))))
    assert "\n" not in out.text and "[400, 200, 800, 400]" in out.text and "image 1" in out.text
    # the crop is image 1, seen at its own 400x200: its pixels 100..300 are the original's 500..700
    again = tool([100, 50, 300, 150], img_idx=1)
    assert again.artifact["box"] == [500, 250, 700, 350] and again.artifact["crop_idx"] == 2
    assert np.array_equal(np.asarray(again.image), np.asarray(original.crop((500, 250, 700, 350))))
    assert [im.box.as_tuple() for im in tool.images] == [(0, 0, 2000, 1000), (400, 200, 800, 400),
                                                         (500, 250, 700, 350)]


def test_relative_frames_and_enlarged_crops_use_each_images_own_region():
    tool = ImageZoomInTool(_noise(1000, 800), frame="norm1000", zoom=2.0, max_pixels=1_000_000,
                           view_size_of=lambda im: (im.width // 2, im.height // 2))
    first = tool([250, 250, 750, 750])
    assert first.artifact["box"] == [250, 200, 750, 600] and first.image.size == (1000, 800)
    assert tool.images[1].view_size == (500, 400)  # what view_size_of said the policy sees
    second = tool([0, 500, 500, 1000], img_idx=1)  # the lower-left quarter of the crop, in the crop's 0-1000
    assert second.artifact["box"] == [250, 400, 500, 600]
    capped = tool([0, 0, 1000, 1000])
    assert capped.image.width * capped.image.height <= 1_000_000 * 1.01  # zoom stops at max_pixels


def test_several_originals_each_have_their_own_frame():
    tool = ImageZoomInTool([_noise(400, 400), _noise(800, 200, seed=1)], frame="norm1")
    assert tool.add_image(_noise(100, 100, seed=2)) == 2
    out = tool([0.5, 0, 1, 1], img_idx=1)
    assert out.artifact["box"] == [400, 0, 800, 200] and out.artifact["source"] == 1 and out.artifact["crop_idx"] == 3
    assert tool.images[3].source == 1


@st.composite
def relative_boxes(draw):
    xs = sorted(draw(st.lists(st.floats(-0.2, 1.2), min_size=2, max_size=2, unique=True)))
    ys = sorted(draw(st.lists(st.floats(-0.2, 1.2), min_size=2, max_size=2, unique=True)))
    return [xs[0], ys[0], xs[1], ys[1]]


@SETTINGS
@given(st.tuples(st.integers(40, 700), st.integers(40, 700)), st.lists(relative_boxes(), min_size=1, max_size=4),
       st.data())
def test_crops_of_crops_land_inside_their_parent_in_original_pixels(size, calls, data):
    tool = ImageZoomInTool(Image.new("RGB", size), frame="norm1", max_pixels=20_000)
    for bbox in calls:
        idx = data.draw(st.integers(0, len(tool.images) - 1))
        parent = tool.images[idx].box
        out = tool(bbox, img_idx=idx)
        if out.is_error:
            assert "\n" not in out.text and out.text and out.image is None
            continue
        box = Box(*out.artifact["box"])
        assert _inside(box, parent) and tool.images[-1].box == box and tool.images[-1].source == 0
        assert min(box.width, box.height) > MIN_CROP_SIDE


BAD_CALLS = [
    ("a string bbox", {"bbox_2d": "[0, 0, 100, 100]"}, "four numbers"),
    ("JSON-like garbage", {"bbox_2d": {"x1": 0, "y1": [None]}}, "four numbers"),
    ("None bbox", {"bbox_2d": None}, "four numbers"),
    ("string coordinates", {"bbox_2d": ["0", "0", "100", "100"]}, "four numbers"),
    ("a bool coordinate", {"bbox_2d": [0, False, 100, 100]}, "four numbers"),
    ("NaN", {"bbox_2d": [0, 0, math.nan, 100]}, "finite"),
    ("+inf", {"bbox_2d": [0, 0, math.inf, 100]}, "finite"),
    ("-inf", {"bbox_2d": [-math.inf, 0, 100, 100]}, "finite"),
    ("a 400-digit int", {"bbox_2d": [0, 0, 10**400, 100]}, "finite"),
    ("an int past str()'s digit limit", {"bbox_2d": [0, 0, 10**5000, 100]}, "finite"),
    ("wrong length", {"bbox_2d": [0, 0, 100]}, "four numbers"),
    ("inverted", {"bbox_2d": [100, 100, 0, 0]}, "x1 < x2"),
    ("zero area", {"bbox_2d": [10, 10, 10, 100]}, "x1 < x2"),
    ("wholly outside", {"bbox_2d": [600, 0, 700, 100]}, "outside"),
    ("too small", {"bbox_2d": [0, 0, 5, 100]}, "each side"),
    ("a negative img_idx", {"bbox_2d": [0, 0, 100, 100], "img_idx": -1}, "does not exist"),
    ("an img_idx past the last image", {"bbox_2d": [0, 0, 100, 100], "img_idx": 5}, "does not exist"),
    ("a huge img_idx", {"bbox_2d": [0, 0, 100, 100], "img_idx": 10**400}, "does not exist"),
    ("a float img_idx", {"bbox_2d": [0, 0, 100, 100], "img_idx": 1.5}, "an integer"),
    ("a string img_idx", {"bbox_2d": [0, 0, 100, 100], "img_idx": "0"}, "an integer"),
    ("a bool img_idx", {"bbox_2d": [0, 0, 100, 100], "img_idx": True}, "an integer"),
    ("a number label", {"bbox_2d": [0, 0, 100, 100], "label": 7}, "label"),
    ("a list label", {"bbox_2d": [0, 0, 100, 100], "label": ["tag"]}, "label"),
]


@pytest.mark.parametrize("what, kwargs, match", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_every_bad_argument_is_a_one_line_error_output(what, kwargs, match):
    # a 2000x1000 original seen at 500x250: the DeepEyes limits apply in original pixels (x4)
    tool = ImageZoomInTool(Image.new("RGB", (2000, 1000)), [(500, 250)])
    out = tool(**kwargs)
    assert isinstance(out, ToolOutput) and out.is_error and out.image is None
    assert match in out.text and "\n" not in out.text and len(out.text) < 200
    assert len(tool.images) == 1  # a refused call adds no image


json_like = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                         lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=3), inner,
                                                                                     max_size=3), max_leaves=12)


@SETTINGS
@given(json_like, json_like, json_like)
def test_the_tool_never_raises_on_json_like_garbage(bbox, label, img_idx):
    tool = ImageZoomInTool(Image.new("RGB", (300, 200)), frame="absolute")
    out = tool(bbox, label=label, img_idx=img_idx)
    assert isinstance(out, ToolOutput) and out.text and "\n" not in out.text
    assert out.is_error == (out.image is None) and len(tool.images) == 1 + (not out.is_error)


def test_the_limits_are_the_deepeyes_ones():
    assert (MIN_CROP_SIDE, MAX_CROP_ASPECT) == (30, 100.0)
    tool = ImageZoomInTool(Image.new("RGB", (4000, 3000)))
    assert tool([0, 0, MIN_CROP_SIDE, 200]).is_error and not tool([0, 0, MIN_CROP_SIDE + 1, 200]).is_error
    thin = tool([0, 0, 3500, 34])  # both sides over 30 px, but 103 times wider than high
    assert thin.is_error and "aspect" in thin.text and not tool([0, 0, 3400, 34]).is_error


# ---- the schemas ----

def test_schemas_ask_for_the_box_never_for_the_image():
    deepeyes, native = zoom_tool_schema(), zoom_tool_schema("qwen3vl")
    for schema in (deepeyes, native):
        assert schema["function"]["name"] == ZOOM_TOOL and schema["function"]["parameters"]["required"] == ["bbox_2d"]
        assert not any("image" in name for name in schema["function"]["parameters"]["properties"] if name != "img_idx")
    assert list(deepeyes["function"]["parameters"]["properties"]) == ["bbox_2d", "label"]
    props = native["function"]["parameters"]["properties"]
    assert list(props) == ["bbox_2d", "label", "img_idx"] and props["img_idx"]["type"] == "integer"
    assert "0 to 1000" in props["bbox_2d"]["description"]
    assert "0 to 1 " in zoom_tool_schema("deepeyes", "norm1")["function"]["parameters"]["properties"]["bbox_2d"][
        "description"]
    assert ImageZoomInTool(Image.new("RGB", (9, 9)), frame="norm1").schema("qwen3vl") == zoom_tool_schema(
        "qwen3vl", "norm1")
    with pytest.raises(ValueError, match="dialect"):
        zoom_tool_schema("mini-o3")  # type: ignore[arg-type]


def test_the_docstring_documents_every_argument_as_trl_reads_it():
    from transformers.utils import get_json_schema

    read = get_json_schema(ImageZoomInTool(Image.new("RGB", (9, 9))).__call__)["function"]["parameters"]
    native = zoom_tool_schema("qwen3vl")["function"]["parameters"]
    assert list(read["properties"]) == list(native["properties"]) and read["required"] == native["required"]
    for name, prop in read["properties"].items():
        assert prop["type"] == native["properties"][name]["type"] and len(prop["description"]) > 10
