"""`compare` sharded over processes: two CPU processes started by `accelerate launch` give the records of one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qzoom_agent.bench import rundir

ARGS = ["--bench", "zoomworld:hr", "--agents", "lowres,qzoom-always", "--n", "5", "--seed", "3",
        "--model", "zoomworld-tiny", "--max-new-tokens", "3", "--device", "cpu"]
TIMING = {"latency_s"}  # the only fields allowed to differ between two runs of the same questions


def _cli(out: Path, *launcher: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [*launcher, "-m", "qzoom_agent.cli", "compare", *ARGS, "--out", str(out), "--json"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _records(out: Path) -> dict[tuple[int, str], dict]:
    lines = (out / rundir.RESULTS).read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    assert len(recs) == len({(r["index"], r["agent"]) for r in recs}), "a pair was written twice"
    return {(r["index"], r["agent"]): {k: v for k, v in r.items() if k not in TIMING} for r in recs}


def test_two_processes_give_the_single_process_records(tmp_path):
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if launcher is None:
        pytest.skip("accelerate's launcher is not installed")
    single = _cli(tmp_path / "single", sys.executable)
    assert single.returncode == 0, single.stderr[-2000:]
    # accelerate's multi-process launcher (torchrun); on a machine without GPUs each process runs on the CPU
    sharded = _cli(tmp_path / "sharded", launcher, "launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no")
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    one, two = _records(tmp_path / "single"), _records(tmp_path / "sharded")
    assert len(one) == 10 and one == two
    assert not list((tmp_path / "sharded").glob(rundir.SHARD_GLOB))  # merged, then removed
    printed = [line for line in sharded.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1, "only the main process prints the summary"
    summary = json.loads(printed[0])
    assert summary["agents"]["lowres"]["n"] == 5 and summary["agents"]["qzoom-always"]["n"] == 5
    assert summary["agents"]["qzoom-always"]["zooms_mean"] == 1.0


def test_merge_puts_shards_in_question_order_and_keeps_results(tmp_path):
    def rec(index: int, agent: str) -> str:
        return json.dumps({"index": index, "agent": agent, "correct": True}) + "\n"

    (tmp_path / rundir.RESULTS).write_text(rec(7, "a"))
    rundir.shard_path(tmp_path, 0).write_text(rec(2, "b") + rec(7, "a") + rec(2, "a"))
    rundir.shard_path(tmp_path, 1).write_text(rec(7, "b") + rec(4, "a") + rec(4, "b")[:9])  # torn last line
    assert {(r["index"], r["agent"]) for r in rundir.load_all(tmp_path)} == {(7, "a"), (2, "b"), (2, "a"),
                                                                              (7, "b"), (4, "a")}
    assert rundir.merge_shards(tmp_path, [7, 2, 4], ["a", "b"]) == 4
    merged = [json.loads(line) for line in (tmp_path / rundir.RESULTS).read_text().splitlines()]
    assert [(r["index"], r["agent"]) for r in merged] == [(7, "a"), (7, "b"), (2, "a"), (2, "b"), (4, "a")]
    assert not list(tmp_path.glob(rundir.SHARD_GLOB))
    assert rundir.merge_shards(tmp_path, [7, 2, 4], ["a", "b"]) == 0


def test_shard_takes_every_world_th_item():
    items = list(range(7))
    shares = [rundir.Shard(rank, 3).take(items) for rank in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(shares, [])) == items
    assert rundir.Shard().take(items) == items and rundir.current_shard().world == 1
