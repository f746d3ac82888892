"""Unit tests of the GRPO rollout environments (`qzoom_agent.rl.environments`): the dialect crops, their schemas,
boxes and replies, and which environment a recipe builds."""

from __future__ import annotations

import inspect
import os

import pytest
from PIL import Image
from qzoom_agent.rl.config import RecipeArguments
from qzoom_agent.rl.environments import TOOL_NAMES, build_environment, dialect_environment
from qzoom_agent.tools.crop import ToolImage
from qzoom_agent.tools.dialect_base import Call
from qzoom_agent.tools.dialects import get_dialect
from qzoom_agent.tools.trl_env import ZoomEnvironment
from tiny_models import QUESTION, make_image, make_model
from transformers.utils import get_json_schema

from qzoom_agent.boxes import Box
from qzoom_agent.model import QZoomModel

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

pytestmark = pytest.mark.usefixtures("one_thread")


def _half(image: Image.Image) -> tuple[int, int]:
    """A view at half the image's size, so boxes in view pixels double in source pixels."""
    return image.width // 2, image.height // 2


def _tools(env_cls: type) -> list[str]:
    """The tool names TRL takes from an environment class: its public functions but reset and get_reward."""
    return sorted(n for n, _ in inspect.getmembers(env_cls, predicate=inspect.isfunction)
                  if not n.startswith("_") and n not in ("reset", "get_reward"))


# ---- models (module-scoped: each loads in about a second) -----------------------------------------------------------
@pytest.fixture(scope="module")
def deepeyes_model() -> QZoomModel:
    return QZoomModel.from_pretrained("zoomworld-tiny-deepeyes")


@pytest.fixture(scope="module")
def plain_qwen() -> QZoomModel:
    """A tiny random Qwen2.5-VL: no policy, no ZoomWorld training record (so the dialect's reference settings)."""
    return make_model("qwen2_5_vl")


# ====================================================================================================================
# rl/environments.py
# ====================================================================================================================
def test_deepeyes_environment_schema_good_box_and_reply():
    dialect = get_dialect("deepeyes")
    env_cls = dialect_environment(dialect, view_size_of=_half)
    assert _tools(env_cls) == ["image_zoom_in_tool"] == [TOOL_NAMES["deepeyes"]]
    fn = get_json_schema(env_cls().image_zoom_in_tool)["function"]
    assert fn["name"] == "image_zoom_in_tool"
    assert set(fn["parameters"]["properties"]) == {"bbox_2d", "label"} and fn["parameters"]["required"] == ["bbox_2d"]
    assert "pixels of the image as you see it" in fn["parameters"]["properties"]["bbox_2d"]["description"]

    env, image = env_cls(), make_image(800, 600)
    assert env.reset(image=image, question=QUESTION, answer="7") is None
    assert env.images[0].view_size == (400, 300) and env.question == QUESTION

    blocks = env.image_zoom_in_tool([10, 20, 110.5, 120], label="tag")  # pixels of the 400x300 view
    box = Box(20, 40, 221, 240)  # doubled; 221 exactly (110.5 * 2), so no outward rounding beyond it
    assert env.boxes == [list(box.as_tuple())] and (env.calls, env.failed_calls) == (1, 0)
    assert [b["type"] for b in blocks] == ["text", "image", "text", "text"]  # the reference reply around the crop
    assert blocks[0]["text"] == "<tool_response>" and blocks[-1]["text"] == "</tool_response>"
    crop = blocks[1]["image"]
    expected = dialect.view(image, box)
    assert isinstance(crop, Image.Image) and crop.size == expected.size and crop.tobytes() == expected.tobytes()
    assert env.outputs[0].artifact == {"box": [20, 40, 221, 240], "view_size": list(crop.size)}

    env.image_zoom_in_tool([10.2, 20.2, 110.2, 120.2])  # fractional source pixels round outward
    assert env.boxes[1] == [20, 40, 221, 241]
    assert len(env.images) == 3  # the original, then each crop


@pytest.mark.parametrize("bbox", [
    [10, 20, 25, 120],  # 30 px wide in the source: each side must exceed 30
    [50, 50, 10, 10],  # inverted
    [float("nan"), 0, 100, 100],
    "0,0,100,100",
    [0, 0, 100],
])
def test_deepeyes_environment_refused_box_is_one_error_line(bbox):
    env = dialect_environment(get_dialect("deepeyes"), view_size_of=_half)()
    env.reset(image=make_image(800, 600), question=QUESTION)
    ok = env.image_zoom_in_tool([10, 20, 25.5, 120])  # 31 px wide in the source: accepted
    assert env.boxes == [[20, 40, 51, 240]] and any(b["type"] == "image" for b in ok)
    blocks = env.image_zoom_in_tool(bbox)
    assert len(blocks) == 1 and blocks[0]["type"] == "text" and blocks[0]["text"].startswith("Error: ")
    assert (env.calls, env.failed_calls, env.boxes[1]) == (2, 1, None)
    assert env.outputs[1].is_error and len(env.images) == 2  # a refused call adds no image


