"""`sweep`: group points (mean accuracy, size-weighted harmonic throughput), the headline numbers, and a real run."""

from __future__ import annotations

import json
import math

import pytest
from bench_fixtures import make_vstar_folder

from qzoom_agent.bench import metrics, sweep
from qzoom_agent.cli import main


def test_group_point_is_the_size_weighted_harmonic_mean():
    points = {"doc": {"accuracy": 90.0, "sps": 4.0, "visual_tokens": 500.0},
              "ocr": {"accuracy": 70.0, "sps": 1.0, "visual_tokens": 300.0}}
    g = sweep.group_point(points, {"doc": 5000, "ocr": 1000})
    # 6000 samples take 5000/4 + 1000/1 seconds
    assert math.isclose(g["sps"], 6000 / (1250 + 1000)) and g["accuracy"] == 80.0
    equal = sweep.group_point(points, {"doc": 1, "ocr": 1})
    assert math.isclose(equal["sps"], 2 / (1 / 4 + 1))  # plain harmonic mean with equal sizes
    assert sweep.group_point({"doc": points["doc"], "ocr": None}, {"doc": 1, "ocr": 1}) is None


def test_task_point_counts_samples_over_total_latency():
    recs = [{"score": 1.0, "latency_s": 0.5, "visual_tokens": 100}, {"score": 0.25, "latency_s": 1.5,
                                                                     "visual_tokens": 300},
            {"correct": True, "latency_s": 2.0, "visual_tokens": 200}]  # an old record without a score
    for r in recs:
        r.update(forward_passes=1, generated_tokens=1)
    p = sweep.task_point(metrics.summarize_agent(recs))  # from the compare summary's entry of the agent
    assert math.isclose(p["accuracy"], 100 * 2.25 / 3) and math.isclose(p["sps"], 3 / 4.0)
    assert p["visual_tokens"] == 200 and sweep.task_point(metrics.summarize_agent([])) is None


@pytest.mark.parametrize("tolerance, matched, speedup", [(0.0, "qzoom@1024", 1.5), (1.5, "qzoom@576", 3.0)])
def test_headline_takes_the_fastest_point_at_the_plain_peak(tolerance, matched, speedup):
    group = {"plain@576": {"accuracy": 70.0, "sps": 4.0}, "plain@4096": {"accuracy": 78.0, "sps": 1.0},
             "plain@1024": {"accuracy": 74.0, "sps": 2.0}, "qzoom@576": {"accuracy": 77.0, "sps": 3.0},
             "qzoom@1024": {"accuracy": 78.0, "sps": 1.5}, "qzoom@4096": {"accuracy": 80.5, "sps": 0.5}}
    h = sweep.headline(group, tolerance)
    assert h["plain_peak"] == "plain@4096" and h["qzoom_best"] == "qzoom@4096"
    assert h["matched"] == matched and math.isclose(h["speedup"], speedup) and math.isclose(h["gain"], 2.5)


def test_headline_without_a_match_or_a_series():
    group = {"plain@576": {"accuracy": 80.0, "sps": 1.0}, "qzoom@576": {"accuracy": 60.0, "sps": 2.0}}
    h = sweep.headline(group)
    assert h["matched"] is None and h["speedup"] is None and h["gain"] == -20.0
    assert sweep.headline({"plain@576": group["plain@576"]}) is None
    assert "no Q-Zoom point reaches" in sweep.markdown({"tasks": {"t": {"plain@576": None, "qzoom@576": None}},
                                                          "group": {"plain@576": None, "qzoom@576": None},
                                                          "headline": h})


def test_sweep_runs_two_benches_and_resumes(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--bench", "zoomworld:hr,zoomworld:doc", "--budgets", "64,256", "--n", "2", "--out", str(out),
            "--max-new-tokens", "2", "--device", "cpu", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["tasks"]) == {"zoomworld-hr", "zoomworld-doc"}
    assert set(summary["group"]) == {"plain@64", "plain@256", "qzoom@64", "qzoom@256"}
    for task in ("zoomworld-hr", "zoomworld-doc"):
        lines = (out / task / "results.jsonl").read_text().splitlines()
        assert len(lines) == 8  # 2 questions x 4 agents
    g = summary["group"]
    assert g["plain@256"]["visual_tokens"] > g["plain@64"]["visual_tokens"]
    assert summary["headline"] is not None and summary["weights"] == {"zoomworld-hr": 2.0, "zoomworld-doc": 2.0}
    assert (out / "sweep_pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "speed-up at matched accuracy" in (out / "sweep.md").read_text()
    before = (out / "zoomworld-hr" / "results.jsonl").read_bytes()
    assert main(argv) == 0  # resumed: nothing is rerun
    assert (out / "zoomworld-hr" / "results.jsonl").read_bytes() == before


@pytest.mark.parametrize("extra, message", [
    (["--bench", "zoomworld:hr,zoomworld:hr"], "appears twice"),
    (["--bench", "zoomworld:xx"], "unknown bench"),
    (["--bench", "zoomworld:hr", "--budgets", "0,64"], "budget"),
    (["--bench", "zoomworld:hr", "--agents", "plain@64"], "repeat"),
    (["--bench", "zoomworld:hr", "--tolerance", "-1"], "tolerance"),
])
def test_bad_input_is_one_line(tmp_path, capsys, extra, message):
    argv = ["sweep", "--out", str(tmp_path / "x"), "--budgets", "64", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_a_real_benchmark_weighs_by_its_full_size(tmp_path, capsys):
    folder = make_vstar_folder(tmp_path, 2)
    out = tmp_path / "sweep"
    argv = ["sweep", "--bench", f"vstar:{folder},zoomworld:hr", "--budgets", "256", "--n", "2", "--out", str(out),
            "--max-new-tokens", "2", "--device", "cpu", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["weights"] == {"vstar": 191.0, "zoomworld-hr": 2.0}  # V*'s 191 questions, not the 2 run
    tasks, g = summary["tasks"], summary["group"]["qzoom@256"]
    v, z = tasks["vstar"]["qzoom@256"], tasks["zoomworld-hr"]["qzoom@256"]
    assert math.isclose(g["sps"], 193 / (191 / v["sps"] + 2 / z["sps"]))
    assert math.isclose(g["accuracy"], (v["accuracy"] + z["accuracy"]) / 2)
