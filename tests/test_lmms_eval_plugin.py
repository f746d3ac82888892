"""The ``qzoom`` lmms-eval model: its registration (entry point and legacy ``LMMS_EVAL_PLUGINS``) through lmms-eval's
own registry, and `QZoomLMM.generate_until` on the bundled tiny model with real lmms-eval ``Instance`` requests.

lmms-eval is installed without its heavy dependencies (``make venv``: ``pip install --no-deps lmms-eval`` plus
loguru and pytz, all that ``lmms_eval.models`` and ``lmms_eval.api`` import); only the tests that need it skip when
it is absent. No test downloads anything: lmms-eval's real tasks fetch their data sets from the hub, so none runs
here.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from qzoom_agent.integrations.lmms_eval import CLASS_PATH, MODEL_ID, TASK_PRESETS, preset_for_task
from qzoom_agent.integrations.lmms_eval.models import AVAILABLE_MODELS
from qzoom_agent.presets import PRESETS, get_preset

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINT = "qzoom_agent.integrations.lmms_eval:manifests"
HINT = "Answer the question using a single word or phrase."
NO_LMMS = "lmms-eval is not installed (`make venv` installs it without its heavy dependencies)"

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- what needs no lmms-eval ---------------------------------------------------------------------------------------
def test_the_entry_point_is_declared_in_pyproject_and_the_installed_metadata():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["lmms_eval.models"] == {MODEL_ID: ENTRY_POINT}
    assert {"lmms-eval==0.7.3", "filelock<4"} <= set(project["optional-dependencies"]["lmms"])
    found = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == MODEL_ID]
    assert [ep.value for ep in found] == [ENTRY_POINT], (
        "the installed metadata lacks the entry point: reinstall (pip install -e .); a stale qzoom_agent.egg-info "
        "in the working directory also shadows the installed metadata")
    assert found[0].dist is None or found[0].dist.name.replace("_", "-") == "qzoom-agent"


def test_the_legacy_plugin_layout_names_the_same_class():
    # lmms-eval's LMMS_EVAL_PLUGINS loader imports f"{plugin}.models.{name}.{AVAILABLE_MODELS[name]}"
    plugin = "qzoom_agent.integrations.lmms_eval"
    assert {f"{plugin}.models.{name}.{cls}" for name, cls in AVAILABLE_MODELS.items()} == {CLASS_PATH}
    assert MODEL_ID in AVAILABLE_MODELS


@pytest.mark.parametrize("task, preset", [
    ("textvqa_val", "textvqa"), ("docvqa_val", "docvqa"), ("infovqa_val", "infovqa"), ("chartqa", "chartqa"),
    ("ocrbench", "ocrbench"), ("vstar_bench", "vstar"), ("mmerealworld_lite", "mme-realworld"),
    ("hrbench4k", "hrbench"), ("hrbench8k", "hrbench"), ("docvqa_val_lite", "docvqa"), ("mme", None),
    ("mmmu_val", None),
])
def test_released_task_names_map_to_their_presets(task, preset):
    assert preset_for_task(task) == preset


def test_every_mapped_preset_exists():
    assert {preset for _, preset in TASK_PRESETS} <= set(PRESETS)


def test_nothing_outside_the_integrations_imports_them():
    from test_layout import GRAPH

    users = sorted(f"{m} imports {t}" for m, targets in GRAPH.items() if not m.startswith("qzoom_agent.integrations")
                   for t in targets if t.startswith("qzoom_agent.integrations"))
    assert "qzoom_agent.integrations.lmms_eval.models.qzoom" in GRAPH  # the graph sees the package
    assert users == []


def test_the_entry_point_module_stays_light(tmp_path):
    # lmms-eval imports every entry point's module on each run, whatever model it evaluates
    code = ("import sys, qzoom_agent.integrations.lmms_eval as p; "
            "print(sorted(m for m in ('torch', 'transformers', 'lmms_eval') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- through lmms-eval ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qzoom_lmm_class():
    """The model class; skips when lmms-eval is absent, fails when it is present but does not import."""
    if importlib.util.find_spec("lmms_eval") is None:
        pytest.skip(NO_LMMS)
    from qzoom_agent.integrations.lmms_eval.models.qzoom import QZoomLMM

    return QZoomLMM


def test_lmms_eval_resolves_qzoom_through_its_entry_points(qzoom_lmm_class):
    import lmms_eval.models as registry
    from lmms_eval.api.model import lmms
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    assert MODEL_ID in registry.list_available_models()
    assert registry.get_model(MODEL_ID) is qzoom_lmm_class
    assert issubclass(qzoom_lmm_class, lmms) and qzoom_lmm_class.is_simple
    fresh = ModelRegistryV2()  # only the entry points, none of lmms-eval's own models
    fresh.load_entrypoint_manifests()
    resolved = fresh.resolve(MODEL_ID)
    assert (resolved.class_path, resolved.model_type) == (CLASS_PATH, "simple")
    assert fresh.get_model_class(MODEL_ID) is qzoom_lmm_class


def test_lmms_eval_resolves_qzoom_through_the_legacy_plugin_variable(qzoom_lmm_class, tmp_path):
    code = ("import json, lmms_eval.models as m; c = m.get_model('qzoom'); "
            "print(json.dumps([m.AVAILABLE_SIMPLE_MODELS.get('qzoom'), c.__module__ + '.' + c.__name__]))")
    env = {**os.environ, "LMMS_EVAL_PLUGINS": "qzoom_agent.integrations.lmms_eval"}
    out = subprocess.run([sys.executable, "-W", "ignore::DeprecationWarning", "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True)
    legacy, resolved = json.loads(out.stdout.strip().splitlines()[-1])
    assert legacy == CLASS_PATH  # set only by the LMMS_EVAL_PLUGINS loader
    assert resolved == CLASS_PATH


def _card(text: str, size: tuple[int, int] = (320, 240), colour: str = "white") -> Image.Image:
    image = Image.new("RGB", size, colour)
    draw = ImageDraw.Draw(image)
    draw.rectangle((size[0] // 2, size[1] // 2, size[0] - 20, size[1] - 20), fill="navy")
    draw.text((16, 16), text, fill="black")
    return image


def _doc_to_visual(doc: dict) -> list:
    return doc["visuals"]


def _request(context: str, gen_kwargs: dict, task: str, split: str, doc_id: int):
    from lmms_eval.api.instance import Instance

    return Instance(request_type="generate_until", idx=0, metadata={"task": task, "doc_id": doc_id, "repeats": 1},
                    arguments=(context, gen_kwargs, _doc_to_visual, doc_id, task, split))


@pytest.fixture(scope="module")
def lmm(qzoom_lmm_class, tmp_path_factory):
    """A QZoomLMM on the bundled tiny model, built as lmms-eval's evaluator builds it, with its tasks' documents."""
    model = qzoom_lmm_class.create_from_arg_string(
        "pretrained=zoomworld-tiny,preset=auto,device=cpu,max_new_tokens=12",
        {"batch_size": 1, "max_batch_size": None, "device": None})
    png = tmp_path_factory.mktemp("visuals") / "card.png"
    _card("ABC", colour="khaki").save(png)
    model.task_dict = {
        "docvqa_val": {"validation": [{"visuals": [_card("Total: 42")]}, {"visuals": [_card("INVOICE", (400, 300))]},
                                      {"visuals": [str(png)]}]},
        "vstar_bench": {"test": [{"visuals": [_card("red cup", (640, 480), "beige")]}]},
        "mme": {"test": [{"visuals": [_card("x")]}]},
        "broken": {"test": [{"visuals": [_card("a"), _card("b")]}, {"visuals": []}, {"visuals": ["clip.mp4"]},
                            {"visuals": [{"array": [0.0], "sampling_rate": 16000}]}, {"visuals": None}]},
    }
    return model


@pytest.fixture
def calls(lmm, monkeypatch):
    """What each request passed to `QZoomModel.answer`, with the config in force and the answer."""
    seen = []
    real = lmm.model.answer

    def spy(image, question, **kwargs):
        seen.append({"question": question, "config": lmm.model.config, **kwargs})
        seen[-1]["answer"] = real(image, question, **kwargs)
        return seen[-1]["answer"]

    monkeypatch.setattr(lmm.model, "answer", spy)
    return seen


def test_generate_until_answers_each_request_with_its_tasks_settings(lmm, calls):
    requests = [
        _request("What is the total?", {"max_new_tokens": 8, "until": ["\n\n"]}, "docvqa_val", "validation", 0),
        _request("What colour is the cup?", {"max_new_tokens": 3, "temperature": 0}, "vstar_bench", "test", 0),
    ]
    out = lmm.generate_until(requests)
    assert len(out) == 2 and all(isinstance(text, str) for text in out)
    assert [text for text in out] == [c["answer"].text.split("\n\n")[0] for c in calls]
    assert [c["question"] for c in calls] == [f"What is the total?\n{HINT}", f"What colour is the cup?\n{HINT}"]
    assert [c["max_new_tokens"] for c in calls] == [8, 3]
    assert calls[1]["answer"].generated_tokens <= 3
    assert [c["mode"] for c in calls] == ["auto", "auto"] and all(c["sampling"] is None for c in calls)
    family = lmm.model.adapter.family
    for call, preset in zip(calls, ("docvqa", "vstar"), strict=True):
        expected = get_preset(preset, family)
        cfg = call["config"]
        assert (cfg.roi_threshold, cfg.gate_threshold, cfg.min_tokens, cfg.max_tokens) == (
            expected.roi_threshold, expected.gate_threshold, expected.min_tokens, expected.max_tokens)
    assert calls[0]["config"].max_tokens != calls[1]["config"].max_tokens  # the presets differ: the check bites
    records = lmm.records[-2:]
    assert [(r["task"], r["doc_id"], r["preset"]) for r in records] == [("docvqa_val", 0, "docvqa"),
                                                                        ("vstar_bench", 0, "vstar")]
    assert all(isinstance(r["gate_score"], float) and isinstance(r["zoomed"], bool) for r in records)


def test_until_cuts_the_answer_at_the_first_stop_string(lmm):
    def ask(gen_kwargs: dict) -> str:
        return lmm.generate_until([_request("What colour is the box?", gen_kwargs, "docvqa_val", "validation", 0)])[0]

    full = ask({"max_new_tokens": 10})
    assert len(full) >= 2, f"the tiny model's answer {full!r} is too short to cut"
    stop = full[len(full) // 2:]
    expected = full.split(stop, 1)[0]
    assert len(expected) < len(full)
    assert ask({"max_new_tokens": 10, "until": [stop]}) == expected
    assert ask({"max_new_tokens": 10, "until": stop}) == expected  # a single string, as some tasks write it
    assert ask({"max_new_tokens": 10, "until": ["\u2603never"]}) == full


def test_the_answer_hint_is_added_once_and_can_be_turned_off(lmm, calls, monkeypatch):
    lmm.generate_until([_request(f"Read the card.\n{HINT}", {}, "docvqa_val", "validation", 0)])
    monkeypatch.setattr(lmm, "answer_hint", False)
    lmm.generate_until([_request("Read the card.", {}, "docvqa_val", "validation", 0)])
    assert [c["question"] for c in calls] == [f"Read the card.\n{HINT}", "Read the card."]
    assert calls[0]["max_new_tokens"] == 12  # no max_new_tokens in gen_kwargs: the model_args default


def test_an_image_file_path_is_a_visual(lmm):
    out = lmm.generate_until([_request("What is written?", {"max_new_tokens": 4}, "docvqa_val", "validation", 2)])
    assert isinstance(out[0], str) and lmm.records[-1]["doc_id"] == 2


@pytest.mark.parametrize("doc_id, message", [(0, "one image; .* has 2 visuals"), (1, "has 0 visuals"),
                                             (2, "still images only; .*video"), (3, "still images only; .*dict"),
                                             (4, "has 0 visuals")])
def test_requests_without_exactly_one_image_are_refused(lmm, doc_id, message):
    with pytest.raises(ValueError, match=message):
        lmm.generate_until([_request("What is it?", {}, "broken", "test", doc_id)])


def test_preset_auto_refuses_a_task_it_has_no_preset_for(lmm):
    with pytest.raises(ValueError, match="preset=auto has no preset for the task 'mme'"):
        lmm.generate_until([_request("What is it?", {}, "mme", "test", 0)])


def test_malformed_requests_are_refused(lmm):
    with pytest.raises(ValueError, match="until"):
        lmm.generate_until([_request("Q?", {"until": 3}, "docvqa_val", "validation", 0)])
    with pytest.raises(ValueError, match="no document 9"):
        lmm.generate_until([_request("Q?", {}, "docvqa_val", "validation", 9)])
    from lmms_eval.api.instance import Instance

    chat = Instance(request_type="generate_until", idx=0, metadata={"task": "docvqa_val", "doc_id": 0, "repeats": 1},
                    arguments=("Q?", lambda doc: [], {}, 0, "docvqa_val"))
    with pytest.raises(ValueError, match="simple lmms-eval model"):
        lmm.generate_until([chat])


def test_loglikelihood_and_multi_round_are_not_supported(lmm):
    with pytest.raises(NotImplementedError, match="loglikelihood"):
        lmm.loglikelihood([_request("Q?", {}, "docvqa_val", "validation", 0)])
    with pytest.raises(NotImplementedError, match="multi-round"):
        lmm.generate_until_multi_round([_request("Q?", {}, "docvqa_val", "validation", 0)])


@pytest.mark.parametrize("args, error, message", [
    ("batch_size=2", ValueError, "batch_size must be 1"),
    ("batch_size=auto", ValueError, "batch_size must be 1"),
    ("mode=sometimes", ValueError, "mode must be one of"),
    ("preset=docvqa_val", ValueError, "unknown preset 'docvqa_val'"),
    ("max_new_tokens=0", ValueError, "max_new_tokens"),
    ("twig_K=3", TypeError, "unknown model_args twig_K"),
    ("dtype=float99", ValueError, "dtype"),
    ("qzoom=false", ValueError, "no Q-Zoom heads; pass qzoom=ADAPTER_DIR, or mode=never"),
])
def test_bad_model_args_are_refused(qzoom_lmm_class, args, error, message):
    with pytest.raises(error, match=message):
        qzoom_lmm_class.create_from_arg_string(args, {"batch_size": None, "device": "cpu"})


def test_a_fixed_preset_applies_to_every_task_and_model_args_override_it(qzoom_lmm_class, lmm):
    fixed = qzoom_lmm_class.create_from_arg_string("preset=hr,gate_threshold=0.5,mode=never",
                                                   {"batch_size": "1", "device": "cpu"})
    fixed.task_dict = lmm.task_dict
    out = fixed.generate_until([_request("What is written?", {"max_new_tokens": 4}, "docvqa_val", "validation", 0),
                                _request("What is it?", {"max_new_tokens": 4}, "mme", "test", 0)])
    assert all(isinstance(text, str) for text in out)
    hr = get_preset("hr", fixed.model.adapter.family)
    cfg = fixed.model.config
    assert (cfg.roi_threshold, cfg.gate_threshold, cfg.min_tokens, cfg.max_tokens) == (
        hr.roi_threshold, 0.5, hr.min_tokens, hr.max_tokens)
    assert [r["preset"] for r in fixed.records] == ["hr", "hr"]
    assert [(r["gate_score"], r["zoomed"]) for r in fixed.records] == [(None, False), (None, False)]  # mode=never


def test_each_answer_logs_its_gate_score_and_zoom_at_debug_level(lmm, caplog):
    caplog.set_level(logging.DEBUG, logger="qzoom_agent.integrations.lmms_eval.models.qzoom")
    lmm.generate_until([_request("What is written?", {"max_new_tokens": 4}, "docvqa_val", "validation", 0)])
    record = lmm.records[-1]
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any(line.startswith("qzoom docvqa_val doc 0: gate=") and f"zoomed={record['zoomed']}" in line
               for line in lines), lines


def test_lmms_eval_verbosity_shows_the_log_lines_when_nothing_else_configured_logging(qzoom_lmm_class, monkeypatch):
    from qzoom_agent.integrations.lmms_eval.models import qzoom

    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    monkeypatch.setattr(qzoom.logger, "handlers", [])
    monkeypatch.setattr(qzoom.logger, "level", logging.NOTSET)
    monkeypatch.setattr(qzoom.logger, "_cache", {})  # setLevel clears this one; the logger's own comes back after
    monkeypatch.setenv("VERBOSITY", "WARNING")
    qzoom.follow_lmms_verbosity()
    assert len(qzoom.logger.handlers) == 1 and qzoom.logger.level == logging.WARNING
    monkeypatch.setenv("VERBOSITY", "DEBUG")
    qzoom.follow_lmms_verbosity()  # configured once: a second model does not add a second handler
    assert len(qzoom.logger.handlers) == 1 and qzoom.logger.level == logging.WARNING


# ---- end to end, through lmms-eval's command line (slow; needs lmms-eval's evaluator dependencies) ------------------
LOCAL_TASK = """\
dataset_path: {data}
dataset_kwargs:
  load_from_disk: True
