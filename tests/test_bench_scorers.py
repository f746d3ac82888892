"""The benchmark scorers against the reference evaluation (lmms-eval 0.7.3): every fixture case scores as the
reference scored it, the real V* records score as the reference scores them, and the scores keep their bounds."""

from __future__ import annotations

import hashlib
import json
import math
import random
import string
from pathlib import Path

import pytest
from dialect_helpers import SETTINGS
from hypothesis import given
from hypothesis import strategies as st

from qzoom_agent.bench.tasks.base import BenchItem
from qzoom_agent.bench.tasks.scorers import (
    SCORERS,
    anls_score,
    chartqa_score,
    hrbench_letter,
    hrbench_score,
    mme_realworld_letter,
    ocrbench_score,
    textvqa_score,
    vstar_letter,
    vstar_score,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "bench"
ROWS = [json.loads(line) for line in (FIXTURES / "scorer_reference.jsonl").read_text("utf-8").splitlines()]
TASKS = ("vstar", "hrbench4k", "hrbench8k", "mme-realworld-lite", "textvqa", "docvqa", "infovqa", "chartqa",
         "ocrbench")


def _item(row: dict, answers: list[str] | None = None, options: list[str] | None = None) -> BenchItem:
    return BenchItem(index=0, qid="q", task=row["task"], category=row.get("category", ""),
                     question=row.get("question", ""), answers=tuple(row["answers"] if answers is None else answers),
                     options=tuple(row.get("options", []) if options is None else options))


def test_every_task_has_a_scorer_and_demanding_reference_cases():
    assert tuple(SCORERS) == TASKS
    per_task = {task: [r for r in ROWS if r["task"] == task] for task in TASKS}
    for task, rows in per_task.items():
        assert len(rows) >= 12, task
        # Both outcomes occur for every task, so a scorer that always says 0 (or 1) cannot pass.
        assert {r["reference_score"] == 0.0 for r in rows} == {True, False}, task
    # fractional scores and the exact ANLS threshold are among the cases
    assert {0.3, 0.6, 0.9} <= {r["reference_score"] for r in per_task["textvqa"]}
    assert 0.5 in {r["reference_score"] for r in per_task["docvqa"]}


@pytest.mark.parametrize("row", ROWS, ids=[f"{r['task']}-{i}" for i, r in enumerate(ROWS)])
def test_scorer_reproduces_reference_score(row):
    score = SCORERS[row["task"]](row["prediction"], _item(row))
    assert score == pytest.approx(row["reference_score"], abs=1e-9)


@pytest.mark.parametrize("row", [r for r in ROWS if "reference_letter" in r],
                         ids=lambda r: f"{r['task']}-{r['prediction']!r}")
def test_letter_helpers_read_the_reference_letter(row):
    if row["task"] == "vstar":
        assert vstar_letter(row["prediction"]) == row["reference_letter"]
    elif row["task"] == "mme-realworld-lite":
        assert mme_realworld_letter(row["prediction"]) == row["reference_letter"]
    else:
        letter = hrbench_letter(row["prediction"], row["options"])
        assert letter == row["reference_letter"]
        # None is exactly where the reference would have asked its GPT judge
        assert (letter is None) == row["judge_needed"]


def test_hrbench_unreadable_answers_score_zero_even_when_a_judge_might_match_them():
    rows = [r for r in ROWS if r["task"].startswith("hrbench") and r["judge_needed"]]
    assert len(rows) >= 5
    for row in rows:
        assert hrbench_score(row["prediction"], _item(row)) == 0.0


# --- the real V* records -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vstar_real(real_data: Path) -> tuple[list[dict], dict]:
    path = real_data / "vstar_bench_qa" / "vstar_bench_qa.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    raw = path.read_bytes()
    reference = json.loads((FIXTURES / "vstar_real_reference.json").read_text("utf-8"))
    assert hashlib.sha256(raw).hexdigest() == reference["sha256"], (
        "the real V* file changed: rerun tests/fixtures/bench/make_scorer_reference.py")
    records = [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
    assert len(records) == reference["records"] == 191
    return records, reference


def _vstar_item(record: dict) -> BenchItem:
    return BenchItem(index=0, qid="q", task="vstar", category=record["category"], question=record["question"],
                     answers=("ABCD"[record["answer_index"]],), options=tuple(record["options"]))


def test_real_vstar_every_answer_form_scores_as_the_reference(vstar_real):
    records, reference = vstar_real
    for record, expected in zip(records, reference["scores"], strict=True):
        item = _vstar_item(record)
        letter = item.answers[0]
        fields = {"letter": letter, "lower": letter.lower(), "text": item.options[record["answer_index"]]}
        for form, template in reference["forms"].items():
            assert vstar_score(template.format(**fields), item) == expected[form], (form, record["question"])


def test_real_vstar_right_letter_scores_100_and_option_text_only_by_accident(vstar_real):
    records, reference = vstar_real
    items = [_vstar_item(r) for r in records]
    for form in ("letter", "paren", "dotted", "sentence", "lower"):
        assert sum(s[form] for s in reference["scores"]) == 191
    assert sum(vstar_score(item.answers[0], item) for item in items) == 191
    # The reference never maps option TEXT to its letter; a text reads as a letter only when the letter rules happen
    # to find one in it (a lone article: "The animal in the poster is a dove." reads as A, and every right letter
    # here is A): 10 of the 191 texts land on the right letter, the same 10 the reference scores.
    texts = [item.options[r["answer_index"]] for r, item in zip(records, items, strict=True)]
    assert sum(vstar_score(text, item) for text, item in zip(texts, items, strict=True)) == 10
    assert sum(s["text"] for s in reference["scores"]) == 10


def _derangement(letters: str, rng: random.Random) -> dict[str, str]:
    while True:
        shuffled = rng.sample(letters, len(letters))
        if all(a != b for a, b in zip(letters, shuffled, strict=True)):
            return dict(zip(letters, shuffled, strict=True))


def test_real_vstar_deranged_letters_score_zero_and_guesses_score_their_hits(vstar_real):
    records, _ = vstar_real
    rng = random.Random(0)
    items = [_vstar_item(r) for r in records]
    # Each record's letters permuted with no fixed point: every answer is a wrong letter, so the expected score is 0.
    deranged = [_derangement("ABCD"[:len(item.options)], rng)[item.answers[0]] for item in items]
    assert all(d != item.answers[0] for d, item in zip(deranged, items, strict=True))
    assert sum(vstar_score(f"({d})", item) for d, item in zip(deranged, items, strict=True)) == 0
    # Uniform guesses: the score is the share of guesses that hit, whose expectation over seeds is
    # (107 / 4 + 84 / 2) / 191 = 0.360 here (107 four-option and 84 two-option records).
    guesses = [rng.choice("ABCD"[:len(item.options)]) for item in items]
    hits = sum(g == item.answers[0] for g, item in zip(guesses, items, strict=True))
    four = sum(len(item.options) == 4 for item in items)
    assert (four, len(items) - four) == (107, 84)
    assert sum(vstar_score(g, item) for g, item in zip(guesses, items, strict=True)) == hits
    assert abs(hits / 191 - (107 / 4 + 84 / 2) / 191) < 0.1  # within ~3 standard deviations of the expectation


# --- properties ----------------------------------------------------------------------------------------------------

_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=24)
_LETTER_TEXT = st.text(alphabet=string.ascii_letters + string.digits + " .,()%-_'", max_size=24)
_ANSWERS = st.lists(_TEXT, min_size=1, max_size=10)
_OPTIONS = st.lists(_LETTER_TEXT, min_size=2, max_size=5)


@SETTINGS
@given(prediction=_TEXT, answers=_ANSWERS, options=_OPTIONS, task=st.sampled_from(TASKS), category=st.sampled_from(
    ["", "HME100k", "human_test", "Perception/Remote Sensing"]))
def test_scores_lie_in_the_unit_interval(prediction, answers, options, task, category):
    row = {"task": task, "category": category, "answers": answers, "options": options}
    if task in ("vstar", "hrbench4k", "hrbench8k", "mme-realworld-lite"):
        row["answers"] = [random.Random(prediction).choice("ABCD"[:len(options)])]
    assert 0.0 <= SCORERS[task](prediction, _item(row)) <= 1.0


@SETTINGS
@given(answer=_TEXT, category=st.sampled_from(["", "HME100k", "Doc-oriented VQA"]))
def test_the_answer_itself_scores_one_on_free_text_tasks(answer, category):
    row = {"task": "docvqa", "category": category, "answers": [answer]}
    assert anls_score(answer, _item(row)) == 1.0
    assert ocrbench_score(answer, _item(row)) == 1.0
    assert textvqa_score(answer, _item(row, answers=[answer] * 10)) == 1.0


@SETTINGS
@given(answer=_LETTER_TEXT | st.sampled_from(["1e999", "-1e400%", "nan", "inf", "12%", "0", "1_000"]))
def test_the_answer_itself_scores_one_on_chartqa(answer):
    # The reference itself fails "nan" and "inf": such a number is never within 5% of itself. And it compares the
    # stripped prediction with the unstripped answer, so an answer with outer spaces could not match itself.
    answer = answer.strip()
    try:
        number = float(answer.rstrip("%"))
    except ValueError:
        number = 0.0
    if not math.isfinite(number) or (answer.endswith("%") and not math.isfinite(number / 100.0)):
        return
    assert chartqa_score(answer, _item({"task": "chartqa", "answers": [answer]})) == 1.0


@SETTINGS
@given(options=_OPTIONS, data=st.data())
def test_a_plain_or_bracketed_letter_reads_as_itself(options, data):
    letter = data.draw(st.sampled_from("ABCD"[:len(options)]))
    text = data.draw(_LETTER_TEXT)
    for prediction in (letter, f"({letter})", f"{letter}. {text}"):
        assert vstar_letter(prediction) == letter
        assert mme_realworld_letter(prediction) == letter
    assert hrbench_letter(letter, options) == letter
    assert hrbench_letter(f"({letter})", options) == letter
