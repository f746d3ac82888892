"""V* Bench: 191 multiple-choice questions on high-resolution photos (115 ``direct_attributes`` with four options, 76
``relative_position`` with two).

Sources, in the order a folder is tried:

1. The V* Bench hub repo ``craigwu/vstar_bench`` (the authors' release, penghao-wu/vstar): ``test_questions.jsonl``
   plus the folders ``direct_attributes/`` and ``relative_position/``. Each jsonl line has ``image`` (a path relative
   to the repo, ``direct_attributes/sa_4690.jpg``), ``text`` (the question, its options as ``(A) rubber`` lines and the
   line ``Answer with the option's letter from the given choices directly.``), ``label`` (the letter),
   ``question_id`` and ``category``. Next to each image, ``sa_4690.json`` holds ``target_object`` (names),
   ``bbox`` (one ``[x, y, w, h]`` box in source pixels per target; SEAL's ``visual_search.py`` reads them so),
   ``question`` and ``options`` (the answer first).
2. The hub dataset lmms-eval 0.7.3 reads (``dataset_path: lmms-lab-encoder/vstar-bench``, split ``test``): parquet
   shards ``data/test-*.parquet`` (or a hub id) with ``image`` (an image feature), ``text``, ``label``,
   ``question_id`` and ``category``, the same records as ``test_questions.jsonl``.
3. A DeepEyes-style jsonl (Visual-Agent/DeepEyes): ``category``, ``image`` (as in 1), ``question``, ``options`` (full
   sentences, the answer first), ``answer`` and ``answer_index`` (0 on all 191). A folder is read this way when it
   holds exactly one ``.jsonl`` and no ``test_questions.jsonl``.
4. A folder with only ``direct_attributes/`` and ``relative_position/`` (images and their ``.json`` annotations),
   as SEAL's ``vstar_bench_eval.py`` reads it: questions and options from the annotations.

Image root: a jsonl's image names resolve against the jsonl's folder, or against IMAGE_DIR with the source
``QUESTIONS.jsonl@IMAGE_DIR`` (e.g. ``vstar:/data/vstar_bench_qa.jsonl@/data/vstar_bench``). Images that are not
there are listed in ``Task.missing`` (the runner refuses to start until they are). When an image has its V*
annotation beside it, ``BenchItem.box`` is the box around all its targets (x1, y1, x2, y2 in source pixels).

Prompt: lmms-eval's ``vstar_doc_to_text`` with the ``default`` post-prompt. It takes the question as the ``text``
before ``(A)``, lists the options found by ``(A) ...`` as ``A. ...`` lines (only the first four) and appends
``"\\nAnswer with the option's letter from the given choices directly."``. The last option it finds runs to the end of
``text``, so it carries the instruction line already in ``text``: the reference prompt ends with that line twice, and
so does this one::

    What is the material of the glove?
    A. rubber
    B. cotton
    C. kevlar
    D. leather
    Answer with the option's letter from the given choices directly.
    Answer with the option's letter from the given choices directly.

Sources 3 and 4 have no ``text``; their prompt is built in the same shape from ``question`` and ``options``. Their
files list the answer first, so the options are put in an order fixed by a hash of the image name (the same on
every machine and run; the answer letter then varies) rather than leaving every answer at A; DeepEyes' own
evaluation shuffles them too, unseeded. ``max_new_tokens`` 16 (the yaml's ``generation_kwargs``).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from ._common import (
    LETTERS,
    TaskInfo,
    cell,
    check_limit,
    columns,
    file_image,
    find_split_files,
    finish_task,
    is_hub_id,
    load_files,
    load_hub,
    load_saved,
    local_path,
    require_columns,
    row_image,
)
from .base import BenchDataError, BenchItem, Task

INFO = TaskInfo("vstar", "vstar", 191, 16)
HUB_ID = "lmms-lab-encoder/vstar-bench"
SPLIT = "test"
QUESTIONS = "test_questions.jsonl"
CATEGORIES = ("direct_attributes", "relative_position")
INSTRUCTION = "Answer with the option's letter from the given choices directly."
POST_PROMPT = "\n" + INSTRUCTION
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
# an option "(A) text": the text runs to the next "(B)".."(D)" or to the end of the question text
_OPTION = re.compile(r"\([A-D]\)\s*([^()]+?)(?=\s*\([A-D]\)|$)")


def lmms_prompt(text: str) -> tuple[str, tuple[str, ...]]:
    """The reference prompt for a ``test_questions.jsonl`` ``text``, and the clean option texts.

    The option texts drop what follows their first line (the instruction the last option swallows).
    """
    found = _OPTION.findall(text)[:4]
    if not found:
        return f"{text}{POST_PROMPT}", ()
    stem = text.split("(A)")[0].strip()
    listed = "\n".join(f"{LETTERS[i]}. {option.strip()}" for i, option in enumerate(found))
    return f"{stem}\n{listed}{POST_PROMPT}", tuple(o.strip().split("\n")[0].strip() for o in found)


def qa_prompt(question: str, options: list[str]) -> str:
    """The reference prompt's shape for a question and its options in letter order (sources 3 and 4)."""
    listed = "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options))
    return f"{question.strip()}\n{listed}\n{INSTRUCTION}{POST_PROMPT}"


