"""The benchmark adapters (qzoom_agent.bench.tasks) on small snapshots written in each benchmark's published layout
(tests/bench_fixtures.py), and V* on its 191 real records when ../shared/data/real is present.

Each task is checked for its item count, stable order, the prompt exactly as lmms-eval 0.7.3 builds it (spelled out
here), answers and options, decoded image sizes, preset / full_size / max_new_tokens, ``limit`` and its errors.
"""

from __future__ import annotations

import collections
import json
import shutil

import pytest
from bench_fixtures import (
    image_size,
    jpeg_bytes,
    make_chartqa_folder,
    make_docvqa_repo,
    make_hrbench_folder,
    make_mme_folder,
    make_ocrbench_folder,
    make_textvqa_folder,
    make_vstar_folder,
    make_vstar_parquet,
    vstar_record,
    write_deepeyes_jsonl,
    write_shards,
)

from qzoom_agent.bench.tasks import TASK_NAMES, load_task
from qzoom_agent.bench.tasks.base import BenchDataError
from qzoom_agent.bench.tasks.scorers import SCORERS
from qzoom_agent.bench.tasks.vstar import lmms_prompt, option_order

SHORT = "\nAnswer the question using a single word or phrase."
VSTAR_LINE = "Answer with the option's letter from the given choices directly."
MME_TAIL = ("Select the best answer to the above multiple-choice question based on the image. Respond with only the "
            "letter (A, B, C, D, or E) of the correct option.\nThe best answer is: ")


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Keep `datasets`' Arrow cache of the fixtures inside the test's folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")


def _check_task(task, name, preset, full_size, max_new_tokens, n):
    assert (task.name, task.preset, task.full_size, task.max_new_tokens) == (name, preset, full_size, max_new_tokens)
    assert len(task.items) == n and [it.index for it in task.items] == list(range(n))
    assert all(it.task == name for it in task.items)
    assert task.score is SCORERS[name] and task.missing == ()


def _sizes(task):
    return [it.load_image().size for it in task.items]


# --- names, sources, errors ----------------------------------------------------------------------------------------

def test_task_names_and_spec_errors():
    assert set(TASK_NAMES) == {"vstar", "hrbench4k", "hrbench8k", "mme-realworld-lite", "textvqa", "docvqa",
                               "infovqa", "chartqa", "ocrbench"}
    with pytest.raises(BenchDataError, match="unknown task 'hrbench'.*hrbench4k, hrbench8k"):
        load_task("hrbench:/data")
    with pytest.raises(BenchDataError, match="needs a source: docvqa:PATH"):
        load_task("docvqa")
    with pytest.raises(BenchDataError, match="needs a source"):
        load_task("docvqa:  ")


@pytest.mark.parametrize("name", TASK_NAMES)
def test_missing_folder_names_the_fix(name, tmp_path):
    with pytest.raises(BenchDataError, match=f"{name}: no such file or folder .*absent.*; pass"):
        load_task(f"{name}:{tmp_path / 'absent'}")


@pytest.mark.parametrize("name", TASK_NAMES)
def test_offline_hub_id_says_pass_a_local_folder(name):
    with pytest.raises(BenchDataError, match="could not load hub dataset 'nobody-here/no-such-bench'.*pass a local "
                                             f"folder.*then {name}:DIR"):
        load_task(f"{name}:nobody-here/no-such-bench")


