"""Unit tests of the GRPO recipe's parts (`qzoom_agent.rl`): rows (data), rollout environments, the processor TRL
renders rollouts with (down to the token ids of a tool round), held-out evaluation helpers, and the recipe's settings.

The processor's key test, `test_trl_tool_round_tokenises_as_the_agent_loop_renders_it`, builds the ids TRL 1.16
builds for a tool round (``prompt_ids + completion_ids + suffix_ids``, the suffix from TRL's own
``GRPOTrainer._get_tool_suffix_ids``) and checks they are the agent loop's rendering of the same conversation."""

from __future__ import annotations

import inspect
import json
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from qzoom_agent.rl.config import RecipeArguments, parse_recipe
from qzoom_agent.rl.data import load_rows, prompt_messages, read_jsonl, zoomworld_mix
from qzoom_agent.rl.environments import TOOL_NAMES, build_environment, dialect_environment
from qzoom_agent.rl.evaluate import plot_progress, policy_compare_args, read_history, replot, summarize_eval
from qzoom_agent.rl.processor import CALL_END, grpo_processor, view_size_of
from qzoom_agent.tools.crop import ToolImage
from qzoom_agent.tools.dialect_base import Call
from qzoom_agent.tools.dialects import get_dialect
from qzoom_agent.tools.trl_env import ZoomEnvironment, zoom_environment
from tiny_models import QUESTION, make_image, make_model
from transformers.utils import get_json_schema

from qzoom_agent.boxes import Box
from qzoom_agent.model import QZoomModel

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

pytestmark = pytest.mark.usefixtures("one_thread")

DIGITS = "0123456789"
START = 9_000_000
CALL = '<tool_call>\n{"name": "zoom", "arguments": {}}\n</tool_call>'
ZOOM_REPLY = "Zoomed in on [1, 2, 3, 4]"


def _half(image: Image.Image) -> tuple[int, int]:
    """A view at half the image's size, so boxes in view pixels double in source pixels."""
    return image.width // 2, image.height // 2


def _tools(env_cls: type) -> list[str]:
    """The tool names TRL takes from an environment class: its public functions but reset and get_reward."""
    return sorted(n for n, _ in inspect.getmembers(env_cls, predicate=inspect.isfunction)
                  if not n.startswith("_") and n not in ("reset", "get_reward"))


def _png(path: Path, size: tuple[int, int] = (40, 30), colour: str = "red") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return path


# ---- models (module-scoped: each loads in about a second) -----------------------------------------------------------
@pytest.fixture(scope="module")
def tool_model() -> QZoomModel:
    return QZoomModel.from_pretrained("zoomworld-tiny-tool")


@pytest.fixture(scope="module")
def deepeyes_model() -> QZoomModel:
    return QZoomModel.from_pretrained("zoomworld-tiny-deepeyes")


@pytest.fixture(scope="module")
def plain_qwen() -> QZoomModel:
    """A tiny random Qwen2.5-VL: no policy, no ZoomWorld training record (so the dialect's reference settings)."""
    return make_model("qwen2_5_vl")


# ====================================================================================================================
# rl/data.py
# ====================================================================================================================
def test_read_jsonl_relative_and_absolute_images_and_defaults(tmp_path):
    _png(tmp_path / "imgs" / "a.png", (40, 30), "red")
    absolute = _png(tmp_path / "elsewhere" / "b.png", (24, 36), "blue")
    path = _jsonl(tmp_path / "rows.jsonl", [
        {"image": "imgs/a.png", "question": "Q1?", "answer": "7"},
        "",  # blank lines are skipped
        {"image": str(absolute), "question": "Q2?", "answer": "B", "options": ["x", "y", "z", "w"], "kind": "fine",
         "target_box": [1, 2, 13.9, 14]},
    ])
    ds = read_jsonl(path)
    assert len(ds) == 2 and ds.column_names == ["image", "question", "answer", "options", "kind", "target_box"]
    first, second = ds[0], ds[1]
    assert isinstance(first["image"], Image.Image) and first["image"].size == (40, 30)
    assert first["image"].convert("RGB").getpixel((0, 0)) == (255, 0, 0)
    assert (first["question"], first["answer"], first["options"], first["kind"], first["target_box"]) == (
        "Q1?", "7", None, "", None)
    assert second["image"].size == (24, 36) and second["image"].convert("RGB").getpixel((3, 3)) == (0, 0, 255)
    assert (second["options"], second["kind"], second["target_box"]) == (["x", "y", "z", "w"], "fine", [1, 2, 13, 14])
    assert len(read_jsonl(path, limit=1)) == 1


