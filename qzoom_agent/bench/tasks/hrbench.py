"""HR-Bench 4K and 8K: 800 multiple-choice questions each on 4K (3840 px) and 8K (7680 px) images.

Layout: the hub dataset ``DreamMr/HR-Bench`` that lmms-eval 0.7.3's ``hrbench4k`` / ``hrbench8k`` tasks read (config
``hrbench_version_split``, splits ``hrbench_4k`` / ``hrbench_8k``). Its snapshot holds one file per resolution, each
in two formats: ``hr_bench_4k.parquet`` and ``hr_bench_4k.tsv`` (likewise ``_8k``; the TSV is the VLMEvalKit file
the authors' own evaluation reads). A local SOURCE is that folder (the parquet is preferred, the TSV used when it is
the only one), or either file itself. Columns: ``index``, ``question``, ``A``..``D`` (option texts; an absent option
is empty), ``answer`` (the letter), ``category`` (``single`` or ``cross``: single- or cross-instance perception),
``cycle_category`` and ``image``: the image as a base64 string (the reference decodes it with ``b64decode``).

Prompt (``hrbench_doc_to_text``; it takes no pre- or post-prompt)::

    {question.strip()}
    A. {A}
    B. {B}
    ...
    Answer the option letter directly.

``max_new_tokens``: the yaml sets none, so the model wrapper's default applies; 128 here, the default of lmms-eval's
Qwen2.5-VL chat wrapper (its simple wrapper's default is 32768, i.e. unbounded; the answer is one letter either way).
The reference scores with a GPT judge that maps the reply to a letter; the scorer here matches letters locally.
"""

from __future__ import annotations

from pathlib import Path

from ._common import (
    LETTERS,
    TaskInfo,
    cell,
    check_limit,
    columns,
    finish_task,
    is_hub_id,
    load_files,
    load_hub,
    local_path,
    require_columns,
    row_image,
)
from .base import BenchDataError, BenchItem, Task

HUB_ID = "DreamMr/HR-Bench"
HUB_CONFIG = "hrbench_version_split"
INSTRUCTION = "Answer the option letter directly."
NEEDED = ("index", "question", "answer", "category", "A", "B")
INFOS = {name: TaskInfo(name, "hrbench", 800, 128) for name in ("hrbench4k", "hrbench8k")}
STEMS = {"hrbench4k": "hr_bench_4k", "hrbench8k": "hr_bench_8k"}
SPLITS = {"hrbench4k": "hrbench_4k", "hrbench8k": "hrbench_8k"}


def prompt(question: str, options: dict[str, str]) -> str:
    """The reference prompt for ``question`` and its options by letter (absent options left out)."""
    listed = "".join(f"{letter}. {text}\n" for letter, text in options.items())
    return f"{question.strip()}\n{listed}{INSTRUCTION}"


def _data_file(folder: Path, name: str) -> Path:
    """The parquet (preferred) or TSV of task ``name`` in a snapshot folder."""
    stem = STEMS[name]
    for candidate in (folder / f"{stem}.parquet", folder / f"{stem}.tsv", folder / "data" / f"{stem}.parquet"):
        if candidate.is_file():
            return candidate
    raise BenchDataError(f"{name}: neither {stem}.parquet nor {stem}.tsv in {folder}; pass a snapshot folder of "
                         f"{HUB_ID} or one of those files")


def _options(row: dict[str, object], name: str, qid: str) -> dict[str, str]:
    """The row's non-empty options by letter, which must run A, B, ... without gaps."""
    present = {letter: cell(row.get(letter)) for letter in LETTERS if cell(row.get(letter)).strip()}
    if list(present) != list(LETTERS[:len(present)]):
        raise BenchDataError(f"{name}: question {qid} has options {', '.join(present)}, not a run from A")
    return present


def load(name: str, source: str, limit: int | None) -> Task:
    """Read HR-Bench ``name`` (hrbench4k or hrbench8k) from ``source``; see the module docstring."""
    if is_hub_id(source):
        ds, where = load_hub(source, config=HUB_CONFIG, split=SPLITS[name], task=name), source
    else:
        path = local_path(source, name, f"pass a snapshot folder of {HUB_ID} or its {STEMS[name]}.tsv / .parquet")
        path = _data_file(path, name) if path.is_dir() else path
        ds, where = load_files([path], name), str(path)
    require_columns(ds, (*NEEDED, "image"), name, where, HUB_ID)
    letters = [c for c in LETTERS if c in ds.column_names]
    stop = check_limit(limit, len(ds))
    values = columns(ds, [*NEEDED[:4], *letters], stop)
    images = ds.select_columns(["image"])
    items = []
    for i in range(stop):
        row = {c: values[c][i] for c in values}
        qid = cell(row["index"])
        options = _options(row, name, qid)
        image_name = f"{STEMS[name]}#{qid}"
        items.append(BenchItem(
            index=i, qid=qid, task=name, category=cell(row["category"]),
            question=prompt(cell(row["question"]), options), answers=(cell(row["answer"]).strip().upper(),),
            options=tuple(options.values()), image_name=image_name,
            load_image=row_image(images, "image", i, f"{name} {image_name}")))
    return finish_task(INFOS[name], items, where)