def test_dialect_environment_without_an_image_replies_with_an_error():
    env = dialect_environment(get_dialect("deepeyes"), view_size_of=_half)()
    env.reset(question=QUESTION)
    (block,) = env.image_zoom_in_tool([0, 0, 100, 100])
    assert block["text"] == "Error: no image: this example has no image to zoom into"
    assert (env.calls, env.failed_calls, env.boxes) == (1, 1, [None])
    env.reset(image=make_image(800, 600), question=QUESTION)  # the next rollout starts clean
    assert (env.calls, env.failed_calls, env.boxes, len(env.images)) == (0, 0, [], 1)


def test_qwen3vl_environment_zooms_into_a_crop():
    dialect = get_dialect("qwen3vl")
    env_cls = dialect_environment(dialect, view_size_of=_half)
    assert _tools(env_cls) == ["image_zoom_in_tool"]
    props = get_json_schema(env_cls().image_zoom_in_tool)["function"]["parameters"]
    assert set(props["properties"]) == {"bbox_2d", "label", "img_idx"} and props["required"] == ["bbox_2d"]

    env, image = env_cls(), make_image(800, 600)
    env.reset(image=image, question=QUESTION)
    first = env.image_zoom_in_tool([0, 0, 500, 500])  # 0-1000 of the original: its top-left quarter
    assert env.boxes == [[0, 0, 400, 300]]
    assert [b["type"] for b in first] == ["image"] and first[0]["image"].size == dialect.view(
        image, Box(0, 0, 400, 300)).size
    env.image_zoom_in_tool([500, 500, 1000, 1000], img_idx=1)  # the bottom-right quarter of that crop
    assert env.boxes[1] == [200, 150, 400, 300]
    env.image_zoom_in_tool([0, 0, 1000, 500], img_idx=0)
    assert env.boxes[2] == [0, 0, 800, 300]

    (err,) = env.image_zoom_in_tool([0, 0, 500, 500], img_idx=9)
    assert err["type"] == "text" and err["text"] == "Error: img_idx 9 does not exist; there are 4 images"
    (err,) = env.image_zoom_in_tool([0, 0, 500, 500], img_idx=-1)
    assert err["text"].startswith("Error: ")
    assert (env.calls, env.failed_calls, env.boxes[3:]) == (5, 2, [None, None])


def test_pixelreasoner_environment_pads_the_normalized_box_as_the_dialect():
    dialect = get_dialect("pixelreasoner")
    env_cls = dialect_environment(dialect, view_size_of=_half)
    assert _tools(env_cls) == ["crop_image_normalized"] == [TOOL_NAMES["pixelreasoner"]]
    props = get_json_schema(env_cls().crop_image_normalized)["function"]["parameters"]
    assert set(props["properties"]) == {"bbox_2d", "target_image"}
    assert props["required"] == ["bbox_2d", "target_image"]

    env, image = env_cls(), make_image(800, 600)
    env.reset(image=image, question=QUESTION)
    original = [ToolImage(image, (400, 300), 0, Box(0, 0, 800, 600))]
    blocks = env.crop_image_normalized([0.2, 0.3, 0.5, 0.6], target_image=1)
    expected = dialect.locate(Call((0.2, 0.3, 0.5, 0.6), None, 0), original)
    assert expected == Box(80, 120, 480, 420)  # padded by 0.1 of the image on every side
    assert env.boxes == [list(expected.as_tuple())]
    crop = blocks[1]["image"]
    assert [b["type"] for b in blocks] == ["text", "image"]
    assert blocks[0]["text"] == f"\nHere is the cropped image (Image Size: {crop.width}x{crop.height}):"
    assert crop.size == dialect.view(image, expected).size

    env.crop_image_normalized([40, 60, 200, 150], target_image=1)  # values >= 1: pixels of the 400x300 view
    assert env.boxes[1] == list(dialect.locate(Call((40, 60, 200, 150), None, 0), original).as_tuple())
    assert env.boxes[1] == [0, 60, 480, 360]

    env.crop_image_normalized([0.5, 0.5, 0.9, 0.9], target_image=2)  # into the first crop, through its region
    first = ToolImage(crop, crop.size, 0, expected)
    assert env.boxes[2] == list(dialect.locate(Call((0.5, 0.5, 0.9, 0.9), None, 1), [*original, first]).as_tuple())
    assert all(80 <= v <= 480 for v in env.boxes[2][::2]) and all(120 <= v <= 420 for v in env.boxes[2][1::2])

    (err,) = env.crop_image_normalized([0.2, 0.3, 0.5, 0.6], target_image=0)  # 1-based: 0 names nothing
    assert err["type"] == "text" and err["text"].startswith("\nExecution error:\n")
    assert (env.calls, env.failed_calls) == (4, 1)