@pytest.mark.parametrize(("line", "expect"), [
    ({"image": "missing.png", "question": "q", "answer": "a"}, "not found"),
    ("{not json", "Expecting"),
    ({"image": "a.png", "question": 5, "answer": "a"}, "string 'question'"),
    ({"image": "a.png", "question": "q", "answer": "a", "target_box": [1, 2, 3]}, "target_box"),
    ([1, 2], ""),  # JSON, but not a record
])
def test_read_jsonl_errors_name_the_line(tmp_path, line, expect):
    _png(tmp_path / "a.png")
    ok = {"image": "a.png", "question": "q", "answer": "a"}
    path = _jsonl(tmp_path / "rows.jsonl", [ok, "", line, ok])
    with pytest.raises(ValueError, match=re.escape(f"{path}:3:")) as err:
        read_jsonl(path)
    assert expect in str(err.value)


def test_read_jsonl_without_records_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no records"):
        read_jsonl(path)


def test_load_rows_on_a_jsonl_file_keeps_size_rows(tmp_path):
    _png(tmp_path / "a.png")
    path = _jsonl(tmp_path / "rows.jsonl", [{"image": "a.png", "question": f"q{i}", "answer": "a"} for i in range(3)])
    assert load_rows(str(path), cache=tmp_path / "cache")["question"] == ["q0", "q1", "q2"]
    assert load_rows(str(path), cache=tmp_path / "cache", size=2)["question"] == ["q0", "q1"]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    from qzoom_agent.zoomworld.export import export_folder

    return export_folder("hr", "train", 3, tmp_path_factory.mktemp("zw") / "export", start=START, alphabet=DIGITS)


