"""Writing ZoomWorld to disk: a resumable folder of PNGs and JSONL records, or an in-memory ``datasets.Dataset``."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .samples import (
    DEFAULT_ALPHABET,
    GENERATOR_VERSION,
    VARIANTS,
    check_alphabet,
    check_mix,
    check_size_range,
    sample,
    seed_for,
)

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)


def _features() -> datasets.Features:
    from datasets import Features, List, Value
    from datasets import Image as ImageFeature

    box, text = List(Value("int32")), Value("string")
    return Features({
        "image": ImageFeature(), "question": text, "answer": text, "options": List(text), "family": text,
        "kind": text, "target_box": box,
        "panels": List({"box": box, "colour": text, "text": text, "origin": box, "size": Value("int32")}),
        "glyphs": List({"box": box, "char": text, "panel": Value("int32")}),
        "objects": List({"box": box, "colour": text, "shape": text}),
        "dots": List({"box": box, "colour": text}),
        "texts": List({"box": box, "text": text, "origin": box, "size": Value("int32")}),
        "variant": text, "split": text, "seed": Value("int64"), "index": Value("int64"), "alphabet": text,
        "width": Value("int32"), "height": Value("int32"), "version": text,
    })


def to_dataset(variant: str, split: str, n: int, start: int = 0, **kw: Any) -> datasets.Dataset:
    """Samples ``start`` .. ``start + n - 1`` of ``split`` as an in-memory ``datasets.Dataset``.

    Columns: ``image`` (a ``datasets.Image``) and every field of :meth:`ZoomWorldSample.to_json`. Every image is
    held in memory; for thousands of samples use :func:`export_folder` instead.
    """
    from datasets import Dataset

    rows = []
    for index in range(start, start + n):
        s = sample(variant, split, index, **kw)
        rows.append({"image": s.image, **s.to_json()})
    return Dataset.from_list(rows, features=_features())


def _meta(variant: str, split: str, kw: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(kw) - {"alphabet", "mix", "size_range"})
    if unknown:
        raise ValueError(f"unknown options {unknown}; export_folder takes alphabet, mix and size_range")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    seed_for(split, 0)  # validates the split
    size_range = check_size_range(kw.get("size_range"), variant)
    return {"variant": variant, "alphabet": check_alphabet(kw.get("alphabet", DEFAULT_ALPHABET)),
            "mix": check_mix(kw.get("mix"), variant), "size_range": list(size_range), "version": GENERATOR_VERSION,
            "splits": [split]}


def _merge_meta(out: Path, meta: dict[str, Any]) -> None:
    """Write meta.json, or check an existing one matches: one folder never mixes generator settings."""
    path = out / "meta.json"
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = [k for k in meta if k != "splits" and old.get(k) != meta[k]]
        if changed:
            raise ValueError(f"{out} holds ZoomWorld data made with other settings ({', '.join(changed)}); "
                             "choose another output folder")
        meta = {**meta, "splits": sorted(set(old.get("splits", [])) | set(meta["splits"]))}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _done_indices(jsonl: Path) -> set[int]:
    """Indices already exported; cuts off a torn last line left by a run killed mid-write."""
    if not jsonl.exists():
        return set()
    data = jsonl.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        logger.warning("%s: dropping a half-written last record", jsonl)
        with jsonl.open("r+b") as fh:
            fh.truncate(keep)
        data = data[:keep]
    done = set()
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        try:
            done.add(int(json.loads(line)["index"]))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{jsonl}:{n} is not a ZoomWorld record ({err}); remove the file to start over") from None
    return done


def export_folder(variant: str, split: str, n: int, out_dir: str | os.PathLike[str], start: int = 0,
                  **kw: Any) -> Path:
    """Write samples ``start`` .. ``start + n - 1`` of ``split`` to ``out_dir``, resuming an interrupted run.

    Layout: ``images/{split}_{index:06d}.png``, ``{split}.jsonl`` (one :meth:`ZoomWorldSample.to_json` record per
    line, plus ``image``: the PNG's relative path) and ``meta.json`` (variant, alphabet, mix, size_range, version,
    splits). Each image is written before its JSONL line, and each line is flushed on its own, so a killed run
    leaves only complete records; indices already in the JSONL are skipped, never rewritten.

    Args:
        variant: "hr" or "doc".
        split: "train", "val" or "test".
        n: number of samples.
        out_dir: output folder (created if needed).
        start: first index.
        **kw: alphabet, mix, size_range, as for :func:`generate`.

    Returns:
        The output folder.
    """
    from tqdm import tqdm

    if n < 0 or start < 0:
        raise ValueError(f"n and start must be >= 0, got n={n}, start={start}")
    meta = _meta(variant, split, kw)
    if n:
        seed_for(split, start + n - 1)  # the whole range must lie in the split
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    _merge_meta(out, meta)
    jsonl = out / f"{split}.jsonl"
    done = _done_indices(jsonl)
    todo = [i for i in range(start, start + n) if i not in done]
    with jsonl.open("a", encoding="utf-8") as fh, tqdm(total=n, initial=n - len(todo), unit="img",
                                                       desc=f"zoomworld {variant}/{split}", disable=None) as bar:
        for index in todo:
            s = sample(variant, split, index, **kw)
            rel = f"images/{split}_{index:06d}.png"
            tmp = out / f"{rel}.tmp"
            s.image.save(tmp, format="PNG")
            os.replace(tmp, out / rel)  # a complete image exists before its record does
            fh.write(json.dumps({"image": rel, **s.to_json()}) + "\n")
            fh.flush()
            bar.update(1)
    logger.info("wrote %d new %s/%s samples to %s", len(todo), variant, split, out)
    return out
