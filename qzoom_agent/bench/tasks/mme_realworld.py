"""MME-RealWorld-lite: 1,919 multiple-choice questions (five options, A-E) on large real-world images.

Layout: the hub dataset ``yifanzhang114/MME-RealWorld-lite-lmms-eval`` that lmms-eval 0.7.3's ``mmerealworld_lite``
task reads, split ``train``; a local SOURCE is a snapshot folder of it (shards ``data/train-*.parquet``), one shard,
or a ``save_to_disk`` folder. Columns: ``index``, ``question``, ``multi-choice options`` (a list of strings such as
``"(A) 12"``; some use full-width brackets), ``answer`` (the letter), ``category`` (``Perception/Monitoring`` ...,
task and subtask), ``l2-category`` and ``bytes``: the image as a base64 string (the reference decodes it with
``b64decode``).

Prompt (``mme_realworld_doc_to_text``; it ignores the yaml's pre- and post-prompts): the question, a space,
``The choices are listed below:``, the options as listed one per line, then :data:`INSTRUCTION`::

    {question} The choices are listed below:
    (A) ...
    (B) ...
    Select the best answer to the above multiple-choice question based on the image. Respond with only the ...
    The best answer is:{one space}

``max_new_tokens`` 16 (the yaml's ``generation_kwargs``). Records: ``options`` are the option texts without their
``(A)`` prefix; ``category`` is the ``category`` column.
"""

from __future__ import annotations

import re

from ._common import TaskInfo, cell, check_limit, columns, finish_task, open_table, require_columns, row_image
from .base import BenchItem, Task

INFO = TaskInfo("mme-realworld-lite", "mme-realworld", 1919, 16)
HUB_ID = "yifanzhang114/MME-RealWorld-lite-lmms-eval"
SPLIT = "train"
OPTIONS = "multi-choice options"
NEEDED = ("index", "question", OPTIONS, "answer", "category")
IMAGE = "bytes"
INSTRUCTION = ("Select the best answer to the above multiple-choice question based on the image. Respond with only "
               "the letter (A, B, C, D, or E) of the correct option.\nThe best answer is: ")
_PREFIX = re.compile(r"^\s*[(\uff08]\s*[A-Z]\s*[)\uff09]\s*")  # "(A) " or the full-width "（A）"


def prompt(question: str, options: list[str]) -> str:
    """The reference prompt: the question, the options as listed (with their letters) and the instruction."""
    listed = "\n".join(options)
    return f"{question} The choices are listed below:\n{listed}\n{INSTRUCTION}"


def option_text(option: str) -> str:
    """An option without its ``(A)`` prefix."""
    return _PREFIX.sub("", option, count=1)


def load(name: str, source: str, limit: int | None) -> Task:
    """Read MME-RealWorld-lite from ``source``; see the module docstring."""
    ds, where = open_table(source, task=name, hub_id=HUB_ID, split=SPLIT)
    require_columns(ds, (*NEEDED, IMAGE), name, where, HUB_ID)
    stop = check_limit(limit, len(ds))
    values = columns(ds, NEEDED, stop)
    images = ds.select_columns([IMAGE])
    items = []
    for i in range(stop):
        qid = cell(values["index"][i])
        options = [cell(o) for o in values[OPTIONS][i] or []]
        image_name = f"mme-realworld-lite#{qid}"
        items.append(BenchItem(
            index=i, qid=qid, task=name, category=cell(values["category"][i]),
            question=prompt(cell(values["question"][i]), options),
            answers=(cell(values["answer"][i]).strip().upper(),), options=tuple(option_text(o) for o in options),
            image_name=image_name,
            load_image=row_image(images, IMAGE, i, f"{name} {image_name}")))
    return finish_task(INFO, items, where)