def test_load_rows_on_a_zoomworld_export_folder(export, tmp_path):
    records = [json.loads(line) for line in (export / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    ds = load_rows(str(export), cache=tmp_path)
    assert len(ds) == len(records) == 3
    for row, rec in zip(ds, records, strict=True):
        assert isinstance(row["image"], Image.Image) and row["image"].size == (rec["width"], rec["height"])
        assert (row["question"], row["answer"], row["kind"]) == (rec["question"], rec["answer"], rec["kind"])
        assert row["target_box"] == rec["target_box"] and row["options"] == rec["options"]
    assert {r["kind"] for r in records} <= {"fine", "coarse"} and all(r["target_box"] for r in records)
    assert len(load_rows(str(export), cache=tmp_path, size=2)) == 2


def test_load_rows_on_a_datasets_folder(tmp_path):
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    images = [Image.new("RGB", (32, 24), "green"), Image.new("RGB", (16, 16), "white")]
    features = Features({"image": ImageFeature(), "question": Value("string"), "answer": Value("string")})
    Dataset.from_dict({"image": images, "question": ["q0", "q1"], "answer": ["a0", "a1"]},
                      features=features).save_to_disk(str(tmp_path / "ds"))
    ds = load_rows(str(tmp_path / "ds"), cache=tmp_path / "cache")
    assert len(ds) == 2 and set(ds.column_names) == {"image", "question", "answer", "options", "kind", "target_box"}
    row = ds[0]
    assert row["image"].size == (32, 24) and (row["question"], row["answer"]) == ("q0", "a0")
    assert (row["options"], row["kind"], row["target_box"]) == (None, "", None)
    assert len(load_rows(str(tmp_path / "ds"), cache=tmp_path / "cache", size=1)) == 1

    Dataset.from_dict({"image": images, "question": ["q0", "q1"]},
                      features=Features({"image": ImageFeature(), "question": Value("string")})
                      ).save_to_disk(str(tmp_path / "noanswer"))
    with pytest.raises(ValueError, match=r"lacks the columns \['answer'\]"):
        load_rows(str(tmp_path / "noanswer"), cache=tmp_path / "cache")


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_load_rows_generates_zoomworld_fine_rows_once(tmp_path):
    ds = load_rows("zoomworld:hr", cache=tmp_path, size=4, start=START, alphabet=DIGITS, fine_share=1.0)
    assert len(ds) == 4 and ds["kind"] == ["fine"] * 4
    assert all(isinstance(b, list) and len(b) == 4 for b in ds["target_box"])
    (meta_path,) = tmp_path.rglob("meta.json")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    assert meta["alphabet"] == DIGITS and meta["mix"]["color"] == meta["mix"]["shape"] == 0.0
    before = _files(tmp_path)
    assert sum(name.endswith(".png") for name in before) == 4
    again = load_rows("zoomworld:hr", cache=tmp_path, size=4, start=START, alphabet=DIGITS, fine_share=1.0)
    after = _files(tmp_path)
    data = [name for name in before if not name.endswith("meta.json")]  # meta.json is re-merged on every call
    assert sorted(after) == sorted(before) and {n: after[n] for n in data} == {n: before[n] for n in data}
    assert again["question"] == ds["question"] and again["answer"] == ds["answer"]


def test_load_rows_two_variants_with_one_row(tmp_path):
    ds = load_rows("zoomworld:hr+doc", cache=tmp_path, size=1, start=START, alphabet=DIGITS)
    assert len(ds) == 1


@pytest.mark.parametrize("spec", ["zoomworld:", "zoomworld:xx", "zoomworld:hr+", "zoomworld:hr+xx"])
def test_bad_zoomworld_source_lists_the_forms(tmp_path, spec):
    with pytest.raises(ValueError, match="use zoomworld:hr, zoomworld:doc or zoomworld:hr\\+doc"):
        load_rows(spec, cache=tmp_path, size=2)
    assert not any(tmp_path.iterdir())  # nothing generated for a refused source


def test_bad_source_lists_the_forms(tmp_path):
    for spec in (str(tmp_path / "nothing-here"), str(tmp_path)):  # absent, and a folder of neither kind
        with pytest.raises(ValueError, match="expected zoomworld:VARIANT, a JSONL file, a ZoomWorld export folder"):
            load_rows(spec, cache=tmp_path)
    with pytest.raises(ValueError, match="train_size must be >= 1"):
        load_rows("zoomworld:hr", cache=tmp_path, size=0)


@pytest.mark.parametrize("share", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_zoomworld_mix_sums_to_one_with_the_fine_share(share):
    from qzoom_agent.zoomworld.questions import COARSE_FAMILIES, FINE_FAMILIES

    mix = zoomworld_mix(share)
    assert sum(mix.values()) == pytest.approx(1.0)
    assert sum(mix.get(f, 0.0) for f in FINE_FAMILIES) == pytest.approx(share)
    assert sum(mix.get(f, 0.0) for f in COARSE_FAMILIES) == pytest.approx(1.0 - share)
    assert all(w > 0 for w in mix.values())  # zero-weight families are left out
    assert zoomworld_mix(None) is None


def test_prompt_messages_shapes():
    (user,) = prompt_messages("Q?")
    assert user == {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}
    system, user = prompt_messages("Q?", system="Be brief.", instruction="Think first.")
    assert system == {"role": "system", "content": "Be brief."}
    assert user["content"] == [{"type": "image"}, {"type": "text", "text": "Q?\n\nThink first."}]
    assert [m["role"] for m in prompt_messages("Q?", system="")] == ["user"]  # an empty system prompt is none


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


# ====================================================================================================================
# rl/processor.py
# ====================================================================================================================
def test_grpo_processor_ends_calls_and_leaves_the_model_tokenizer_alone(tool_model, tmp_path):
    own = tool_model.adapter.tokenizer
    eos, template = own.eos_token, own.chat_template
    proc = grpo_processor(tool_model)
    assert proc.tokenizer.eos_token == CALL_END == "</tool_call>"
    assert proc.tokenizer.decode([proc.tokenizer.eos_token_id]) == CALL_END
    assert proc.tokenizer is not own and own.eos_token == eos == "<|im_end|>" and own.chat_template == template
    assert getattr(own, "response_template", None) is None and proc.tokenizer.response_template is not None

    files = proc.save_pretrained(tmp_path)
    names = {Path(f).name for f in files}
    assert {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"} <= names
    assert all(Path(f).is_file() for f in files)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path).eos_token == CALL_END


@pytest.mark.parametrize("choice", ["model", "qwen3_vl"])
def test_tool_listing_follows_list_tools(tool_model, choice):
    schema = get_json_schema(zoom_environment(tool_model)().zoom)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    rendered = {}
    for list_tools in (False, True):
        proc = grpo_processor(tool_model, chat_template=choice, list_tools=list_tools)
        rendered[list_tools] = proc.apply_chat_template(msgs, tools=[schema], add_generation_prompt=True,
                                                        tokenize=False)
    assert "<tools>" not in rendered[False] and '"name": "zoom"' not in rendered[False]
    assert "<tools>" in rendered[True] and '"name": "zoom"' in rendered[True]
    assert rendered[False].endswith("<|im_start|>assistant\n") and QUESTION in rendered[False]


def test_grpo_processor_image_sizes(tool_model):
    import torch

    proc = grpo_processor(tool_model)
    ip, px = proc.image_processor, tool_model.adapter.px_per_token
    size_of = view_size_of(tool_model)

    def shown(image: Image.Image) -> tuple[tuple[int, int], int]:
        out = ip(images=[image])  # no return_tensors: torch tensors all the same
        assert isinstance(out["pixel_values"], torch.Tensor) and isinstance(out["image_grid_thw"], torch.Tensor)
        _, h, w = out["image_grid_thw"][0].tolist()
        return (w * ip.patch_size, h * ip.patch_size), h * w // ip.merge_size ** 2

    big = Image.new("RGB", (2000, 1500))
    size, tokens = shown(big)
    assert size == size_of(big) == (756, 560)  # the row image at the model's budget, as the agent sizes it
    assert tool_model.config.max_tokens * 0.9 <= tokens <= tool_model.config.max_tokens

    small = Image.new("RGB", (200, 150))
    size, tokens = shown(small)
    assert size == size_of(small) == (196, 140) and tokens == 35  # a crop keeps about its size
    assert 4 <= tokens < tool_model.config.min_tokens
    assert abs(size[0] - 200) < px and abs(size[1] - 150) < px

    tiny = Image.new("RGB", (20, 15))
    assert shown(tiny) == (size_of(tiny), 6)  # raised only to the 4-token floor (2x3 here)
    for w, h in ((1234, 567), (451, 300), (3000, 200), (640, 480), (28 * 24 + 1, 28 * 24)):
        im = Image.new("RGB", (w, h))
        assert shown(im)[0] == size_of(im), (w, h)


def _expand(ids: list[int], image_token: int, counts: list[int]) -> list[int]:
    """The chat template's one placeholder per image replaced by that image's visual tokens, in order."""
    out, k = [], 0
    for t in ids:
        if t == image_token:
            out += [image_token] * counts[k]
            k += 1
        else:
            out.append(t)
    assert k == len(counts)
    return out


@pytest.mark.parametrize("list_tools", [False, True])
def test_trl_tool_round_tokenises_as_the_agent_loop_renders_it(tool_model, list_tools):
    """TRL builds a tool round's ids as ``prompt_ids + completion_ids + suffix_ids``; they must be the ids of the
    agent loop's rendering (`BackboneAdapter.render_chat`) of the same conversation, tokenised by the model's own
    tokenizer, with each image expanded to its visual tokens."""
    from trl import GRPOTrainer
    from trl.chat_template_utils import is_chat_template_prefix_preserving

    proc = grpo_processor(tool_model, list_tools=list_tools)
    tok = proc.tokenizer
    assert is_chat_template_prefix_preserving(proc)  # so TRL renders with this template, not a training swap
    schema = get_json_schema(zoom_environment(tool_model)().zoom)  # the tool TRL passes with the prompt
    image, crop = make_image(640, 480), make_image(200, 150, seed=1)

    # TRL: the prompt (tokenised and expanded by the processor), the generated call, then the tool suffix.
    prompt = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
    rendered = proc.apply_chat_template(conversation=[prompt], tools=[schema], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)
    prompt_ids = rendered["input_ids"][0]
    completion_ids = tok(CALL, add_special_tokens=False)["input_ids"]
    assert completion_ids[-1] == tok.eos_token_id  # generation stops at the end of the call
    tool_messages = [{"role": "tool", "name": "zoom",
                      "content": [{"type": "image", "image": crop}, {"type": "text", "text": ZOOM_REPLY}]}]
    trainer = SimpleNamespace(_is_vlm=True, processing_class=proc, chat_template=None, chat_template_kwargs={},
                              _tokenizer=tok)
    suffix_ids = GRPOTrainer._get_tool_suffix_ids(trainer, tool_messages)
    # The eos trimming: the dummy call turn's last eos is the call's end, so the suffix closes the call turn.
    assert tok.decode(suffix_ids).startswith("<|im_end|>\n<|im_start|>user\n<tool_response>\n")
    trl_ids = prompt_ids + completion_ids + suffix_ids

    # The agent loop: the whole conversation rendered as text, placeholders unexpanded.
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "zoom", "arguments": {}}}]},
        {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": ZOOM_REPLY}]},
    ]
    agent_text = tool_model.adapter.render_chat(conversation, tools=[schema] if list_tools else None)
    assert agent_text.count(CALL) == 1 and agent_text.endswith("<|im_start|>assistant\n")
    assert ("<tools>" in agent_text) is list_tools

    # Text level: TRL's ids decoded, each image's run of visual tokens folded back to one placeholder.
    pad = "<|image_pad|>"
    trl_text = re.sub(f"(?:{re.escape(pad)})+", pad, tok.decode(trl_ids))
    assert trl_text == agent_text

    # Id level: the agent's text through the model's own tokenizer, images expanded to their token counts.
    merge = proc.image_processor.merge_size ** 2
    counts = [int(rendered["image_grid_thw"][0].prod()) // merge,
              int(proc.image_processor(images=[crop])["image_grid_thw"][0].prod()) // merge]
    assert counts == [34 * 46 // 4, 35]
    agent_ids = tool_model.adapter.tokenizer(agent_text, add_special_tokens=False)["input_ids"]
    assert trl_ids == _expand(agent_ids, tool_model.adapter.image_token_id, counts)


# ====================================================================================================================
# rl/evaluate.py
# ====================================================================================================================
def test_summarize_eval_on_records():
    records = [
        {"kind": "fine", "correct": True, "tool_calls": 2, "latency_s": 1.0, "generated_tokens": 40},
        {"kind": "fine", "correct": False, "tool_calls": 0, "latency_s": 0.5, "generated_tokens": 10},
        {"kind": "fine", "correct": True, "tool_calls": 1, "latency_s": 0.5, "generated_tokens": 30, "error": ""},
        {"kind": "coarse", "correct": True, "tool_calls": 1, "latency_s": 0.25, "generated_tokens": 4},
        {"kind": "coarse", "correct": None, "tool_calls": None, "latency_s": 0.25, "generated_tokens": 6,
         "error": "RuntimeError: boom"},
    ]
    s = summarize_eval(records, 7)
    assert (s["step"], s["n"], s["n_fine"], s["errors"]) == (7, 5, 3, 1)
    assert s["accuracy"] == pytest.approx(3 / 5)
    assert s["accuracy_fine"] == pytest.approx(2 / 3) and s["accuracy_coarse"] == pytest.approx(1 / 2)
    assert s["call_rate_fine"] == pytest.approx(2 / 3) and s["call_rate_coarse"] == pytest.approx(1 / 2)
    assert s["tool_calls"] == pytest.approx(4 / 5) and s["latency_s"] == pytest.approx(0.5)
    assert s["generated_tokens"] == pytest.approx(18)

    only_fine = summarize_eval(records[:1], 0)
    assert only_fine["accuracy_coarse"] is None and only_fine["call_rate_coarse"] is None
    empty = summarize_eval([], 3)
    assert (empty["n"], empty["accuracy"], empty["errors"]) == (0, None, 0)


def test_policy_compare_args(tmp_path):
    d = tmp_path / "policy"
    base = "zoomworld-tiny"
    assert policy_compare_args(RecipeArguments(environment="zoom"), d, base) == {"model": base, "policy": str(d)}
    assert policy_compare_args(RecipeArguments(environment="crop"), d, base) == {"model": base,
                                                                                 "crop_policy": str(d)}
    assert policy_compare_args(RecipeArguments(environment="none"), d, base) == {"model": str(d)}
    # a custom eval agent: the deepeyes agents still take the crop policy, any other runs the policy as the model
    assert policy_compare_args(RecipeArguments(environment="crop", eval_agent="deepeyes@256"), d, base) == {
        "model": base, "crop_policy": str(d)}
    assert policy_compare_args(RecipeArguments(environment="crop", eval_agent="crop@qwen3vl"), d, base) == {
        "model": str(d)}
    assert policy_compare_args(RecipeArguments(environment="zoom", eval_agent="plain@256"), d, base) == {
        "model": str(d)}
    assert policy_compare_args(RecipeArguments(environment="none", eval_agent="qzoom-tool"), d, base) == {
        "model": str(d)}


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_progress_writes_a_png(tmp_path):
    logs = [{"step": i, "reward": 0.1 * i, "tools/call_frequency": 0.5, "rollouts/call_rate_fine": 0.8,
             "rollouts/call_rate_coarse": 0.1} for i in range(1, 8)]
    logs += [{"step": 8, "reward": float("nan")}, {"step": 8, "train_runtime": 3.0}]  # skipped, not plotted
    records = [{"kind": "fine", "correct": True, "tool_calls": 1}, {"kind": "coarse", "correct": False}]
    evals = [summarize_eval(records, 0), summarize_eval(records[:1], 8)]
    out = plot_progress(logs, evals, tmp_path / "progress.png", "GRPO test")
    assert out == tmp_path / "progress.png" and _is_png(out)
    assert _is_png(plot_progress(logs[:2], [], tmp_path / "no_evals.png", "no evals"))
    assert _is_png(plot_progress([], [], tmp_path / "nothing.png", "nothing yet"))


def test_read_history(tmp_path):
    assert read_history(tmp_path / "missing") == []
    lines = [summarize_eval([{"kind": "fine", "correct": True}], s) for s in (0, 5)]
    (tmp_path / "history.jsonl").write_text(json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n",
                                            encoding="utf-8")
    assert read_history(tmp_path) == lines


# ====================================================================================================================
# rl/config.py
# ====================================================================================================================
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"environment": "tools"}, "environment must be one of"),
    ({"chat_template": "chatml"}, "chat_template must be one of"),
    ({"eval_n": -1}, "eval_n must be an int >= 0"),
    ({"view_tokens": 0}, "view_tokens must be an int >= 1"),
    ({"train_size": 1.5}, "train_size must be an int"),
    ({"fine_share": 1.5}, r"fine_share must lie in \[0, 1\]"),
    ({"rewards": {"accuracy": math.inf}}, "reward 'accuracy' must be a finite number"),
    ({"rewards": {"accuracy": math.nan}}, "reward 'accuracy' must be a finite number"),
    ({"rewards": {"format": True}}, "reward 'format' must be a finite number"),
    ({"rewards": {"format": "1"}}, "reward 'format' must be a finite number"),
    ({"rewards": {}}, "rewards must name at least one reward"),
    ({"rewards": "{accuracy: 1}"}, "rewards must be a mapping"),
    ({"rewards": "[1, 2]"}, "rewards must be a mapping"),
    ({"curiosity": "not json"}, "curiosity must be a mapping"),
    ({"eval_bench": "vstar"}, "unknown bench 'vstar'"),
    ({"eval_agent": "nope"}, "unknown agent 'nope'"),
    ({"environment": "crop", "dialect": "gpt"}, "dialect must be one of"),
])
def test_recipe_arguments_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RecipeArguments(**kwargs)


