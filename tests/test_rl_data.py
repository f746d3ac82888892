"""Unit tests of what a GRPO recipe reads (`qzoom_agent.rl`): its rows (JSONL, ZoomWorld exports and generated
scenes, datasets folders) and its settings (`RecipeArguments`, `parse_recipe`)."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
from PIL import Image
from qzoom_agent.rl.config import RecipeArguments, parse_recipe
from qzoom_agent.rl.data import load_rows, prompt_messages, read_jsonl, zoomworld_mix
from qzoom_agent.tools.dialects import get_dialect

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

pytestmark = pytest.mark.usefixtures("one_thread")

DIGITS = "0123456789"
START = 9_000_000


def _png(path: Path, size: tuple[int, int] = (40, 30), colour: str = "red") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return path


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