def test_folder_without_the_split(tmp_path):
    make_chartqa_folder(tmp_path / "chartqa")
    with pytest.raises(BenchDataError, match="textvqa: no validation shards in .*lmms-lab-encoder/textvqa"):
        load_task(f"textvqa:{tmp_path / 'chartqa'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchDataError, match="ocrbench: no test shards"):
        load_task(f"ocrbench:{tmp_path / 'empty'}")


def test_wrong_columns_are_named(tmp_path):
    import datasets

    feats = datasets.Features({"question": datasets.Value("string"), "image": datasets.Image()})
    write_shards(tmp_path / "data", "validation", {"question": ["q"], "image": [None]}, feats, shards=1)
    with pytest.raises(BenchDataError, match="textvqa: .* lacks the column\\(s\\) answers, question_id .*question, "
                                             "image.*lmms-lab-encoder/textvqa"):
        load_task(f"textvqa:{tmp_path}")
    make_mme_folder(tmp_path / "mme")
    with pytest.raises(BenchDataError, match="hrbench8k: .*lacks the column\\(s\\) A, B, image .*DreamMr/HR-Bench"):
        load_task(f"hrbench8k:{next((tmp_path / 'mme' / 'data').glob('*.parquet'))}")


def test_limit(tmp_path):
    source = f"textvqa:{make_textvqa_folder(tmp_path / 'tv', n=5)}"
    assert [it.qid for it in load_task(source, limit=2).items] == ["34602", "34603"]
    assert len(load_task(source, limit=0).items) == 0
    assert len(load_task(source, limit=50).items) == 5
    with pytest.raises(BenchDataError, match="limit must be 0 or more"):
        load_task(source, limit=-1)


# --- TextVQA, DocVQA, InfoVQA, ChartQA, OCRBench -------------------------------------------------------------------

def test_textvqa(tmp_path):
    folder = make_textvqa_folder(tmp_path / "textvqa", n=5)
    task = load_task(f"textvqa:{folder}")
    _check_task(task, "textvqa", "textvqa", 5000, 128, 5)  # the validation shards only, not the train shard
    first, third = task.items[0], task.items[2]
    assert first.question == "What is the nba team's name?" + SHORT  # str.capitalize, as the reference
    assert third.question == "Who wrote this book?" + SHORT
    assert task.items[1].question == "What brand is the camera?" + SHORT
    assert first.answers == ("ans0",) * 9 + ("alt0",) and first.options == () and first.box is None
    assert (first.qid, first.image_name, first.category) == ("34602", "img000", "textvqa")
    assert _sizes(task) == [image_size(i) for i in range(5)]
    assert first.load_image().mode == "RGB"
    again = load_task(f"textvqa:{folder}")
    assert [it.record() for it in again.items] == [it.record() for it in task.items]
    shard = sorted((folder / "data").glob("validation-*.parquet"))[1]
    one = load_task(f"textvqa:{shard}")  # a single shard: its rows, numbered from 0
    assert [it.qid for it in one.items] == ["34604", "34605", "34606"]


def test_docvqa_and_infovqa_from_one_snapshot(tmp_path):
    repo = make_docvqa_repo(tmp_path / "DocVQA-repo", n=3)
    doc = load_task(f"docvqa:{repo}")
    _check_task(doc, "docvqa", "docvqa", 5349, 32, 3)
    assert doc.items[0].question == "What is the date of letter 0?" + SHORT
    assert doc.items[1].answers == ("March 1", "3/1")
    assert [it.category for it in doc.items] == ["layout", "handwritten/form", "layout"]
    assert [it.qid for it in doc.items] == ["49153", "49154", "49155"] and doc.items[2].image_name == "14467"
    assert _sizes(doc) == [image_size(i) for i in range(3)]
    assert len(load_task(f"docvqa:{repo / 'DocVQA'}").items) == 3  # the config's own folder also works

    info = load_task(f"infovqa:{repo}")
    _check_task(info, "infovqa", "infovqa", 2801, 32, 3)
    second = info.items[1]
    assert second.question == "How many cases in region 1?" + SHORT
    assert (second.qid, second.answers, second.category, second.image_name) == ("98314", ("10",), "single span",
                                                                                 "1.jpeg")
    assert info.items[2].load_image().size == image_size(2)


def test_chartqa(tmp_path):
    task = load_task(f"chartqa:{make_chartqa_folder(tmp_path / 'ChartQA', n=4)}")
    _check_task(task, "chartqa", "chartqa", 2500, 16, 4)
    assert task.items[0].question == "What is the value of bar 0?\nAnswer the question with a single word."
    assert [it.answers for it in task.items] == [("12",), ("13",), ("14",), ("15",)]
    assert [it.category for it in task.items] == ["human_test", "augmented_test", "human_test", "augmented_test"]
    assert [it.qid for it in task.items] == ["0", "1", "2", "3"]
    assert _sizes(task) == [image_size(i) for i in range(4)]


def test_ocrbench(tmp_path):
    task = load_task(f"ocrbench:{make_ocrbench_folder(tmp_path / 'OCRBench')}")
    _check_task(task, "ocrbench", "ocrbench", 1000, 128, 3)
    regular, formula, doc = task.items
    assert regular.question == "what is written in the image?" and regular.answers == ("CITY",)
    assert formula.question == "Please write out the expression of the formula in the image using LaTeX format."
    assert formula.category == "Handwritten Mathematical Expression Recognition"
    assert (formula.image_name, formula.answers) == ("HME100k#1", ("x ^ { 2 }",))
    assert doc.question == "What is the total?" and doc.answers == ("$12.50", "12.50")
    assert task.score("The total is 12.50", doc) == 1.0
    assert _sizes(task) == [image_size(i) for i in range(3)]


# --- HR-Bench, MME-RealWorld-lite ----------------------------------------------------------------------------------

HR_PROMPTS = [
    "What is the color of the umbrella?\nA. red\nB. blue\nC. green\nD. yellow\nAnswer the option letter directly.",
    "How many boats are there?\nA. 3\nB. 4\nC. 5\nD. None\nAnswer the option letter directly.",
    "Is the flag left of the tower?\nA. Yes\nB. No\nAnswer the option letter directly.",
]


@pytest.mark.parametrize("formats", [("tsv",), ("parquet",), ("tsv", "parquet")])
def test_hrbench_snapshot(tmp_path, formats):
    folder = make_hrbench_folder(tmp_path / "HR-Bench", formats)
    for name, stem in (("hrbench4k", "hr_bench_4k"), ("hrbench8k", "hr_bench_8k")):
        task = load_task(f"{name}:{folder}")
        _check_task(task, name, "hrbench", 800, 128, 3)
        assert task.source.endswith(f"{stem}.{formats[-1]}")  # the parquet when both are there
        assert [it.question for it in task.items] == HR_PROMPTS
        assert [it.options for it in task.items] == [("red", "blue", "green", "yellow"), ("3", "4", "5", "None"),
                                                     ("Yes", "No")]
        assert [it.answers for it in task.items] == [("B",), ("D",), ("A",)]
        assert [it.category for it in task.items] == ["single", "cross", "single"]
        assert [it.qid for it in task.items] == ["0", "1", "2"] and task.items[1].image_name == f"{stem}#1"
        assert _sizes(task) == [image_size(i) for i in range(3)]


def test_hrbench_file_and_limit(tmp_path):
    folder = make_hrbench_folder(tmp_path / "HR-Bench")
    task = load_task(f"hrbench8k:{folder / 'hr_bench_8k.tsv'}", limit=1)
    assert [it.question for it in task.items] == HR_PROMPTS[:1]
    with pytest.raises(BenchDataError, match="neither hr_bench_4k.parquet nor hr_bench_4k.tsv"):
        load_task(f"hrbench4k:{make_chartqa_folder(tmp_path / 'other')}")


def test_mme_realworld_lite(tmp_path):
    task = load_task(f"mme-realworld-lite:{make_mme_folder(tmp_path / 'MME', n=2)}")
    _check_task(task, "mme-realworld-lite", "mme-realworld", 1919, 16, 2)
    counting, color = task.items
    assert counting.question == ("How many cars are in the lot 0? The choices are listed below:\n(A) 1\n(B) 2\n(C) 3\n"
                                 "(D) 4\n(E) The image does not feature the objects\n" + MME_TAIL)
    assert color.question == ("What color is the car? The choices are listed below:\n（A） red\n（B） blue\n"
                              "（C） green\n（D） white\n(E) The image does not feature the color\n" + MME_TAIL)
    assert counting.options == ("1", "2", "3", "4", "The image does not feature the objects")
    assert color.options == ("red", "blue", "green", "white", "The image does not feature the color")
    assert [it.answers for it in task.items] == [("B",), ("A",)]
    assert [(it.qid, it.category) for it in task.items] == [("100", "Perception/Monitoring"),
                                                            ("101", "Reasoning/Autonomous_Driving")]
    assert _sizes(task) == [image_size(0), image_size(1)]


# --- V* --------------------------------------------------------------------------------------------------------------

VSTAR_FIRST = ("What is the color of the object0?\nA. red\nB. blue\nC. white\nD. black\n" + VSTAR_LINE + "\n"
               + VSTAR_LINE)
VSTAR_SECOND = ("Is the object1 on the left or right side of the car?\nA. right\nB. left\n" + VSTAR_LINE + "\n"
                + VSTAR_LINE)


def test_lmms_prompt_matches_the_reference_parse():
    text = "What is the material of the glove?\n(A) rubber\n(B) cotton\n(C) kevlar\n(D) leather\n" + VSTAR_LINE
    prompt, options = lmms_prompt(text)
    assert prompt == ("What is the material of the glove?\nA. rubber\nB. cotton\nC. kevlar\nD. leather\n" + VSTAR_LINE
                      + "\n" + VSTAR_LINE)
    assert options == ("rubber", "cotton", "kevlar", "leather")
    assert lmms_prompt("Is it left? (A) left (B) right") == ("Is it left?\nA. left\nB. right\n" + VSTAR_LINE,
                                                             ("left", "right"))
    assert lmms_prompt("No options here.") == ("No options here.\n" + VSTAR_LINE, ())


def test_vstar_bench_folder(tmp_path):
    folder = make_vstar_folder(tmp_path, n=4)
    task = load_task(f"vstar:{folder}")
    _check_task(task, "vstar", "vstar", 191, 16, 4)
    first, second = task.items[:2]
    assert first.question == VSTAR_FIRST and second.question == VSTAR_SECOND
    assert (first.options, first.answers) == (("red", "blue", "white", "black"), ("A",))
    assert (second.options, second.answers) == (("right", "left"), ("B",))
    assert [it.category for it in task.items] == ["direct_attributes", "relative_position"] * 2
    assert [it.qid for it in task.items] == ["0", "1", "2", "3"]
    assert first.image_name == "direct_attributes/sa_1000.jpg"
    assert first.box == (16.0, 12.0, 26.0, 23.0)  # [x, y, w, h] = [16, 12, 10, 11] as x1, y1, x2, y2
    assert _sizes(task) == [image_size(i) for i in range(4)]
    assert load_task(f"vstar:{folder / 'test_questions.jsonl'}").items[3].question == task.items[3].question
    (folder / "relative_position" / "sa_1003.jpg").unlink()
    assert load_task(f"vstar:{folder}").missing == ("relative_position/sa_1003.jpg",)


def test_vstar_box_covers_every_target(tmp_path):
    folder = make_vstar_folder(tmp_path, n=2)
    ann = folder / "relative_position" / "sa_1001.json"
    ann.write_text(json.dumps({"target_object": ["a", "b"], "bbox": [[10, 20, 5, 5], [40, 2, 6, 8]]}))
    assert load_task(f"vstar:{folder}").items[1].box == (10.0, 2.0, 46.0, 25.0)


def test_vstar_lmms_eval_parquet(tmp_path):
    task = load_task(f"vstar:{make_vstar_parquet(tmp_path / 'vstar-bench', n=3)}")
    _check_task(task, "vstar", "vstar", 191, 16, 3)
    assert [it.question for it in task.items[:2]] == [VSTAR_FIRST, VSTAR_SECOND]
    assert [it.answers for it in task.items] == [("A",), ("B",), ("C",)]
    assert task.items[2].options == ("white", "black", "red", "blue") and task.items[0].box is None
    assert _sizes(task) == [image_size(i) for i in range(3)]


def test_vstar_table_of_image_names_says_download_the_snapshot(tmp_path):
    write_shards(tmp_path / "data", "test", {"text": ["Q? (A) a (B) b"], "label": ["A"],
                                             "image": ["direct_attributes/sa_1.jpg"]}, shards=1)
    with pytest.raises(BenchDataError, match="names its images instead of holding them.*craigwu/vstar_bench"):
        load_task(f"vstar:{tmp_path}")


def test_vstar_deepeyes_jsonl_with_image_root(tmp_path):
    images = make_vstar_folder(tmp_path, n=4)
    qa = write_deepeyes_jsonl(tmp_path / "qa" / "vstar_qa.jsonl", n=4)
    alone = load_task(f"vstar:{qa}")  # images beside the jsonl: none there
    assert alone.missing == tuple(vstar_record(i)["image"] for i in range(4))
    task = load_task(f"vstar:{qa}@{images}")
    assert task.missing == () and task.source == f"{qa}@{images}"
    assert load_task(f"vstar:{qa.parent}@{images}").missing == ()  # the folder of a single jsonl
    for i, item in enumerate(task.items):
        rec = vstar_record(i)
        sentences = [f"The answer is {o}." for o in rec["options"]]
        order = option_order(rec["image"], len(sentences))
        assert item.options == tuple(sentences[j] for j in order)
        assert item.options["ABCD".index(item.answers[0])] == sentences[0]
        listed = "\n".join(f"{'ABCD'[k]}. {o}" for k, o in enumerate(item.options))
        assert item.question == f"{rec['question']}\n{listed}\n{VSTAR_LINE}\n{VSTAR_LINE}"
        assert item.qid == rec["image"][:-4] and item.category == rec["category"]
        assert item.box == (16.0 + 2 * i, 12.0 + i, 26.0 + 2 * i, 23.0 + i)  # from the annotation beside the image
    assert option_order("direct_attributes/sa_30411.jpg", 4) == option_order("direct_attributes/sa_30411.jpg", 4)
    assert _sizes(task) == [image_size(i) for i in range(4)]


def test_vstar_annotation_folders(tmp_path):
    folder = make_vstar_folder(tmp_path, n=3)
    (folder / "test_questions.jsonl").unlink()
    task = load_task(f"vstar:{folder}")
    assert [it.image_name for it in task.items] == ["direct_attributes/sa_1000.jpg", "direct_attributes/sa_1002.jpg",
                                                    "relative_position/sa_1001.jpg"]
    first = task.items[0]
    assert sorted(first.options) == sorted(f"The {o} one." for o in vstar_record(0)["options"])
    assert first.options["ABCD".index(first.answers[0])] == "The red one."


def test_vstar_source_errors(tmp_path):
    folder = make_vstar_folder(tmp_path, n=2)
    with pytest.raises(BenchDataError, match="after @ is not a folder"):
        load_task(f"vstar:{folder / 'test_questions.jsonl'}@{folder / 'test_questions.jsonl'}")
    with pytest.raises(BenchDataError, match="IMAGE_DIR after @"):
        load_task(f"vstar:{folder / 'test_questions.jsonl'}@{tmp_path / 'nowhere'}")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jsonl").write_text('{"image": "x.jpg"}\nnot json\n')
    with pytest.raises(BenchDataError, match="line 2 is not JSON"):
        load_task(f"vstar:{bad / 'a.jsonl'}")
    (bad / "a.jsonl").write_text('{"image": "x.jpg"}\n')
    with pytest.raises(BenchDataError, match="record 1 \\(x.jpg\\) lacks question/options"):
        load_task(f"vstar:{bad}")
    (bad / "b.jsonl").write_text("")
    with pytest.raises(BenchDataError, match="several .jsonl files \\(a.jsonl, b.jsonl\\)"):
        load_task(f"vstar:{bad}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchDataError, match="no test_questions.jsonl, no V\\* jsonl"):
        load_task(f"vstar:{tmp_path / 'empty'}")


def test_vstar_real_records(real_data, tmp_path):
    """All 191 real V* Bench records (DeepEyes' jsonl; its images are not in the shared folder)."""
    jsonl = real_data / "vstar_bench_qa" / "vstar_bench_qa.jsonl"
    records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    task = load_task(f"vstar:{jsonl}")
    assert len(task.items) == 191 and [it.index for it in task.items] == list(range(191))
    assert collections.Counter(it.category for it in task.items) == {"direct_attributes": 115,
                                                                     "relative_position": 76}
    assert task.missing == tuple(r["image"] for r in records)  # all 191 named, in order
    for item, rec in zip(task.items, records, strict=True):
        assert sorted(item.options) == sorted(rec["options"])
        assert item.options["ABCD".index(item.answers[0])] == rec["answer"]
        assert item.question.startswith(rec["question"] + "\nA. ") and item.box is None
    letters = collections.Counter(it.answers[0] for it in task.items)
    assert set(letters) == set("ABCD") and max(letters.values()) < 100  # not every answer at A

    copy = tmp_path / "vstar_bench" / "vstar_bench_qa.jsonl"
    copy.parent.mkdir()
    shutil.copy(jsonl, copy)
    dummy = jpeg_bytes(0)
    for rec in records:
        (copy.parent / rec["image"]).parent.mkdir(exist_ok=True)
        (copy.parent / rec["image"]).write_bytes(dummy)
    found = load_task(f"vstar:{copy.parent}")
    assert found.missing == () and len(found.items) == 191
    assert [it.record() for it in found.items] == [it.record() for it in task.items]
    assert found.items[190].load_image().size == image_size(0)
    assert load_task(f"vstar:{jsonl}@{copy.parent}").missing == ()


def test_images_decode_through_the_library_loader(tmp_path):
    """Benchmark images go through `images.load_image`, as agents' inputs do: alpha over white, bad data one line."""
    import base64
    import io

    from PIL import Image

    from qzoom_agent.bench.tasks._common import decode_image
    from qzoom_agent.images import load_image

    clear = Image.new("RGBA", (8, 6), (0, 0, 0, 0))
    buf = io.BytesIO()
    clear.save(buf, format="PNG")
    png = buf.getvalue()
    for value in (png, base64.b64encode(png).decode(), {"bytes": png, "path": None}, clear):
        img = decode_image(value, "clear.png")
        assert img.mode == "RGB" and img.size == (8, 6) and img.getpixel((0, 0)) == (255, 255, 255)
    (tmp_path / "clear.png").write_bytes(png)
    assert decode_image(str(tmp_path / "clear.png"), "f").tobytes() == load_image(png).tobytes()
    for bad, message in ((b"not an image", "cannot decode image bad"), ("@@not base64@@", "cannot decode image bad"),
                         (None, "image bad is empty")):
        with pytest.raises(BenchDataError, match=message):
            decode_image(bad, "bad")