def test_recipe_arguments_accept_json_and_skip_eval_checks_without_eval():
    r = RecipeArguments(rewards='{"accuracy": 2, "call_cost": 0.1}', curiosity='{"target_rate": 0.5}')
    assert r.rewards == {"accuracy": 2, "call_cost": 0.1} and r.curiosity == {"target_rate": 0.5}
    assert RecipeArguments().rewards == {"accuracy": 1.0, "format": 0.2} and RecipeArguments().curiosity is None
    assert RecipeArguments(eval_n=0, eval_bench="vstar", eval_agent="nope").eval_bench == "vstar"
    assert RecipeArguments(environment="zoom", dialect="minio3").dialect == "minio3"  # read by crop only


def test_recipe_agent_by_environment():
    assert RecipeArguments(environment="zoom").agent == "qzoom-tool"
    assert RecipeArguments(environment="crop").agent == "deepeyes-cached"
    assert RecipeArguments(environment="none").agent == "plain@576"
    assert RecipeArguments(environment="zoom", eval_agent="qzoom@256").agent == "qzoom@256"


def test_default_eval_agent_reads_the_crop_dialect_it_trains():
    recipe = RecipeArguments(environment="crop", dialect="pixelreasoner")
    agent = recipe.agent
    evaluated_in = "deepeyes" if agent.startswith("deepeyes") else agent.partition("@")[2]
    written = get_dialect("pixelreasoner").format_call((0.1, 0.1, 0.5, 0.5))
    assert get_dialect(evaluated_in).parse(written).call is not None


