"""`compare --bench TASK:PATH` end to end on small folders in the benchmarks' own layouts, on the bundled model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_fixtures import make_docvqa_repo, make_vstar_folder, vstar_record

from qzoom_agent.bench import runner
from qzoom_agent.cli import main


def _compare(bench: str, out: Path, *extra: str) -> int:
    return main(["compare", "--bench", bench, "--agents", "plain@256,qzoom", "--model", "zoomworld-tiny",
                 "--device", "cpu", "--out", str(out), "--json", *extra])


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / runner.RESULTS).read_text().splitlines()]


def test_vstar_folder_runs_every_question_with_its_scorer_and_preset(tmp_path, capsys):
    folder = make_vstar_folder(tmp_path, 4)
    out = tmp_path / "run"
    assert _compare(f"vstar:{folder}", out) == 0
    summary = json.loads(capsys.readouterr().out)
    recs = _records(out)
    assert len(recs) == 8 and summary["agents"]["qzoom"]["n"] == 4  # every question of the folder
    assert {r["task"] for r in recs} == {"vstar"}
    for r in recs:
        ref = vstar_record(r["index"])
        assert r["truth"] == ref["label"] and r["category"] == ref["category"]
        assert r["score"] in (0.0, 1.0) and r["correct"] == (r["score"] == 1.0) and r["error"] is None
    run = json.loads((out / runner.RUN).read_text())
    assert run["args"]["max_new_tokens"] == 16  # V*'s own answer budget
    assert run["task"] == "vstar" and run["full_size"] == 191 and run["args"]["preset"] == "auto"
    assert run["budgets"] == {"plain@256": [256, 256], "qzoom": [512, 576]}  # V*'s floor of 512, capped
    assert all(r["visual_tokens"] >= 512 for r in recs if r["agent"] == "qzoom")  # the floor is applied
    assert all(r["visual_tokens"] <= 256 for r in recs if r["agent"] == "plain@256")
    for name, stats in summary["agents"].items():
        mine = [r for r in recs if r["agent"] == name]
        assert stats["accuracy"] == pytest.approx(sum(r["score"] for r in mine) / len(mine))
    assert set(summary["agents"]["qzoom"]["accuracy_by_family"]) == {"direct_attributes", "relative_position"}


def test_the_task_preset_sets_the_thresholds():
    cfg = runner.CompareConfig("vstar:unused", ["qzoom"], 1, 0, "unused", device="cpu")
    model = runner._load_model(cfg, "vstar")
    assert model.config.roi_threshold == 0.03 and model.config.gate_threshold == 0.02  # Qwen2.5-VL-7B's V* values
    own = runner._load_model(cfg, None).config
    assert (own.roi_threshold, own.gate_threshold) != (0.03, 0.02)


def test_missing_images_are_named_before_anything_runs(tmp_path, capsys):
    folder = make_vstar_folder(tmp_path, 3)
    gone = vstar_record(1)["image"]
    (folder / gone).unlink()
    out = tmp_path / "run"
    assert _compare(f"vstar:{folder}", out) == 2
    err = capsys.readouterr().err
    assert "1 of 3 images are missing" in err and Path(gone).name in err
    assert not (out / runner.RESULTS).exists()


def test_anls_scores_are_fractional_and_averaged(tmp_path, capsys):
    repo = make_docvqa_repo(tmp_path / "DocVQA", 2)
    out = tmp_path / "run"
    assert _compare(f"docvqa:{repo}", out, "--max-new-tokens", "4") == 0
    recs = _records(out)
    assert len(recs) == 4 and {r["task"] for r in recs} == {"docvqa"}
    assert all(0.0 <= r["score"] <= 1.0 for r in recs)
    assert all(r["answers"] and r["truth"] == r["answers"][0] for r in recs)


def test_unknown_task_and_missing_source(tmp_path, capsys):
    assert _compare("nosuch:x", tmp_path / "a") == 2
    assert "unknown bench" in capsys.readouterr().err
    assert _compare("vstar:", tmp_path / "b") == 2
    assert "needs a source" in capsys.readouterr().err
    assert _compare(f"vstar:{tmp_path / 'nowhere'}", tmp_path / "c") == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_qzoom_agents_answer_under_the_thresholds_of_their_view():
    from qzoom_agent.bench import registry
    from qzoom_agent.presets import thresholds_at

    cfg = runner.CompareConfig("docvqa:unused", ["qzoom@576"], 1, 0, "unused", device="cpu")
    model = runner._load_model(cfg, "docvqa")
    ctx = registry.AgentContext(model, thresholds_at=lambda tokens: thresholds_at("docvqa", "qwen2_5_vl", tokens))
    small, large = registry.make_agent("qzoom@576", ctx), registry.make_agent("qzoom@2048", ctx)
    assert small.thresholds == {"roi_threshold": 0.125, "gate_threshold": 0.05}  # DocVQA's own
    assert large.thresholds == {"roi_threshold": 0.04, "gate_threshold": 0.02}  # the sweep's set from 2048 on
    seen = []
    real_answer = model.answer

    def spy(*args, **kwargs):
        seen.append((model.config.roi_threshold, model.config.gate_threshold))
        return real_answer(*args, **kwargs)

    model.answer = spy
    model.config.roi_threshold = 0.5
    from bench_fixtures import make_image

    large.run(make_image(0), "What is the date?")
    assert seen == [(0.04, 0.02)] and model.config.roi_threshold == 0.5  # set for the answer, then put back
    assert registry.make_agent("plain@2048", ctx).__class__.__name__ == "PlainAgent"  # plain agents take none
