"""Benchmark adapters: real benchmarks read from their published layouts, each with its own scoring.

``load_task("NAME:SOURCE")`` reads one task. NAME is one of :data:`TASK_NAMES`; SOURCE is

* a local folder: a snapshot of the benchmark's hub dataset (``huggingface-cli download --repo-type dataset ID
  --local-dir DIR``), laid out as its authors publish it (parquet shards under ``data/``, a TSV, ...);
* a local file: one of that snapshot's data files (a parquet shard, the HR-Bench TSV, a V* jsonl);
* a hub id (``owner/name``), read through ``datasets.load_dataset``; offline this fails with a
  :class:`~.base.BenchDataError` that says to pass a local folder.

V* also reads question files whose images live elsewhere: ``vstar:QUESTIONS.jsonl@IMAGE_DIR`` resolves the jsonl's
image names against IMAGE_DIR (without ``@IMAGE_DIR``, against the jsonl's own folder). See :mod:`.vstar`.

Each module states the layout it reads and the reference (lmms-eval 0.7.3) prompt it reproduces:

=====================  ===================================================  ================
task                   module, reference task                               default hub id
=====================  ===================================================  ================
vstar                  :mod:`.vstar`, vstar_bench                           lmms-lab-encoder/vstar-bench
hrbench4k, hrbench8k   :mod:`.hrbench`, hrbench4k / hrbench8k               DreamMr/HR-Bench
mme-realworld-lite     :mod:`.mme_realworld`, mmerealworld_lite             yifanzhang114/MME-RealWorld-lite-lmms-eval
textvqa                :mod:`.docqa`, textvqa_val                           lmms-lab-encoder/textvqa
docvqa, infovqa        :mod:`.docqa`, docvqa_val / infovqa_val              lmms-lab-encoder/DocVQA
chartqa                :mod:`.docqa`, chartqa                               lmms-lab-encoder/ChartQA
ocrbench               :mod:`.ocrbench`, ocrbench                           echo840/OCRBench
=====================  ===================================================  ================
"""

from __future__ import annotations

import importlib

from .base import BenchDataError, BenchItem, Scorer, Task

__all__ = ["TASK_NAMES", "BenchDataError", "BenchItem", "Scorer", "Task", "load_task"]

# task name -> the module that reads it (imported on first use: each pulls in `datasets`)
_MODULES = {
    "vstar": "vstar",
    "hrbench4k": "hrbench",
    "hrbench8k": "hrbench",
    "mme-realworld-lite": "mme_realworld",
    "textvqa": "docqa",
    "docvqa": "docqa",
    "infovqa": "docqa",
    "chartqa": "docqa",
    "ocrbench": "ocrbench",
}
TASK_NAMES: tuple[str, ...] = tuple(_MODULES)
"""The task names ``load_task`` accepts."""


def load_task(spec: str, limit: int | None = None) -> Task:
    """Read the benchmark task ``spec`` = ``NAME:SOURCE`` (a local folder, a local file or a hub id).

    Args:
        spec: e.g. ``"docvqa:/data/DocVQA"``, ``"hrbench8k:/data/HR-Bench/hr_bench_8k.tsv"``,
            ``"chartqa:lmms-lab/ChartQA"``, ``"vstar:/data/vstar_bench_qa.jsonl@/data/vstar_bench"``.
        limit: read only the first ``limit`` questions of the task's stable order (None: all).

    Returns:
        The task: items numbered in a stable order, the benchmark's scorer, preset, official split size and the
        reference evaluation's ``max_new_tokens``. Images are not decoded; ``Task.missing`` names listed images that
        are not on disk (V* only: the other benchmarks embed their images).

    Raises:
        BenchDataError: an unknown NAME (listing the valid ones), a missing SOURCE, a source that does not hold the
            benchmark (missing files or columns), or a hub id that cannot be read (offline).
    """
    name, sep, source = spec.partition(":")
    name, source = name.strip(), source.strip()
    if name not in _MODULES:
        raise BenchDataError(f"unknown task {name!r} in {spec!r}; write NAME:SOURCE with NAME one of "
                             f"{', '.join(TASK_NAMES)}")
    if not sep or not source:
        raise BenchDataError(f"{spec!r} needs a source: {name}:PATH (a local folder or file) or {name}:HUB_ID")
    module = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    return module.load(name, source, limit)