def test_parse_recipe_yaml_and_command_line(tmp_path):
    yaml = tmp_path / "recipe.yaml"
    yaml.write_text(f"model: zoomworld-tiny-tool\nenvironment: crop\noutput_dir: {tmp_path / 'out'}\n"
                    "use_cpu: true\nbf16: false\nmax_steps: 3\nmax_completion_length: 512\n"
                    "rewards:\n  accuracy: 1.0\n  format: 0.5\n",
                    encoding="utf-8")
    recipe, grpo = parse_recipe(["--config", str(yaml)])
    assert (recipe.model, recipe.environment, recipe.rewards) == ("zoomworld-tiny-tool", "crop",
                                                                  {"accuracy": 1.0, "format": 0.5})
    assert (grpo.max_steps, grpo.use_cpu, grpo.bf16, grpo.output_dir) == (3, True, False, str(tmp_path / "out"))
    assert recipe.agent == "deepeyes-cached"

    recipe, grpo = parse_recipe(["--config", str(yaml), "--rewards", '{"accuracy": 2}', "--max_steps", "5"])
    assert recipe.rewards == {"accuracy": 2} and grpo.max_steps == 5  # the command line wins over the YAML
    with pytest.raises(ValueError, match="rewards must be a mapping"):
        parse_recipe(["--config", str(yaml), "--rewards", "{bad"])


