"""OCRBench: 1,000 text-recognition and text-VQA questions on one embedded image each.

Layout: the hub dataset ``echo840/OCRBench`` that lmms-eval 0.7.3's ``ocrbench`` task reads, split ``test``; a local
SOURCE is a snapshot folder of it (shards ``data/test-*.parquet``), one shard, or a ``save_to_disk`` folder. Columns:
``dataset`` (the source set, e.g. ``IIIT5K``, ``HME100k``), ``question``, ``question_type`` (one of the ten OCRBench
categories, e.g. ``Regular Text Recognition``; ``Handwritten Mathematical Expression Recognition`` is exactly the
HME100k rows, which the reference scores without spaces), ``answer`` (a list of accepted answers, or one string) and
``image`` (an image feature).

Prompt: ``question.strip()`` alone (the ``default`` pre- and post-prompts are empty). ``max_new_tokens`` 128 (the
yaml's ``generation_kwargs``).

Records: ``category`` is ``question_type``; ``image_name`` is ``DATASET#ROW`` so a scorer or reader can tell the
source set (``HME100k#12``).
"""

from __future__ import annotations

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

INFO = TaskInfo("ocrbench", "ocrbench", 1000, 128)
HUB_ID = "echo840/OCRBench"
SPLIT = "test"
NEEDED = ("dataset", "question", "question_type", "answer")


def prompt(question: str) -> str:
    """The reference prompt: the question, stripped."""
    return question.strip()


def load(name: str, source: str, limit: int | None) -> Task:
    """Read OCRBench from ``source``; see the module docstring."""
    ds, where = open_table(source, task=name, hub_id=HUB_ID, split=SPLIT)
    require_columns(ds, (*NEEDED, "image"), name, where, HUB_ID)
    stop = check_limit(limit, len(ds))
    values = columns(ds, NEEDED, stop)
    images = ds.select_columns(["image"])
    items = []
    for i in range(stop):
        image_name = f"{cell(values['dataset'][i])}#{i}"
        items.append(BenchItem(
            index=i, qid=str(i), task=name, category=cell(values["question_type"][i]),
            question=prompt(cell(values["question"][i])), answers=answer_list(values["answer"][i]),
            image_name=image_name, load_image=row_image(images, "image", i, f"{name} {image_name}")))
    return finish_task(INFO, items, where)
