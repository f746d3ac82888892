"""TextVQA, DocVQA, InfographicVQA and ChartQA: open-ended questions on one embedded image each.

Layouts (the hub datasets lmms-eval 0.7.3 reads; a local SOURCE is a snapshot folder of that repo, one of its
parquet shards, or a ``save_to_disk`` folder; a hub id is read with ``datasets.load_dataset``):

* textvqa: ``lmms-lab-encoder/textvqa`` (a copy of ``lmms-lab/textvqa``), split ``validation`` (5,000), shards
  ``data/validation-*.parquet``; columns ``question``, ``answers`` (the 10 annotators' answers), ``question_id``,
  ``image_id``, ``image`` (an image feature). Task ``textvqa_val``.
* docvqa: ``lmms-lab-encoder/DocVQA`` config ``DocVQA``, split ``validation`` (5,349), shards
  ``DocVQA/validation-*.parquet``; columns ``questionId``, ``question``, ``answers``, ``question_types``, ``docId``,
  ``image``. Task ``docvqa_val``.
* infovqa: the same repo, config ``InfographicVQA``, split ``validation`` (2,801), shards
  ``InfographicVQA/validation-*.parquet``; columns ``questionId``, ``question``, ``answers``, ``answer_type``,
  ``image_url``, ``image``. Task ``infovqa_val``.
* chartqa: ``lmms-lab-encoder/ChartQA``, split ``test`` (2,500), shards ``data/test-*.parquet``; columns ``type``
  (``human_test`` or ``augmented_test``), ``question``, ``answer``, ``image``. Task ``chartqa``.

Prompts (``doc_to_text`` with the ``default`` ``lmms_eval_specific_kwargs``, empty pre-prompt):

* textvqa: ``question.capitalize()`` + ``"\\nAnswer the question using a single word or phrase."`` (``capitalize``
  also lower-cases the rest of the question, as the reference does; its OCR-token option is off by default).
* docvqa, infovqa: ``question`` + ``"\\nAnswer the question using a single word or phrase."``
* chartqa: ``question`` + ``"\\nAnswer the question with a single word."``

``max_new_tokens``: docvqa and infovqa 32, chartqa 16 (their yaml ``generation_kwargs``). textvqa's yaml sets none,
so the model wrapper's default applies; 128 here, the default of lmms-eval's Qwen2.5-VL chat wrapper (its simple
wrapper's default is 32768, i.e. unbounded; answers are one word or phrase either way).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._common import (
    TaskInfo,
    answer_list,
    cell,
    check_limit,
    columns,
    finish_task,
    open_table,
    require_columns,
    row_image,
)
from .base import BenchItem, Task

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
SINGLE_WORD = "\nAnswer the question with a single word."


@dataclass(frozen=True)
class _Layout:
    """How one task is stored and prompted.

    Attributes:
        info: name, preset, official size, token budget.
        hub_id, hub_config, split, subdirs: where the split lives on the hub and in a snapshot folder.
        post_prompt: appended to the question.
        capitalize: apply ``str.capitalize`` to the question (TextVQA).
        needed: columns that must be present (besides ``image``).
        answers: the column of reference answers.
        qid: the question-id column, or None (the row number is the id).
        category: the record's category from a row.
        image_name: a readable image name from a row and its number.
    """

    info: TaskInfo
    hub_id: str
    hub_config: str | None
    split: str
    subdirs: tuple[str, ...]
    post_prompt: str
    capitalize: bool
    needed: tuple[str, ...]
    answers: str
    qid: str | None
    category: Callable[[dict[str, Any]], str]
    image_name: Callable[[dict[str, Any], int], str]


def _joined(column: str, default: str) -> Callable[[dict[str, Any]], str]:
    def category(row: dict[str, Any]) -> str:
        value = row.get(column)
        if isinstance(value, (list, tuple)):
            return "/".join(cell(v) for v in value) or default
        return cell(value) or default

    return category


def _named(column: str, prefix: str) -> Callable[[dict[str, Any], int], str]:
    def name(row: dict[str, Any], i: int) -> str:
        value = cell(row.get(column)).rsplit("/", 1)[-1]
        return value or f"{prefix}#{i}"

    return name


LAYOUTS: dict[str, _Layout] = {
    "textvqa": _Layout(
        TaskInfo("textvqa", "textvqa", 5000, 128), "lmms-lab-encoder/textvqa", None, "validation", ("data",),
        SHORT_ANSWER, True, ("question", "answers", "question_id"), "answers", "question_id",
        lambda row: "textvqa", _named("image_id", "textvqa")),
    "docvqa": _Layout(
        TaskInfo("docvqa", "docvqa", 5349, 32), "lmms-lab-encoder/DocVQA", "DocVQA", "validation", ("DocVQA", "data"),
        SHORT_ANSWER, False, ("question", "answers", "questionId"), "answers", "questionId",
        _joined("question_types", "docvqa"), _named("docId", "docvqa")),
    "infovqa": _Layout(
        TaskInfo("infovqa", "infovqa", 2801, 32), "lmms-lab-encoder/DocVQA", "InfographicVQA", "validation",
        ("InfographicVQA", "data"), SHORT_ANSWER, False, ("question", "answers", "questionId"), "answers",
        "questionId", _joined("answer_type", "infovqa"), _named("image_url", "infovqa")),
    "chartqa": _Layout(
        TaskInfo("chartqa", "chartqa", 2500, 16), "lmms-lab-encoder/ChartQA", None, "test", ("data",),
        SINGLE_WORD, False, ("question", "answer"), "answer", None, _joined("type", "chartqa"),
        lambda row, i: f"chartqa#{i}"),
}
_OPTIONAL = ("image_id", "question_types", "docId", "answer_type", "image_url", "type")


def prompt(name: str, question: str) -> str:
    """The reference prompt of task ``name`` for ``question``."""
    layout = LAYOUTS[name]
    body = question.capitalize() if layout.capitalize else question
    return f"{body}{layout.post_prompt}"


def load(name: str, source: str, limit: int | None) -> Task:
    """Read task ``name`` (textvqa, docvqa, infovqa or chartqa) from ``source``; see the module docstring."""
    layout = LAYOUTS[name]
    ds, where = open_table(source, task=name, hub_id=layout.hub_id, split=layout.split, hub_config=layout.hub_config,
                           subdirs=layout.subdirs)
    require_columns(ds, (*layout.needed, "image"), name, where, layout.hub_id)
    stop = check_limit(limit, len(ds))
    wanted = [*layout.needed, *(c for c in _OPTIONAL if c in ds.column_names and c not in layout.needed)]
    values = columns(ds, wanted, stop)
    images = ds.select_columns(["image"])
    items = []
    for i in range(stop):
        row = {c: values[c][i] for c in wanted}
        image_name = layout.image_name(row, i)
        items.append(BenchItem(
            index=i, qid=cell(row[layout.qid]) if layout.qid else str(i), task=name, category=layout.category(row),
            question=prompt(name, cell(row["question"])), answers=answer_list(row[layout.answers]),
            image_name=image_name, load_image=row_image(images, "image", i, f"{name} {image_name}")))
    return finish_task(layout.info, items, where)
