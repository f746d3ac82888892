"""A `compare` run directory on disk: results read back safely, and the shards of a multi-process run merged.

``results.jsonl`` holds one line per (question, agent), appended and flushed as each answer comes, so a killed run
loses at most the line being written. Under ``accelerate launch`` (or ``torchrun``) each process appends to its own
``results.shardR.jsonl`` instead; the main process then merges every shard into ``results.jsonl`` in question order
and removes the shard files. Both kinds of file count as done when a run resumes, whatever the number of processes
was, so a shard killed mid-run is resumed by the next launch.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RESULTS = "results.jsonl"
SHARD_GLOB = "results.shard*.jsonl"


def shard_path(out: Path, rank: int) -> Path:
    """The results file process ``rank`` of a sharded run appends to."""
    return out / f"results.shard{rank}.jsonl"


def load_results(path: Path) -> list[dict[str, Any]]:
    """Read a results file, first record of each (index, agent) pair only.

    A torn last line (no newline: a run killed mid-write) is cut off and logged, so appending can resume; other
    unreadable lines are skipped and logged. Complete lines are never changed.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        logger.warning("%s: dropping a half-written last line (%d bytes); its pair will be rerun", path,
                       len(data) - keep)
        with path.open("r+b") as fh:
            fh.truncate(keep)
        data = data[:keep]
    records, seen = [], set()
    for lineno, line in enumerate(data.split(b"\n")[:-1], 1):
        try:
            rec = json.loads(line.decode("utf-8"))
            key = (int(rec["index"]), str(rec["agent"]))
        except (ValueError, KeyError, TypeError):
            logger.warning("%s:%d is not a result record; skipped", path, lineno)
            continue
        if key not in seen:
            seen.add(key)
            records.append(rec)
    return records


def load_all(out: Path) -> list[dict[str, Any]]:
    """Records of ``results.jsonl`` and of any unmerged shard files, first record of each pair only."""
    records, seen = [], set()
    for path in [out / RESULTS, *sorted(out.glob(SHARD_GLOB))]:
        for rec in load_results(path):
            key = (int(rec["index"]), rec["agent"])
            if key not in seen:
                seen.add(key)
                records.append(rec)
    return records


def merge_shards(out: Path, indices: Sequence[int], agents: Sequence[str]) -> int:
    """Append the shard files' records missing from ``results.jsonl`` to it, in question order (``indices``) and
    then agent order, and remove the shard files once the merged lines are on disk.

    Returns:
        The number of records appended.
    """
    shards = sorted(out.glob(SHARD_GLOB))
    if not shards:
        return 0
    results = out / RESULTS
    done = {(int(r["index"]), r["agent"]) for r in load_results(results)}
    position = {index: k for k, index in enumerate(indices)}
    order = {name: k for k, name in enumerate(agents)}
    new = [r for r in load_all(out) if (int(r["index"]), r["agent"]) not in done]
    new.sort(key=lambda r: (position.get(int(r["index"]), len(position)), order.get(r["agent"], len(order))))
    with results.open("a", encoding="utf-8") as fh:
        for rec in new:
            fh.write(json.dumps(rec) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    for path in shards:
        path.unlink()
    logger.info("merged %d records from %d shard files into %s", len(new), len(shards), results)
    return len(new)


@dataclass
class Shard:
    """This process's place in a multi-process run (``rank`` of ``world``); one process: rank 0 of 1.

    Attributes:
        rank: the process index.
        world: the number of processes.
        device: the process's own CUDA device under a multi-GPU launch, else None (the run's --device holds).
        state: accelerate's ``PartialState`` when distributed (for barriers), else None.
    """

    rank: int = 0
    world: int = 1
    device: str | None = None
    state: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every process gets here (nothing to wait for in a single process)."""
        if self.state is not None:
            self.state.wait_for_everyone()

    def take(self, items: Sequence[Any]) -> list[Any]:
        """This process's share of ``items``: every ``world``-th one, starting at ``rank``."""
        return list(items[self.rank::self.world])


def current_shard() -> Shard:
    """The shard of this process: from the environment ``accelerate launch`` and ``torchrun`` set (``WORLD_SIZE``);
    the process group is started through accelerate (gloo on CPU, NCCL on GPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Shard()
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    device = str(state.device) if state.device.type == "cuda" else None
    return Shard(state.process_index, state.num_processes, device, state)