def option_order(key: str, n: int) -> list[int]:
    """A fixed permutation of ``range(n)`` for the item ``key`` (its image name): the same everywhere."""
    return sorted(range(n), key=lambda j: hashlib.sha256(f"{key}#{j}".encode()).hexdigest())


def annotation_box(image: Path) -> tuple[float, float, float, float] | None:
    """The box around every target of the V* annotation beside ``image`` (``sa_1.jpg`` -> ``sa_1.json``), or None."""
    path = image.with_suffix(".json")
    if not path.is_file():
        return None
    boxes = [b for b in _read_json(path).get("bbox") or [] if isinstance(b, (list, tuple)) and len(b) == 4]
    if not boxes:
        return None
    return (float(min(b[0] for b in boxes)), float(min(b[1] for b in boxes)),
            float(max(b[0] + b[2] for b in boxes)), float(max(b[1] + b[3] for b in boxes)))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BenchDataError(f"vstar: cannot read the annotation {path}: {exc}") from None
    if not isinstance(data, dict):
        raise BenchDataError(f"vstar: the annotation {path} is not a JSON object")
    return data


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a jsonl (read directly: a few hundred short lines)."""
    records = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as exc:
                raise BenchDataError(f"vstar: {path} line {n} is not JSON ({exc}); pass V* Bench's "
                                     f"{QUESTIONS} or a DeepEyes-style V* jsonl") from None
    return records


def _from_annotations(folder: Path) -> list[dict[str, Any]]:
    """Records in the DeepEyes shape from a folder of category folders of images and annotations (source 4)."""
    records = []
    for category in CATEGORIES:
        for image in sorted((folder / category).glob("*")):
            if image.suffix.lower() in _IMAGE_SUFFIXES:
                ann = _read_json(image.with_suffix(".json"))
                records.append({"category": category, "image": f"{category}/{image.name}",
                                "question": ann.get("question"), "options": ann.get("options"), "answer_index": 0})
    return records


def _qa_item(rec: dict[str, Any], n: int) -> tuple[str, str, tuple[str, ...], str]:
    """(qid, prompt, options, answer letter) of DeepEyes-style record number ``n``, options in their fixed order."""
    image, options = cell(rec.get("image")), rec.get("options")
    if not isinstance(options, list) or not options or not isinstance(rec.get("question"), str):
        raise BenchDataError(f"vstar: record {n} ({image}) lacks question/options; expected V* Bench's {QUESTIONS} "
                             "or DeepEyes-style records (category, image, question, options, answer_index)")
    right = rec.get("answer_index")
    if not isinstance(right, int):
        right = options.index(rec["answer"]) if rec.get("answer") in options else 0
    if not 0 <= right < len(options):
        raise BenchDataError(f"vstar: record {n} ({image}) has answer_index {right} for {len(options)} options")
    order = option_order(image, len(options))
    shown = [cell(options[j]) for j in order]
    return image.rsplit(".", 1)[0], qa_prompt(rec["question"], shown), tuple(shown), LETTERS[order.index(right)]


def _record_items(records: list[dict[str, Any]], root: Path, stop: int) -> tuple[list[BenchItem], list[str]]:
    """Items of jsonl records (sources 1, 3, 4) with images under ``root``, and the image names not there."""
    items, missing = [], []
    for i, rec in enumerate(records[:stop]):
        if not isinstance(rec, dict) or not cell(rec.get("image")):
            raise BenchDataError(f"vstar: record {i + 1} has no image name; expected V* Bench's {QUESTIONS} or "
                                 "DeepEyes-style records")
        name = cell(rec["image"])
        if "text" in rec and "label" in rec:
            qid = cell(rec.get("question_id")) or name.rsplit(".", 1)[0]
            prompt, options = lmms_prompt(cell(rec["text"]))
            answer = cell(rec["label"]).strip().upper()
        else:
            qid, prompt, options, answer = _qa_item(rec, i + 1)
        path = root / name
        if not path.is_file():
            missing.append(name)
        category = cell(rec.get("category")) or Path(name).parent.name
        items.append(BenchItem(index=i, qid=qid, task=INFO.name, category=category, question=prompt,
                               answers=(answer,), options=options, box=annotation_box(path), image_name=name,
                               load_image=file_image(path)))
    return items, missing


def _table_task(ds: Any, where: str, limit: int | None) -> Task:
    """The task from lmms-eval's table (source 2): text, label and an embedded image per row."""
    require_columns(ds, ("text", "label", "image"), INFO.name, where, HUB_ID)
    if type(ds.features["image"]).__name__ != "Image":  # craigwu/vstar_bench's jsonl names its images, read as text
        raise BenchDataError(f"vstar: {where} names its images instead of holding them; download the snapshot "
                             "(`huggingface-cli download --repo-type dataset craigwu/vstar_bench --local-dir DIR`) "
                             "and pass vstar:DIR")
    stop = check_limit(limit, len(ds))
    extra = [c for c in ("question_id", "category") if c in ds.column_names]
    values = columns(ds, ["text", "label", *extra], stop)
    images = ds.select_columns(["image"])
    items = []
    for i in range(stop):
        qid = cell(values["question_id"][i]) if "question_id" in values else str(i)
        prompt, options = lmms_prompt(cell(values["text"][i]))
        items.append(BenchItem(
            index=i, qid=qid, task=INFO.name, category=cell(values["category"][i]) if "category" in values else "",
            question=prompt, answers=(cell(values["label"][i]).strip().upper(),), options=options,
            image_name=f"vstar#{qid}", load_image=row_image(images, "image", i, f"vstar question {qid}")))
    return finish_task(INFO, items, where)


