"""`compare`: scoring, the interleaved runner, resuming, seeds and bad input, on a tiny random model."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

zoomworld = pytest.importorskip("qzoom_agent.zoomworld")

from qzoom_agent import boxes, scoring  # noqa: E402
from qzoom_agent.bench import metrics  # noqa: E402
from qzoom_agent.bench.agents import AgentResult  # noqa: E402
from qzoom_agent.bench.compare_cli import add_compare_parser  # noqa: E402
from qzoom_agent.bench.registry import parse_budgets  # noqa: E402
from qzoom_agent.bench.runner import question_indices  # noqa: E402
from qzoom_agent.config import budget_for  # noqa: E402
from qzoom_agent.tiny import make_tiny  # noqa: E402

SUMMARY_KEYS = {"accuracy", "accuracy_fine", "accuracy_coarse", "latency_s_mean", "visual_tokens_mean",
                "forward_passes_mean", "tool_calls_mean", "n", "zooms_mean", "roi_coverage_mean", "roi_hit_fine",
                "accuracy_by_family", "roi_hit_by_family", "generated_tokens_mean", "vision_encodes_mean",
                "layer_tokens_mean", "tool_call_rate_fine", "tool_call_rate_coarse", "external_calls_mean",
                "failed_mean"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "model", "qwen2_5_vl")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="qzoom-agent")
    add_compare_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["compare", *argv])


def _argv(model: Path, out: Path, n: int = 3, seed: int = 0, *extra: str) -> list[str]:
    return ["--bench", "zoomworld:hr", "--agents", "lowres,highres", "--n", str(n), "--seed", str(seed),
            "--out", str(out), "--model", str(model), "--lowres-tokens", "16", "--highres-tokens", "64",
            "--max-new-tokens", "2", *extra]


def _run(argv: list[str], capsys) -> str:
    args = _parse(argv)
    assert args.func(args) == 0
    return capsys.readouterr().out


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


# ---- metrics -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("  Left. ", "left"), ('"7K"', "7k"), ("(A)", "a"), ("A.", "a"), ("two   words\n", "two words"),
    ("'diamond'!", "diamond"), ("A-3", "a-3"), ("", ""),
])
def test_normalize(text, expected):
    assert scoring.normalize(text) == expected


OPTIONS = ["7K", "7X", "QQ", "A1"]


@pytest.mark.parametrize("pred, answer, options, expected", [
    ("Diamond.", "diamond", None, True),
    ("diamonds", "diamond", None, False),
    ("right", "left", None, False),
    ("3", "3", None, True),
    ("", "3", None, False),
    ("B", "B", OPTIONS, True),
    ("(B)", "B", OPTIONS, True),
    ("b.", "B", OPTIONS, True),
    ("B) 7X", "B", OPTIONS, True),
    ("(B) 7K", "B", OPTIONS, False),  # letter and text disagree
    ("7x", "B", OPTIONS, True),  # the option text
    ("7X", "7X", OPTIONS, True),  # answer given as option text
    ("B", "7X", OPTIONS, True),  # ... and predicted as its letter
    ("A", "B", OPTIONS, False),
    ("7K", "B", OPTIONS, False),
    ("A1", "D", OPTIONS, True),  # "A1" is option text, not the letter A
    ("E", "B", OPTIONS, False),
])
def test_is_correct(pred, answer, options, expected):
    assert scoring.is_correct(pred, answer, options) is expected


def test_box_geometry():
    assert boxes.iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert boxes.iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert boxes.iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert boxes.coverage((0, 0, 15, 100), (10, 10, 20, 20)) == 0.5
    assert boxes.coverage(None, (0, 0, 1, 1)) is None and boxes.iou((0, 0, 1, 1), None) is None


def test_budgets_and_agent_result():
    assert budget_for(4096) == (256, 4096) and budget_for(64) == (64, 64)
    assert parse_budgets("256,576, 1024") == [256, 576, 1024]
    assert AgentResult("x", 0.1, 16, 3, 2).tool_calls == 0


# ---- runs --------------------------------------------------------------------------------------------------------
def _recompute(records: list[dict], agents: list[str]) -> dict:
    def mean(values):
        values = list(values)
        return sum(values) / len(values) if values else None

    out = {}
    for name in agents:
        rows = [r for r in records if r["agent"] == name]
        out[name] = {
            "accuracy": mean(r["correct"] for r in rows),
            "accuracy_fine": mean(r["correct"] for r in rows if r["kind"] == "fine"),
            "accuracy_coarse": mean(r["correct"] for r in rows if r["kind"] == "coarse"),
            "latency_s_mean": mean(r["latency_s"] for r in rows),
            "visual_tokens_mean": mean(r["visual_tokens"] for r in rows),
            "forward_passes_mean": mean(r["forward_passes"] for r in rows),
            "tool_calls_mean": mean(r["tool_calls"] for r in rows),
            "n": len(rows),
            "zooms_mean": mean(r["zooms"] for r in rows),
            "roi_coverage_mean": None,  # plain agents propose no boxes
            "roi_hit_fine": None,
            "accuracy_by_family": {f: mean(r["correct"] for r in rows if r["family"] == f)
                                   for f in sorted({r["family"] for r in rows})},
            "roi_hit_by_family": {},
            "generated_tokens_mean": mean(r["generated_tokens"] for r in rows),
            "vision_encodes_mean": mean(r["vision_encodes"] for r in rows),
            "layer_tokens_mean": mean(r["layer_tokens"] for r in rows),
            "tool_call_rate_fine": mean(r["tool_calls"] > 0 for r in rows if r["kind"] == "fine"),
            "tool_call_rate_coarse": mean(r["tool_calls"] > 0 for r in rows if r["kind"] == "coarse"),
            "external_calls_mean": mean(r["external_calls"] for r in rows),
            "failed_mean": mean(r["error"] is not None for r in rows),
        }
    return out


def test_run_writes_everything(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    stdout = _run(_argv(tiny_model, out, 3, 0, "--budgets", "16,32", "--json"), capsys)
    summary = json.loads(stdout)  # exactly one JSON object
    agents = ["lowres", "highres", "plain@16", "plain@32"]
    assert list(summary) == ["agents"] and list(summary["agents"]) == agents
    for stats in summary["agents"].values():
        assert set(stats) == SUMMARY_KEYS and stats["n"] == 3
        for key in ("accuracy", "accuracy_fine", "accuracy_coarse"):
            assert stats[key] is None or 0.0 <= stats[key] <= 1.0
        assert stats["tool_calls_mean"] == 0
    assert summary["agents"]["lowres"]["visual_tokens_mean"] <= 16
    assert summary["agents"]["plain@32"]["visual_tokens_mean"] <= 32
    records = _lines(out)
    assert len(records) == 3 * len(agents)
    assert summary == {"agents": _recompute(records, agents)}
    assert json.loads((out / "summary.json").read_text()) == summary
    for rec in records:
        assert rec["correct"] is scoring.is_correct(rec["answer"], rec["truth"], rec["options"])
        assert rec["kind"] in ("fine", "coarse") and rec["variant"] == "hr" and rec["zooms"] == 0
        assert rec["target_box"] is not None and rec["bbox"] is None and rec["iou"] is None
    run = json.loads((out / "run.json").read_text())
    assert run["agents"] == agents and run["args"]["n"] == 3 and run["args"]["seed"] == 0
    assert run["model_path"] == str(tiny_model.resolve()) and run["date"]
    assert "| lowres | 3 |" in (out / "summary.md").read_text()
    assert "Accuracy by question family" in (out / "summary.md").read_text()
    assert (out / "accuracy_by_budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_text_output_and_interleaving(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    stdout = _run(_argv(tiny_model, out, 3, 5), capsys)
    assert stdout.startswith("| agent | n | accuracy | fine | coarse |") and "| highres | 3 |" in stdout
    records = _lines(out)
    indices = question_indices(5, 3)
    assert [r["index"] for r in records] == [i for i in indices for _ in range(2)]
    # both agents answer each question before the next; who goes first rotates with the question
    firsts = [records[2 * q]["agent"] for q in range(3)]
    assert firsts == [["lowres", "highres"][i % 2] for i in indices]
    assert not (out / "accuracy_by_budget.png").exists()  # no budget sweep


def test_resume(tiny_model, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    _run(_argv(tiny_model, out, 2), capsys)
    results = out / "results.jsonl"
    before = results.read_bytes()
    _run(_argv(tiny_model, out, 2), capsys)  # same arguments: nothing to add
    assert results.read_bytes() == before
    with pytest.raises(ValueError, match="other arguments .*n.*choose another --out"):
        _run(_argv(tiny_model, out, 4), capsys)
    with pytest.raises(ValueError, match="seed"):
        _run(_argv(tiny_model, out, 2, 1), capsys)
    assert results.read_bytes() == before

    out = tmp_path / "interrupted"
    _run(_argv(tiny_model, out, 3), capsys)
    results = out / "results.jsonl"
    lines = results.read_text().splitlines(keepends=True)
    assert len(lines) == 6
    results.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])  # killed mid-write
    with caplog.at_level(logging.WARNING, logger="qzoom_agent.bench.rundir"):
        _run(_argv(tiny_model, out, 3), capsys)
    assert "half-written" in caplog.text
    final = results.read_text().splitlines(keepends=True)
    assert final[:3] == lines[:3]
    pairs = [(r["index"], r["agent"]) for r in _lines(out)]
    assert len(pairs) == 6 and set(pairs) == {(i, a) for i in question_indices(0, 3) for a in ("lowres", "highres")}
    summary = json.loads((out / "summary.json").read_text())
    assert summary == {"agents": _recompute(_lines(out), ["lowres", "highres"])}


def test_seeds_pick_held_out_questions(tiny_model, tmp_path, capsys):
    start, stop = zoomworld.SPLITS["test"]
    assert set(question_indices(0, 20)).isdisjoint(question_indices(1, 20))
    assert question_indices(3, 20) == question_indices(3, 20)
    assert question_indices(3, 5) == question_indices(3, 20)[:5]
    assert all(0 <= i < stop - start for i in question_indices(7, 1000))
    seen = {}
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        _run(_argv(tiny_model, out, 3, seed), capsys)
        records = _lines(out)
        assert all(start <= r["seed"] < stop and r["split"] == "test" for r in records)
        assert all(r["seed"] == zoomworld.seed_for("test", r["index"]) for r in records)
        seen[seed] = {r["index"] for r in records}
    assert seen[0] != seen[1]


@pytest.mark.parametrize("extra, message", [
    (["--bench", "zoomworld:xyz"], "unknown bench 'zoomworld:xyz'; choose one of zoomworld:hr, zoomworld:doc"),
    (["--bench", "foo"], "unknown bench 'foo'"),
    (["--agents", "lowres,bogus"],
     "unknown agent 'bogus'; choose from lowres, highres, oracle, qzoom, qzoom-always, qzoom-never, deepeyes, "
     "deepeyes-cached, qzoom-tool, vicrop, zoomeye, plain@N, qzoom@N, qzoom-always@N, qzoom-never@N, deepeyes@N, "
     "deepeyes-cached@N, crop@DIALECT"),
    (["--agents", "deepeyes@-3"], "deepeyes@TOKENS must be a positive integer"),
    (["--agents", "qzoom@0"], "qzoom@TOKENS must be a positive integer, got 0"),
    (["--agents", "plain@x"], "plain@TOKENS must be a positive integer"),
    (["--agents", "lowres,lowres"], "agents repeat: lowres"),
    (["--n", "0"], "--n must be a positive integer, got 0"),
    (["--budgets", "256,,1024"], "--budgets must be comma-separated positive integers"),
    (["--budgets", "256,abc"], "each --budgets value must be a positive integer, got 'abc'"),
    (["--budgets", "0"], "each --budgets value must be a positive integer, got 0"),
    (["--budgets", "64,64"], "--budgets has repeated values"),
    (["--highres-tokens", "0"], "--highres-tokens must be a positive integer"),
    (["--alphabet", "ab"], "alphabet"),
])
def test_bad_input(tmp_path, extra, message, capsys):
    argv = _argv(tmp_path / "model", tmp_path / "out", 3, 0, *extra)
    with pytest.raises(ValueError) as err:
        _run(argv, capsys)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # rejected before anything is written


def test_oracle_agent_sees_the_target_and_the_model_alphabet_is_used(tiny_model, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "zoomworld.json").write_text(json.dumps({"alphabet": "0123456789"}))
    out = tmp_path / "run"
    argv = ["--bench", "zoomworld:doc", "--agents", "oracle,lowres", "--n", "8", "--seed", "2", "--out", str(out),
            "--model", str(model), "--lowres-tokens", "16", "--max-new-tokens", "2", "--json"]
    summary = json.loads(_run(argv, capsys))
    assert summary["agents"]["oracle"]["n"] == 8
    records = _lines(out)
    assert json.loads((out / "run.json").read_text())["args"]["alphabet"] == "0123456789"
    reads = [r for r in records if r["family"] == "read"]
    assert reads and all(set(r["truth"]) <= set("0123456789") for r in reads)
    for rec in records:
        if rec["agent"] == "oracle":
            assert 0 < rec["visual_tokens"] <= 256 and rec["bbox"] is None


@pytest.mark.parametrize("box", [(500, 400, 540, 440), (0, 0, 60, 32), (950, 970, 1000, 1000)])
def test_oracle_view_is_the_target_with_context_enlarged_three_times(box):
    from PIL import Image

    from qzoom_agent.bench.oracle import oracle_view

    image = Image.new("RGB", (1000, 1000), "white")
    image.paste((255, 0, 0), box)
    view = oracle_view(image, box)
    w, h = box[2] - box[0], box[3] - box[1]
    left, top = max(0, box[0] - w), max(0, box[1] - h)
    right, bottom = min(1000, box[2] + w), min(1000, box[3] + h)
    assert view.size == (3 * (right - left), 3 * (bottom - top))
    red = np.argwhere(np.all(np.asarray(view) == (255, 0, 0), axis=-1))
    # the target, scaled 3x, sits where its offset in the crop says (up to resampling at its edges)
    assert abs(red[:, 1].min() - 3 * (box[0] - left)) <= 2 and abs(red[:, 0].min() - 3 * (box[1] - top)) <= 2
    assert abs(red[:, 1].max() + 1 - 3 * (box[2] - left)) <= 2


def test_qzoom_agents_report_zooms_and_roi_quality(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--bench", "zoomworld:hr", "--agents", "qzoom,qzoom-always,qzoom-never", "--n", "3", "--seed", "4",
            "--out", str(out), "--model", str(tiny_model), "--qzoom-tokens", "64", "--max-new-tokens", "2", "--json"]
    summary = json.loads(_run(argv, capsys))["agents"]
    for name in ("qzoom", "qzoom-always", "qzoom-never"):
        assert set(summary[name]) == SUMMARY_KEYS
    never = summary["qzoom-never"]
    assert never["zooms_mean"] == 0 and never["roi_hit_fine"] is None and never["roi_hit_by_family"] == {}
    records = _lines(out)
    gate = json.loads((out / "summary.json").read_text())["gate"]
    by = {(r["agent"], r["index"]): r for r in records}
    informative = [i for (a, i), r in by.items()
                   if a == "qzoom-always" and (r["correct"] or by["qzoom-never", i]["correct"])]
    assert set(gate) == {"qzoom-always"} and gate["qzoom-always"]["scored"] == len(informative)
    always = [r for r in records if r["agent"] == "qzoom-always"]
    assert all((r["gate_score"] is None) == (r["agent"] == "qzoom-never") for r in records)
    assert all(r["visual_tokens"] <= 2 * 64 for r in records)  # each view obeys the cap
    fine = [r for r in always if r["kind"] == "fine"]
    expected = {f: sum(boxes.roi_hit(r["bbox"], r["target_box"]) for r in fine if r["family"] == f)
                / sum(r["family"] == f for r in fine) for f in {r["family"] for r in fine}}
    assert expected and summary["qzoom-always"]["roi_hit_by_family"] == pytest.approx(expected)
    assert "RoI hit (box covers" in (out / "summary.md").read_text()  # the fine families' hit rates get a table
    for r in always:  # a forced zoom has a box whenever the map fires; its coverage is scored
        assert (r["bbox"] is None) == (r["zooms"] == 0)
        assert r["bbox"] is None or r["coverage"] == boxes.coverage(r["bbox"], r["target_box"])


def test_pareto_and_matched_accuracy(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--bench", "zoomworld:hr", "--agents", "qzoom@16,qzoom-always@32", "--budgets", "16,64", "--n", "3",
            "--out", str(out), "--model", str(tiny_model), "--max-new-tokens", "2"]
    text = _run(argv, capsys)
    summary = json.loads((out / "summary.json").read_text())
    run = json.loads((out / "run.json").read_text())
    assert run["budgets"]["qzoom@16"] == [16, 16] and run["budgets"]["qzoom-always@32"] == [32, 32]
    records = [r for r in _lines(out) if r["agent"] in ("qzoom@16", "qzoom-always@32")]
    assert all(r["gate_score"] is not None for r in records)  # both ran with their heads
    assert all(r["visual_tokens"] <= 2 * 16 for r in records if r["agent"] == "qzoom@16")
    for key in ("accuracy", "accuracy_fine"):
        m = summary["matched"][key]
        agents = summary["agents"]
        peak = max(agents[a][key] for a in ("plain@16", "plain@64"))
        assert m["plain_peak"][key] == peak and m["qzoom_best"]["agent"] == "qzoom@16"  # only gated agents count
        assert (m["matched"] is None) == (agents["qzoom@16"][key] < peak - 0.01)
        if m["matched"]:
            peak_latency = agents[m["plain_peak"]["agent"]]["latency_s_mean"]
            assert m["speedup"] == pytest.approx(peak_latency / agents["qzoom@16"]["latency_s_mean"])
    assert "## Matched accuracy" in (out / "summary.md").read_text() and "plain peak" in text
    for name in ("pareto.png", "pareto_fine.png"):
        assert (out / name).stat().st_size > 1000


def test_qzoom_agents_need_heads(tiny_model, tmp_path, capsys):
    model = tmp_path / "plain"
    shutil.copytree(tiny_model, model, ignore=shutil.ignore_patterns("qzoom"))
    argv = ["--bench", "zoomworld:hr", "--agents", "qzoom", "--n", "1", "--out", str(tmp_path / "o"),
            "--model", str(model)]
    with pytest.raises(ValueError, match="needs Q-Zoom heads"):
        _run(argv, capsys)


def test_missing_model(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        _run(_argv(tmp_path / "nope", tmp_path / "out"), capsys)


def test_doctests():
    import doctest

    from qzoom_agent import checks, config, loading, presets
    from qzoom_agent.bench import registry, report, sweep

    for module in (metrics, registry, report, scoring, boxes, config, checks, loading, presets, sweep):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_deepeyes_agent_runs_in_compare_with_tool_costs(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--bench", "zoomworld:doc", "--agents", "deepeyes@32,plain@32", "--n", "2", "--seed", "5", "--out",
            str(out), "--model", str(tiny_model), "--max-new-tokens", "2", "--json"]
    summary = json.loads(_run(argv, capsys))["agents"]
    assert set(summary["deepeyes@32"]) == SUMMARY_KEYS and summary["deepeyes@32"]["n"] == 2
    records = [r for r in _lines(out) if r["agent"] == "deepeyes@32"]
    # every turn re-encodes its images, so a question costs at least one 32-token view and one forward pass
    assert all(r["visual_tokens"] >= 1 and r["forward_passes"] >= 1 and r["tool_calls"] >= 0 for r in records)
    assert (out / "pareto.png").is_file()  # the tool agent is a point beside the plain model's