task: docvqa_val_local
test_split: validation
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answers
generation_kwargs:
  max_new_tokens: 16
  temperature: 0
  do_sample: False
process_results: !function utils.process_results
metric_list:
  - metric: exact
    aggregation: mean
    higher_is_better: true
"""
LOCAL_TASK_UTILS = """\
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact": float(results[0].strip().lower() in [a.lower() for a in doc["answers"]])}
"""


@pytest.mark.slow
def test_lmms_eval_runs_a_local_task_with_the_qzoom_model(qzoom_lmm_class, tmp_path):
    probe = subprocess.run([sys.executable, "-c", "import lmms_eval.evaluator, pytablewriter"], cwd=tmp_path,
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"lmms-eval's evaluator does not import here: {probe.stderr.strip().splitlines()[-1]}")
    import datasets

    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answers": datasets.Sequence(datasets.Value("string"))})
    rows = {"image": [_card("Total: 42"), _card("INVOICE", (400, 300)), _card("red cup", (640, 480), "beige")],
            "question": ["What colour is the box?", "What is written?", "What is the tag?"],
            "answers": [["cigl"], ["5"], ["red"]]}
    data = tmp_path / "data"
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(data)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "docvqa_val_local.yaml").write_text(LOCAL_TASK.format(data=data))
    (tasks / "utils.py").write_text(LOCAL_TASK_UTILS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "lmms_eval", "--model", "qzoom", "--model_args",
               "pretrained=zoomworld-tiny,preset=auto", "--tasks", "docvqa_val_local", "--include_path", str(tasks),
               "--batch_size", "1", "--device", "cpu", "--output_path", str(tmp_path / "out"), "--log_samples",
               "--verbosity", "DEBUG"]
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    log = run.stdout + run.stderr
    for doc_id in range(3):  # the per-answer DEBUG lines: the preset was found and --verbosity reached our logger
        assert f"qzoom docvqa_val_local doc {doc_id}: gate=" in log
    (results,) = (tmp_path / "out").rglob("*_results.json")
    score = json.loads(results.read_text())["results"]["docvqa_val_local"]["exact,none"]
    assert 0.0 <= score <= 1.0
    (samples,) = (tmp_path / "out").rglob("*_samples_docvqa_val_local.jsonl")
    answers = [json.loads(line)["filtered_resps"] for line in samples.read_text().splitlines()]
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