def _split_root(source: str) -> tuple[str, str | None]:
    """``QUESTIONS@IMAGE_DIR`` -> (QUESTIONS, IMAGE_DIR); a source that exists as written is never split."""
    if "@" in source and not Path(source).expanduser().exists():
        questions, _, images = source.rpartition("@")
        return questions, images
    return source, None


def _records_of_folder(folder: Path) -> tuple[list[dict[str, Any]], Path] | None:
    """Records and their questions file for sources 1, 3 and 4 in ``folder``; None if it holds none of them."""
    if (folder / QUESTIONS).is_file():
        return _read_jsonl(folder / QUESTIONS), folder / QUESTIONS
    saved = (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()
    if saved or find_split_files(folder, SPLIT):
        return None  # source 2, read by load()
    jsonls = sorted(folder.glob("*.jsonl"))
    if len(jsonls) > 1:
        raise BenchDataError(f"vstar: {folder} holds several .jsonl files ({', '.join(j.name for j in jsonls)}); "
                             "pass the one to read: vstar:FILE.jsonl")
    if jsonls:
        return _read_jsonl(jsonls[0]), jsonls[0]
    if any((folder / c).is_dir() for c in CATEGORIES):
        return _from_annotations(folder), folder
    raise BenchDataError(f"vstar: {folder} holds no {QUESTIONS}, no V* jsonl, no test-*.parquet shards and no "
                         f"{'/'.join(CATEGORIES)} folders; pass a snapshot of craigwu/vstar_bench or {HUB_ID}")


def load(name: str, source: str, limit: int | None) -> Task:
    """Read V* Bench from ``source`` (a folder, a jsonl, ``QUESTIONS.jsonl@IMAGE_DIR``, a parquet or a hub id)."""
    questions, image_dir = _split_root(source)
    if image_dir is None and is_hub_id(source):
        return _table_task(load_hub(source, config=None, split=SPLIT, task=name), source, limit)
    hint = f"pass a snapshot folder of craigwu/vstar_bench or {HUB_ID}, or a V* jsonl[@IMAGE_DIR]"
    path = local_path(questions, name, hint)
    root = local_path(image_dir, name, "IMAGE_DIR after @ must be the folder of the images") if image_dir else None
    if root is not None and not root.is_dir():
        raise BenchDataError(f"{name}: {image_dir!r} after @ is not a folder; write vstar:QUESTIONS.jsonl@IMAGE_DIR")
    if path.is_file() and path.suffix.lower() != ".jsonl":
        return _table_task(load_files([path], name), str(path), limit)
    found = _records_of_folder(path) if path.is_dir() else (_read_jsonl(path), path)
    if found is None:
        table = load_saved(path, SPLIT, name) or load_files(find_split_files(path, SPLIT), name)
        return _table_task(table, str(path), limit)
    records, file = found
    base = root or (file if file.is_dir() else file.parent)
    items, missing = _record_items(records, base, check_limit(limit, len(records)))
    return finish_task(INFO, items, source if root else str(path), missing)
