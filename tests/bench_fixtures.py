"""Small benchmark snapshots in the real published layouts, written at test time (see qzoom_agent/bench/tasks).

Every builder writes under the folder it is given and returns what to pass as SOURCE in ``load_task("NAME:SOURCE")``.
Row ``i`` of every table has an image of ``image_size(i)`` pixels, so a test can tell rows apart after decoding.

:func:`make_vstar_folder` is the one other test modules use: ``make_vstar_folder(tmp_path, n)`` writes a V* Bench
snapshot (craigwu/vstar_bench's layout: ``test_questions.jsonl``, ``direct_attributes/`` and ``relative_position/``
with JPEGs and their ``.json`` box annotations) and returns its folder, for ``--bench vstar:FOLDER``.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

VSTAR_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def image_size(i: int) -> tuple[int, int]:
    """The (width, height) of row ``i``'s image in every fixture."""
    return 64 + 8 * i, 48 + 4 * i


def make_image(i: int) -> Image.Image:
    """Row ``i``'s image: a flat colour with a white square in it."""
    w, h = image_size(i)
    img = Image.new("RGB", (w, h), ((37 * i) % 256, (91 * i + 60) % 256, (53 * i + 120) % 256))
    ImageDraw.Draw(img).rectangle((w // 4, h // 4, w // 4 + 10, h // 4 + 10), fill=(255, 255, 255))
    return img


def jpeg_bytes(i: int) -> bytes:
    """Row ``i``'s image as JPEG bytes."""
    buf = io.BytesIO()
    make_image(i).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def b64_image(i: int) -> str:
    """Row ``i``'s image as the base64 text HR-Bench and MME-RealWorld store."""
    return base64.b64encode(jpeg_bytes(i)).decode("ascii")


def write_shards(folder: Path, split: str, columns: dict[str, list[Any]], features: Any = None,
                 shards: int = 2) -> None:
    """``columns`` as the hub writes a split: ``folder/SPLIT-0000k-of-0000n.parquet``, rows in order across shards."""
    import datasets

    folder.mkdir(parents=True, exist_ok=True)
    ds = datasets.Dataset.from_dict(columns, features=features)
    size = len(ds)
    bounds = [round(k * size / shards) for k in range(shards + 1)]
    for k in range(shards):
        part = ds.select(range(bounds[k], bounds[k + 1]))
        part.to_parquet(str(folder / f"{split}-{k:05d}-of-{shards:05d}.parquet"))


def _image_features(**text: Any) -> Any:
    import datasets

    return datasets.Features({**text, "image": datasets.Image()})


TEXTVQA_QUESTIONS = ["what is the NBA team's name?", "What brand is the camera?", "who wrote THIS book?",
                     "what number is on the jersey?", "what does the sign say?"]


def make_textvqa_folder(root: Path, n: int = 5) -> Path:
    """A snapshot of lmms-lab/textvqa: ``data/validation-*.parquet`` (``n`` rows) and a one-row train shard."""
    import datasets

    feats = _image_features(question=datasets.Value("string"), answers=datasets.Sequence(datasets.Value("string")),
                            question_id=datasets.Value("int64"), image_id=datasets.Value("string"))
    rows = {"question": [TEXTVQA_QUESTIONS[i % 5] for i in range(n)],
            "answers": [[f"ans{i}"] * 9 + [f"alt{i}"] for i in range(n)],
            "question_id": [34602 + i for i in range(n)], "image_id": [f"img{i:03d}" for i in range(n)],
            "image": [make_image(i) for i in range(n)]}
    write_shards(root / "data", "validation", rows, feats)
    write_shards(root / "data", "train", {k: v[:1] for k, v in rows.items()}, feats, shards=1)
    return root


def make_docvqa_repo(root: Path, n: int = 3) -> Path:
    """A snapshot of lmms-lab/DocVQA: ``DocVQA/validation-*`` and ``InfographicVQA/validation-*`` (``n`` rows each)."""
    import datasets

    seq = datasets.Sequence(datasets.Value("string"))
    doc = _image_features(questionId=datasets.Value("string"), question=datasets.Value("string"),
                          question_types=seq, docId=datasets.Value("int64"), answers=seq)
    write_shards(root / "DocVQA", "validation", {
        "questionId": [str(49153 + i) for i in range(n)], "question": [f"What is the date of letter {i}?"
                                                                        for i in range(n)],
        "question_types": [["handwritten", "form"] if i % 2 else ["layout"] for i in range(n)],
        "docId": [14465 + i for i in range(n)], "answers": [[f"March {i}", f"3/{i}"] for i in range(n)],
        "image": [make_image(i) for i in range(n)]}, doc)
    info = _image_features(questionId=datasets.Value("string"), question=datasets.Value("string"), answers=seq,
                           answer_type=seq, image_url=datasets.Value("string"))
    write_shards(root / "InfographicVQA", "validation", {
        "questionId": [str(98313 + i) for i in range(n)], "question": [f"How many cases in region {i}?"
                                                                        for i in range(n)],
        "answers": [[str(10 * i)] for i in range(n)], "answer_type": [["single span"] for _ in range(n)],
        "image_url": [f"https://example.org/info/{i}.jpeg" for i in range(n)],
        "image": [make_image(i) for i in range(n)]}, info)
    return root


def make_chartqa_folder(root: Path, n: int = 4) -> Path:
    """A snapshot of lmms-lab/ChartQA: ``data/test-*.parquet`` (``n`` rows)."""
    import datasets

    feats = _image_features(type=datasets.Value("string"), question=datasets.Value("string"),
                            answer=datasets.Value("string"))
    write_shards(root / "data", "test", {
        "type": ["human_test" if i % 2 == 0 else "augmented_test" for i in range(n)],
        "question": [f"What is the value of bar {i}?" for i in range(n)], "answer": [str(12 + i) for i in range(n)],
        "image": [make_image(i) for i in range(n)]}, feats)
    return root


def make_ocrbench_folder(root: Path) -> Path:
    """A snapshot of echo840/OCRBench: ``data/test-*.parquet`` with 3 rows (one HME100k formula)."""
    import datasets

    feats = _image_features(dataset=datasets.Value("string"), question=datasets.Value("string"),
                            question_type=datasets.Value("string"),
                            answer=datasets.Sequence(datasets.Value("string")))
    write_shards(root / "data", "test", {
        "dataset": ["IIIT5K", "HME100k", "docVQA"],
        "question": ["what is written in the image?", " Please write out the expression of the formula in the "
                     "image using LaTeX format. ", "What is the total?\n"],
        "question_type": ["Regular Text Recognition", "Handwritten Mathematical Expression Recognition",
                          "Doc-oriented VQA"],
        "answer": [["CITY"], ["x ^ { 2 }"], ["$12.50", "12.50"]],
        "image": [make_image(i) for i in range(3)]}, feats)
    return root


MME_OPTIONS = [["(A) 1", "(B) 2", "(C) 3", "(D) 4", "(E) The image does not feature the objects"],
               ["（A） red", "（B） blue", "（C） green", "（D） white", "(E) The image does not feature the color"]]


def make_mme_folder(root: Path, n: int = 2) -> Path:
    """A snapshot of yifanzhang114/MME-RealWorld-lite-lmms-eval: ``data/train-*.parquet``, images as base64 text."""
    write_shards(root / "data", "train", {
        "index": [100 + i for i in range(n)],
        "question": [f"How many cars are in the lot {i}?" if i % 2 == 0 else "What color is the car?"
                     for i in range(n)],
        "multi-choice options": [MME_OPTIONS[i % 2] for i in range(n)],
        "answer": ["B" if i % 2 == 0 else "A" for i in range(n)],
        "category": ["Perception/Monitoring" if i % 2 == 0 else "Reasoning/Autonomous_Driving" for i in range(n)],
        "l2-category": ["counting" if i % 2 == 0 else "attribute/color" for i in range(n)],
        "bytes": [b64_image(i) for i in range(n)]})
    return root


HR_ROWS = [  # index, question, options A-D ("" = absent), answer, category
    (0, "What is the color of the umbrella? ", ("red", "blue", "green", "yellow"), "B", "single"),
    (1, "How many boats are there?", ("3", "4", "5", "None"), "D", "cross"),
    (2, "Is the flag left of the tower?", ("Yes", "No", "", ""), "A", "single"),
]


def hrbench_columns() -> dict[str, list[Any]]:
    """The HR-Bench rows of :data:`HR_ROWS` as columns (image ``i`` base64-encoded)."""
    cols: dict[str, list[Any]] = {k: [] for k in ("index", "question", "A", "B", "C", "D", "answer", "category",
                                                  "cycle_category", "image")}
    for i, (index, question, options, answer, category) in enumerate(HR_ROWS):
        for key, value in zip(("index", "question", "answer", "category", "cycle_category", "image"),
                              (index, question, answer, category, f"cycle{i}", b64_image(i)), strict=True):
            cols[key].append(value)
        for letter, option in zip("ABCD", options, strict=True):
            cols[letter].append(option or None)
    return cols


def make_hrbench_folder(root: Path, formats: tuple[str, ...] = ("tsv",)) -> Path:
    """A snapshot of DreamMr/HR-Bench: ``hr_bench_4k`` and ``hr_bench_8k`` as .tsv and/or .parquet (same rows)."""
    import pandas as pd

    root.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(hrbench_columns())
    for stem in ("hr_bench_4k", "hr_bench_8k"):
        if "tsv" in formats:  # as VLMEvalKit writes its TSVs
            frame.to_csv(root / f"{stem}.tsv", sep="\t", index=False)
        if "parquet" in formats:
            frame.to_parquet(root / f"{stem}.parquet", index=False)
    return root


VSTAR_DIRECT = ("What is the color of the {}?", ["red", "blue", "white", "black"])
VSTAR_RELATIVE = ("Is the {} on the left or right side of the car?", ["left", "right"])


def vstar_record(i: int) -> dict[str, Any]:
    """Question ``i`` of :func:`make_vstar_folder`: category, image, question, options (answer first), label, box."""
    category = "direct_attributes" if i % 2 == 0 else "relative_position"
    template, options = VSTAR_DIRECT if i % 2 == 0 else VSTAR_RELATIVE
    shown = options[i % len(options):] + options[:i % len(options)]  # the label letter varies with i
    question = template.format(f"object{i}")
    label = "ABCD"[shown.index(options[0])]
    text = question + "\n" + "\n".join(f"({'ABCD'[k]}) {o}" for k, o in enumerate(shown)) + "\n" + VSTAR_INSTRUCTION
    w, h = image_size(i)
    return {"category": category, "image": f"{category}/sa_{1000 + i}.jpg", "question": question, "options": options,
            "shown": shown, "label": label, "text": text, "bbox": [[w // 4, h // 4, 10, 11]]}


def make_vstar_folder(tmp_path: Path, n: int = 4) -> Path:
    """Write a V* Bench snapshot with ``n`` questions to ``tmp_path / "vstar_bench"`` and return that folder.

    The layout is craigwu/vstar_bench's: ``test_questions.jsonl`` (image, text, label, question_id, category) and, per
    question, ``CATEGORY/sa_ID.jpg`` (image ``i`` is :func:`image_size`\\ ``(i)`` pixels) with ``CATEGORY/sa_ID.json``
    (target_object, bbox ``[x, y, w, h]``, question, options). Even ``i`` are direct_attributes (4 options), odd ``i``
    relative_position (2 options). Pass it as ``vstar:FOLDER``.
    """
    folder = tmp_path / "vstar_bench"
    lines = []
    for i in range(n):
        rec = vstar_record(i)
        image = folder / rec["image"]
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(jpeg_bytes(i))
        annotation = {"target_object": [f"object{i}"], "bbox": rec["bbox"], "question": rec["question"],
                      "options": [f"The {o} one." for o in rec["options"]]}
        image.with_suffix(".json").write_text(json.dumps(annotation))
        lines.append(json.dumps({"image": rec["image"], "text": rec["text"], "category": rec["category"],
                                 "question_id": i, "label": rec["label"]}))
    (folder / "test_questions.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def make_vstar_parquet(root: Path, n: int = 3) -> Path:
    """A snapshot of lmms-lab-encoder/vstar-bench (lmms-eval's V* source): ``data/test-*.parquet``."""
    import datasets

    feats = _image_features(text=datasets.Value("string"), label=datasets.Value("string"),
                            question_id=datasets.Value("int64"), category=datasets.Value("string"))
    recs = [vstar_record(i) for i in range(n)]
    write_shards(root / "data", "test", {"text": [r["text"] for r in recs], "label": [r["label"] for r in recs],
                                         "question_id": list(range(n)), "category": [r["category"] for r in recs],
                                         "image": [make_image(i) for i in range(n)]}, feats)
    return root


def write_deepeyes_jsonl(path: Path, n: int = 4) -> Path:
    """A DeepEyes-style V* jsonl of :func:`vstar_record` ``0..n-1`` (options as sentences, the answer first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        rec = vstar_record(i)
        options = [f"The answer is {o}." for o in rec["options"]]
        lines.append(json.dumps({"category": rec["category"], "image": rec["image"], "question": rec["question"],
                                 "options": options, "answer": options[0], "answer_index": 0}))
    path.write_text("\n".join(lines) + "\n")
    return path