@pytest.mark.parametrize(("dialect", "arguments"), [
    ("pixelreasoner", {"bbox_2d": [0.2, 0.3, 0.5, 0.6]}),
    ("deepeyes", {}),
    ("deepeyes", {"bbox_2d": [10, 20, 110, 120], "confidence": 0.9}),
])
def test_dialect_tool_with_arguments_off_its_signature_is_counted(dialect, arguments):
    env = dialect_environment(get_dialect(dialect), view_size_of=_half)()
    env.reset(image=make_image(800, 600), question=QUESTION)
    tool = getattr(env, TOOL_NAMES[dialect])
    blocks = tool(**arguments)  # how TRL calls a tool: sync_tool_dict[name](**function["arguments"])
    assert isinstance(blocks, list) and env.calls == 1


def test_build_environment_none_and_zoom(tool_model):
    assert build_environment(RecipeArguments(environment="none"), tool_model, _half) is None
    zoom = build_environment(RecipeArguments(environment="zoom", view_tokens=64), tool_model, _half)
    assert issubclass(zoom, ZoomEnvironment) and zoom.model is tool_model and zoom.view_tokens == 64
    assert _tools(zoom) == ["zoom"]

    no_heads = QZoomModel.from_pretrained("zoomworld-tiny-tool", False)
    assert no_heads.heads is None
    with pytest.raises(ValueError, match="environment 'zoom' needs Q-Zoom heads"):
        build_environment(RecipeArguments(environment="zoom"), no_heads, _half)


def test_build_environment_crop_on_the_bundled_deepeyes_policy_uses_its_trained_settings(deepeyes_model):
    from qzoom_agent.bench.deepeyes_agent import trained_settings

    env_cls = build_environment(RecipeArguments(environment="crop"), deepeyes_model, _half)
    trained = trained_settings(deepeyes_model)["dialect"]
    assert env_cls._dialect == trained and trained.reply_text is False and trained.zoom is not None
    env, image = env_cls(), make_image(800, 600)
    env.reset(image=image, question=QUESTION)
    blocks = env.image_zoom_in_tool([10, 20, 110, 120])
    assert len(blocks) == 1 and blocks[0]["type"] == "image"  # the image alone, no text
    assert env.boxes == [[20, 40, 220, 240]]
    assert blocks[0]["image"].size == trained.view(image, Box(20, 40, 220, 240)).size
    assert blocks[0]["image"].width > 200  # enlarged as in training


def test_build_environment_crop_on_another_model_uses_the_reference_reply(plain_qwen):
    recipe = RecipeArguments(environment="crop", view_tokens=256)
    env_cls = build_environment(recipe, plain_qwen, _half)
    d = env_cls._dialect
    px = plain_qwen.adapter.px_per_token
    assert d.name == "deepeyes" and d.reply_text is True and d.zoom is None and d.max_pixels == 256 * px * px
    env = env_cls()
    env.reset(image=make_image(800, 600), question=QUESTION)
    blocks = env.image_zoom_in_tool([10, 20, 110, 120])
    types = [b["type"] for b in blocks]
    assert types.count("image") == 1 and types[0] == "text" and types[-1] == "text"
    assert blocks[0]["text"] == "<tool_response>"

    qwen3 = build_environment(RecipeArguments(environment="crop", dialect="qwen3vl"), plain_qwen, _half)
    assert qwen3._dialect.name == "qwen3vl" and _tools(qwen3) == ["image_zoom_in_tool"]
    pr = build_environment(RecipeArguments(environment="crop", dialect="pixelreasoner"), plain_qwen, _half)
    assert _tools(pr) == ["crop_image_normalized"]


def test_build_environment_qwen3vl_crop_with_a_small_view_budget(plain_qwen):
    recipe = RecipeArguments(environment="crop", dialect="qwen3vl", view_tokens=64)
    try:
        env_cls = build_environment(recipe, plain_qwen, _half)
    except ValueError as err:  # acceptable only when the message points at the recipe's setting
        assert "view_tokens" in str(err)
        return
    assert env_cls._dialect.max_pixels <= 64 * 28 * 28


def test_crop_recipe_refuses_minio3():
    with pytest.raises(ValueError, match="grounding"):
        RecipeArguments(environment="crop", dialect="minio3")
    with pytest.raises(ValueError, match="minio3"):
        dialect_environment(get_dialect("minio3"), view_size_of=_half)
