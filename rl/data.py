"""Rows for the GRPO recipes: ZoomWorld TRAIN scenes, ZoomWorld export folders, ``datasets`` folders or JSONL files.

Every source becomes one ``datasets.Dataset`` with the columns the recipe, the environments and the rewards read:

==============  ======================================================================================
``image``       the full-resolution image (a ``datasets.Image``, decoded on access; a zoom crops from it)
``question``    the question text
``answer``      the reference answer (an option letter for multiple choice)
``options``     the option texts, or None
``kind``        "fine" (needs a zoom), "coarse", or "" when the source does not say
``target_box``  the ground-truth region [x1, y1, x2, y2] in the image's pixels, or None
==============  ======================================================================================

Images are stored by path, never re-encoded: generated ZoomWorld scenes are first written to a resumable export
folder (`qzoom_agent.zoomworld.export.export_folder`) under the run's output directory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

COLUMNS = ("image", "question", "answer", "options", "kind", "target_box")
ZOOMWORLD_PREFIX = "zoomworld:"


def zoomworld_mix(fine_share: float | None) -> dict[str, float] | None:
    """ZoomWorld's family mix with ``fine_share`` of fine questions (None: ZoomWorld's own mix).

    Examples:
        >>> mix = zoomworld_mix(0.5)
        >>> round(sum(mix[f] for f in ("read", "mcq", "relpos", "count")), 6), round(mix["color"], 6)
        (0.5, 0.25)
    """
    if fine_share is None:
        return None
    from ..zoomworld.questions import COARSE_FAMILIES, FINE_FAMILIES
    from ..zoomworld.samples import DEFAULT_MIX

    base = DEFAULT_MIX["hr"]
    fine = sum(base[f] for f in FINE_FAMILIES)
    coarse = sum(base[f] for f in COARSE_FAMILIES)
    mix = {f: base[f] / fine * fine_share for f in FINE_FAMILIES}
    mix.update({f: base[f] / coarse * (1.0 - fine_share) for f in COARSE_FAMILIES})
    return {f: w for f, w in mix.items() if w > 0}


def _row(record: dict[str, Any], root: Path) -> dict[str, Any]:
    image = record.get("image")
    if not isinstance(image, str) or not image:
        raise ValueError("each record needs 'image', the image's path (relative to the file or absolute)")
    path = Path(image) if Path(image).is_absolute() else root / image
    if not path.is_file():
        raise ValueError(f"image {image!r} not found (looked for {path})")
    for key in ("question", "answer"):
        if not isinstance(record.get(key), str):
            raise ValueError(f"each record needs a string {key!r}")
    box = record.get("target_box")
    if box is not None and not (isinstance(box, (list, tuple)) and len(box) == 4):
        raise ValueError(f"target_box must be [x1, y1, x2, y2] or absent, got {box!r}")
    options = record.get("options")
    return {"image": str(path), "question": record["question"], "answer": record["answer"],
            "options": list(options) if options else None, "kind": str(record.get("kind") or ""),
            "target_box": [int(v) for v in box] if box is not None else None}


def read_jsonl(path: Path, limit: int = 0) -> datasets.Dataset:
    """Rows from a JSONL file (one record per line; ``image`` paths relative to the file's folder).

    Raises:
        ValueError: a line that is not a record (with its line number), or an image that does not exist.
    """
    from datasets import Dataset, Features, List, Value
    from datasets import Image as ImageFeature

    rows = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(_row(json.loads(line), path.parent))
            except (ValueError, TypeError, AttributeError) as err:
                raise ValueError(f"{path}:{n}: {err}") from None
            if limit and len(rows) >= limit:
                break
    if not rows:
        raise ValueError(f"{path} holds no records")
    features = Features({"image": ImageFeature(), "question": Value("string"), "answer": Value("string"),
                         "options": List(Value("string")), "kind": Value("string"),
                         "target_box": List(Value("int64"))})
    return Dataset.from_list(rows, features=features)


def _zoomworld(spec: str, cache: Path, size: int, start: int, alphabet: str | None,
               fine_share: float | None) -> datasets.Dataset:
    from datasets import concatenate_datasets

    from ..zoomworld import VARIANTS
    from ..zoomworld.export import export_folder

    variants = spec[len(ZOOMWORLD_PREFIX):].split("+")
    if not variants or any(v not in VARIANTS for v in variants):
        raise ValueError(f"bad ZoomWorld source {spec!r}; use zoomworld:hr, zoomworld:doc or zoomworld:hr+doc")
    if size < 1:
        raise ValueError("train_size must be >= 1 for a generated ZoomWorld source")
    parts = []
    for k, variant in enumerate(variants):
        n = size // len(variants) + (k < size % len(variants))
        if n == 0:  # fewer rows than variants: the first variants get them
            continue
        kw: dict[str, Any] = {"alphabet": alphabet} if alphabet else {}
        mix = zoomworld_mix(fine_share)
        if mix:
            kw["mix"] = mix
        tag = f"{variant}-{start}-{n}" + (f"-fine{fine_share:g}" if fine_share is not None else "")
        folder = export_folder(variant, "train", n, cache / tag, start=start, **kw)
        parts.append(read_jsonl(folder / "train.jsonl"))
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts).shuffle(seed=0)


def load_rows(spec: str, *, cache: Path, size: int = 0, start: int = 0, alphabet: str | None = None,
              fine_share: float | None = None) -> datasets.Dataset:
    """The training rows named by ``spec`` (see `RecipeArguments.train_data`).

    Args:
        spec: ``zoomworld:VARIANT[+VARIANT]``, an export folder, a ``datasets`` folder or a JSONL file.
        cache: where generated ZoomWorld scenes are written (resumable).
        size: rows to generate (ZoomWorld) or keep (others; 0: all).
        start: first ZoomWorld TRAIN index.
        alphabet: tag characters of generated questions (the model's trained alphabet).
        fine_share: share of fine questions of generated rows (None: ZoomWorld's mix).

    Raises:
        ValueError: an unknown source or a malformed record, with where it is.
    """
    if spec.startswith(ZOOMWORLD_PREFIX):
        return _zoomworld(spec, cache, size, start, alphabet, fine_share)
    path = Path(spec).expanduser()
    if path.is_file():
        return read_jsonl(path, size)
    if path.is_dir():
        if (path / "meta.json").is_file() and (path / "train.jsonl").is_file():
            return read_jsonl(path / "train.jsonl", size)
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            from datasets import load_from_disk

            ds = load_from_disk(str(path))
            missing = [c for c in ("image", "question", "answer") if c not in ds.column_names]
            if missing:
                raise ValueError(f"{path} lacks the columns {missing}; rows need image, question and answer")
            for column, default in (("options", None), ("kind", ""), ("target_box", None)):
                if column not in ds.column_names:
                    ds = ds.add_column(column, [default] * len(ds))
            return ds.select(range(min(size, len(ds)))) if size else ds
    raise ValueError(f"no training data at {spec!r}: expected zoomworld:VARIANT, a JSONL file, a ZoomWorld export "
                     "folder (meta.json + train.jsonl) or a datasets folder (save_to_disk)")


def prompt_messages(question: str, *, system: str | None = None, instruction: str | None = None) -> list[dict]:
    """The conversational prompt of one row: an optional system turn, then the image and the question.

    Examples:
        >>> [m["role"] for m in prompt_messages("What does the tag read?", system="Be brief.")]
        ['system', 'user']
        >>> prompt_messages("Q?", instruction="Think first.")[0]["content"][1]["text"]
        'Q?\\n\\nThink first.'
    """
    text = question if not instruction else f"{question}\n\n{instruction}"
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}
    return [{"role": "system", "content": system}, user] if system else [user]