def test_replot_redraws_the_progress_plot_from_the_last_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        replot(tmp_path)
    logs = [{"step": s, "reward": 0.1 * s, "tools/call_frequency": 1.0, "rollouts/call_rate_coarse": 1 - s / 10}
            for s in range(1, 11)]
    for step, upto in ((5, 5), (10, 10)):  # the latest checkpoint holds the longest history
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"log_history": logs[:upto]}))
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "history.jsonl").write_text(json.dumps(summarize_eval([], 0) | {"n": 3}) + "\n")
    path = replot(tmp_path)
    assert path == tmp_path / "grpo_progress.png" and path.read_bytes()[:4] == b"\x89PNG"


def test_compare_takes_a_policy_as_its_model(tmp_path):
    """The no-tool recipe's held-out run: `compare --model POLICY` (a delta on a base), its alphabet the base's."""
    from qzoom_agent.bench import runner

    cfg = runner.CompareConfig("zoomworld:hr", ["plain@256"], 2, 0, str(tmp_path), model="zoomworld-tiny-tool")
    summary = runner.run_compare(cfg)
    records = [json.loads(line) for line in (tmp_path / runner.RESULTS).read_text().splitlines()]
    assert len(records) == 2 and summary["agents"]["plain@256"]["n"] == 2
    run = json.loads((tmp_path / runner.RUN).read_text())
    assert run["args"]["alphabet"] == "0123456789" and run["args"]["model"].endswith("policy")  # the policy's own
    other = runner.CompareConfig("zoomworld:hr", ["plain@256"], 2, 0, str(tmp_path), model="zoomworld-tiny")
    with pytest.raises(ValueError, match="other arguments"):  # another model (its base) is another run
        runner.run_compare(other)
