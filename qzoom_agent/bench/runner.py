"""`qzoom-agent compare`: run agents on benchmark questions, interleaved, and summarise accuracy against cost.

Questions come from ZoomWorld's held-out TEST split (``--bench zoomworld:hr``) or from a real benchmark read by its
adapter (``--bench vstar:PATH``, see :mod:`qzoom_agent.bench.tasks`), scored by that benchmark's own rule.
``--seed S --n N`` draws ``random.Random(S).sample(range(T), N)`` question indices of the ``T`` available, so the
same seed always gives the same questions and a larger N extends the list (the first N' indices are the same).
Without ``--n``: 100 ZoomWorld questions, or every question of a real benchmark. On a real benchmark the Q-Zoom
agents use the task's released RoI and gate thresholds, and every agent's view its minimum tokens (``--preset
auto``; :mod:`qzoom_agent.presets`): 512 on V*, 256 on DocVQA, capped by the agent's own budget. From a
2048-token view on, a Qwen2.5-VL Q-Zoom agent switches to the released sweep's common set (`presets.thresholds_at`).

Timing: batch size 1; one unrecorded warm-up question per agent; then, for each question, every agent in turn
before the next question, so machine drift cancels and costs are compared side by side. The order of the agents
rotates by one each question, so no agent always runs first (after another's allocations) or last. Latency is the
agent's wall time around its answer; decoding the image file is not in it.

Robustness: an agent that raises on a question (a bug, never a policy's bad output, which agents turn into trace
entries) does not stop the run: the record keeps the error, scores the answer wrong, and the run goes on.

More than one process: under ``accelerate launch`` (or ``torchrun``) the questions are shared out across the
processes, each appending to its own shard file and resumable; the main process merges them into results.jsonl and
writes one summary (:mod:`qzoom_agent.bench.rundir`). The records equal a single-process run's, timings aside.

Output in ``--out DIR``:
    results.jsonl  one line per (question, agent), written and flushed as it goes; an interrupted run resumes,
                   skipping pairs already there and never rewriting lines (a torn last line is dropped, logged).
                   ``score`` is the benchmark's score in [0, 1] (fractional for ANLS and VQA accuracy); ``correct``
                   is ``score >= 0.5``; accuracy is the mean score.
    run.json       arguments, resolved model path, date, agents, question indices; a rerun with other arguments
                   is refused.
    summary.json, summary.md  per-agent accuracy and mean costs, recomputed from all of results.jsonl.
    accuracy_by_budget.png    fine/coarse accuracy against the token budget, when two or more plain@B agents ran.
    pareto.png, pareto_fine.png  accuracy against throughput for plain@N, qzoom@N and deepeyes@N agents.
    accuracy_latency.png      accuracy against mean latency, one point per agent.
    tool_calls.png            the distribution of tool calls (or internal zooms) per question, per agent.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .. import boxes, zoomworld
from ..config import budget_for
from ..presets import get_preset, thresholds_at
from . import metrics, registry, report, rundir, sources
from .agents import Agent, AgentResult
from .rundir import RESULTS

logger = logging.getLogger(__name__)

TEST_SPLIT = sources.TEST_SPLIT
RUN, SUMMARY_JSON, SUMMARY_MD, PLOT = "run.json", "summary.json", "summary.md", "accuracy_by_budget.png"
PARETO, PARETO_FINE = "pareto.png", "pareto_fine.png"  # accuracy against throughput, plain@N and qzoom@N
ACC_LATENCY, TOOL_CALLS = "accuracy_latency.png", "tool_calls.png"  # one point per agent; calls per question
IDENTITY_KEYS = ("bench", "agents", "seed", "n", "model", "lowres_tokens", "highres_tokens", "max_new_tokens",
                 "alphabet", "qzoom_tokens", "policy", "crop_policy", "preset")
NEW_KEY_DEFAULTS = {"policy": "", "crop_policy": "", "preset": "auto"}
DEFAULT_N, DEFAULT_NEW_TOKENS = 100, 8  # ZoomWorld questions; answer tokens when the source sets no budget
CORRECT_AT = 0.5  # a record counts as correct from this score (exact scorers give 0 or 1)

@dataclass
class CompareConfig:
    """A validated `compare` run.

    Attributes:
        bench: ``zoomworld:VARIANT`` or ``TASK:SOURCE`` (a real benchmark, :mod:`qzoom_agent.bench.tasks`).
        agents: agent names in run order (``--agents`` then ``plain@B`` for each ``--budgets`` value).
        n: number of questions; None: 100 ZoomWorld questions, or all of a real benchmark.
        seed: picks the question indices (see :func:`sources.question_indices`).
        out: output directory.
        model: model directory, bundled model name, or a policy (a directory with policy.json, or a bundled policy).
        lowres_tokens: visual tokens of ``lowres``.
        highres_tokens: visual tokens of ``highres``.
        max_new_tokens: decoding budget per answer; None: the benchmark's own (8 on ZoomWorld).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ...
        qzoom_tokens: global-view tokens of the Q-Zoom agents.
        alphabet: tag characters of ZoomWorld questions; "" means the model's training alphabet
            (``zoomworld.json`` next to its weights), else A-Z0-9.
        policy: the tool-calling policy of ``qzoom-tool``; "" for the bundled one.
        crop_policy: the external-crop policy of the ``deepeyes*`` agents; "" for the default
            (`registry.crop_policy_for`).
        preset: whose RoI and gate thresholds the model uses: ``auto`` (the benchmark's task, none on ZoomWorld),
            ``none`` (the model's own), or a preset name.
    """

    bench: str
    agents: list[str]
    n: int | None
    seed: int
    out: str
    model: str = "zoomworld-tiny"
    lowres_tokens: int = registry.DEFAULT_LOWRES_TOKENS
    highres_tokens: int = registry.DEFAULT_HIGHRES_TOKENS
    max_new_tokens: int | None = DEFAULT_NEW_TOKENS
    device: str = "auto"
    alphabet: str = ""
    qzoom_tokens: int = registry.DEFAULT_QZOOM_TOKENS
    policy: str = ""
    crop_policy: str = ""
    preset: str = "auto"

    @property
    def variant(self) -> str:
        return self.bench.partition(":")[2]

def split_size() -> int:
    """Number of questions in ZoomWorld's test split."""
    return sources.zoomworld_size()

def question_indices(seed: int, n: int) -> list[int]:
    """The ``n`` ZoomWorld test-split question indices of ``seed`` (:func:`sources.question_indices`)."""
    return sources.question_indices(split_size(), seed, n)

def parse_bench(text: str) -> str:
    """Check ``zoomworld:VARIANT`` and return it; raises ValueError naming the valid benches (ZoomWorld only: GRPO's
    held-out evaluation draws its questions from it)."""
    valid = [f"zoomworld:{v}" for v in zoomworld.VARIANTS]
    if text not in valid:
        raise ValueError(f"unknown bench {text!r}; choose one of {', '.join(valid)}")
    return text

# ---- run directory -------------------------------------------------------------------------------------------
def _identity(cfg: CompareConfig, model_path: Path) -> dict[str, Any]:
    values = {**asdict(cfg), "model": str(model_path.resolve())}
    return {key: values[key] for key in IDENTITY_KEYS}

def prepare_run_dir(cfg: CompareConfig, model_path: Path, source: sources.QuestionSource) -> dict[str, Any]:
    """Create ``cfg.out`` and write run.json, or check an existing one was written with the same arguments.

    Raises:
        ValueError: run.json exists with different arguments (or is unreadable).
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RUN
    identity = _identity(cfg, model_path)
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            # keys added later (the policies) read as their defaults in older run.json files
            changed = [k for k in IDENTITY_KEYS if old["args"].get(k, NEW_KEY_DEFAULTS.get(k)) != identity[k]]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{path} is unreadable; choose another --out or remove {out}") from None
        if changed:
            raise ValueError(f"{out} holds a run with other arguments ({', '.join(changed)}); choose another --out "
                             "or repeat the original arguments to resume")
        return old
    floor = _min_tokens(_preset_of(cfg, source))
    run = {
        "args": identity, "device": cfg.device, "model_path": identity["model"], "out": str(out),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "agents": cfg.agents,
        "budgets": {name: _budget_of(cfg, name, floor) for name in cfg.agents}, **source.identity(),
        "question_indices": sources.question_indices(source.size(), cfg.seed, cfg.n), "command": " ".join(sys.argv),
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return run

def _budget_of(cfg: CompareConfig, name: str, min_tokens: int | None) -> list[int] | None:
    tokens = registry.agent_tokens(name, {"lowres": cfg.lowres_tokens, "highres": cfg.highres_tokens,
                                            "qzoom": cfg.qzoom_tokens})
    if not tokens:
        return None
    return [min(min_tokens, tokens), tokens] if min_tokens is not None else list(budget_for(tokens))


def _min_tokens(preset: str | None) -> int | None:
    """A task's minimum view tokens, from its preset (the Qwen tables: every family gets the same floor)."""
    return get_preset(preset, "qwen2_5_vl").min_tokens if preset else None

# ---- running ---------------------------------------------------------------------------------------------------
def _record(cfg: CompareConfig, q: sources.Question, name: str, res: AgentResult,
            error: str | None = None) -> dict:
    score = q.score(res.answer) if error is None else 0.0
    target = q.fields.get("target_box")
    return {
        "index": q.index, "run_seed": cfg.seed, **q.fields, "agent": name, "question": q.question,
        "answer": res.answer, "score": score, "correct": score >= CORRECT_AT,
        "latency_s": res.latency_s, "visual_tokens": res.visual_tokens, "forward_passes": res.forward_passes,
        "generated_tokens": res.generated_tokens, "tool_calls": res.tool_calls, "zooms": res.zooms,
        "gate_score": res.gate_score, "bbox": res.bbox, "vision_encodes": res.vision_encodes,
        "layer_tokens": res.layer_tokens, "external_calls": res.external_calls,
        "iou": boxes.iou(res.bbox, target), "coverage": boxes.coverage(res.bbox, target),
        "trace": res.trace, "error": error,
    }

def _load_model(cfg: CompareConfig, preset: str | None):
    from transformers.utils import logging as hf_logging

    from ..loading import resolve_device
    from ..model import QZoomModel

    hf_logging.disable_progress_bar()
    device, dtype = resolve_device(cfg.device)
    logger.info("loading %s on %s%s", cfg.model, device, f" with the {preset} preset's thresholds" if preset else "")
    model = QZoomModel.from_pretrained(cfg.model, device=device, dtype=dtype)
    if preset:  # the task's released RoI and gate thresholds; the view's floor is set per agent (`_min_tokens`)
        overrides = get_preset(preset, model.adapter.family).overrides()
        for key in ("roi_threshold", "gate_threshold"):
            if key in overrides:
                setattr(model.config, key, overrides[key])
    return model

def _extra(agent: Agent, q: sources.Question) -> dict[str, Any]:
    """Keyword arguments beyond (image, question): the target box, for reference agents that declare they use it."""
    return {"target_box": q.target_box} if getattr(agent, "uses_target_box", False) else {}

def _run_pending(cfg: CompareConfig, source: sources.QuestionSource, pending: list[tuple[int, list[str]]],
                 path: Path, done: int) -> None:
    """Warm every agent up, then run the pending (question, agents) pairs interleaved, appending to ``path``."""
    from tqdm import tqdm

    preset = _preset_of(cfg, source)
    model = _load_model(cfg, preset)
    ctx = registry.AgentContext(model, cfg.lowres_tokens, cfg.highres_tokens, cfg.max_new_tokens, cfg.qzoom_tokens,
                                cfg.policy or None, cfg.crop_policy or None, _min_tokens(preset))
    if preset and model is not None:  # thresholds by view size, as the released trade-off sweep sets them
        ctx.thresholds_at = functools.partial(thresholds_at, preset, model.adapter.family)
    names = [a for a in cfg.agents if any(a in todo for _, todo in pending)]
    runners = {name: registry.make_agent(name, ctx) for name in names}
    warm = source.warmup()
    for agent in runners.values():
        _run_one(agent, warm)  # warm-up: not recorded (a failure is logged)
    with path.open("a", encoding="utf-8") as fh, tqdm(total=done + len(pending), initial=done, unit="q",
                                                      file=sys.stderr, desc=f"compare {cfg.bench}",
                                                      disable=None) as bar:
        for index, todo in pending:
            q = source.get(index)
            shift = index % len(cfg.agents)  # rotate the order, by question, so no agent always goes first
            for name in sorted(todo, key=lambda a: (cfg.agents.index(a) - shift) % len(cfg.agents)):
                fh.write(json.dumps(_record(cfg, q, name, *_run_one(runners[name], q))) + "\n")
                fh.flush()
            bar.update(1)

def _run_one(agent: Agent, q: sources.Question) -> tuple[AgentResult, str | None]:
    """Run one agent on one question; an exception is logged and recorded (answer "", costs 0), not raised.

    The image is decoded before the clock starts: latency is the agent's, as in the paper's protocol (wall time
    around the answer)."""
    t0 = time.perf_counter()
    try:
        image = q.load_image()
        t0 = time.perf_counter()
        return agent.run(image, q.question, **_extra(agent, q)), None
    except Exception as err:  # noqa: BLE001 - one agent's failure must not lose a long run; it is recorded
        logger.warning("agent %s failed on question %d: %s: %s", agent.name, q.index, type(err).__name__, err)
        empty = AgentResult(answer="", latency_s=time.perf_counter() - t0, visual_tokens=0, forward_passes=0,
                            generated_tokens=0)
        return empty, f"{type(err).__name__}: {err}"

def _preset_of(cfg: CompareConfig, source: sources.QuestionSource) -> str | None:
    """The presets.py task whose thresholds the model uses: ``--preset``, or the source's own under ``auto``."""
    if cfg.preset == "auto":
        return source.preset
    return None if cfg.preset == "none" else cfg.preset

def resolve(cfg: CompareConfig) -> tuple[CompareConfig, sources.QuestionSource, Path]:
    """Open the question source and fill what the source decides: the alphabet, ``n`` (None: 100 ZoomWorld
    questions, or all of a real benchmark) and ``max_new_tokens`` (None: the source's budget, else 8).

    Returns:
        The completed config, the source and the resolved model path.

    Raises:
        ValueError: the benchmark cannot be read or misses images, or ``n`` exceeds its questions.
    """
    from ..loading import resolve_model_path, trained_alphabet
    from ..policy import policy_base

    # a policy delta (e.g. a GRPO run's) is a model too: its base gives the directory, its delta the weights
    model_path = resolve_model_path(policy_base(cfg.model))
    if not cfg.alphabet and sources.is_zoomworld(cfg.bench):
        cfg = replace(cfg, alphabet=trained_alphabet(model_path) or zoomworld.DEFAULT_ALPHABET)
    source = sources.open_source(cfg.bench, cfg.alphabet)
    n = cfg.n if cfg.n is not None else (DEFAULT_N if sources.is_zoomworld(cfg.bench) else source.size())
    if n > source.size():
        raise ValueError(f"--n {n} exceeds the {source.size()} questions of {cfg.bench}")
    tokens = cfg.max_new_tokens if cfg.max_new_tokens is not None else (source.max_new_tokens or DEFAULT_NEW_TOKENS)
    return replace(cfg, n=n, max_new_tokens=tokens), source, model_path

def run_compare(cfg: CompareConfig) -> dict[str, Any]:
    """Run (or resume) a comparison and write its outputs; returns the summary ``{"agents": {...}}``.

    Under ``accelerate launch`` (or ``torchrun``) every process runs its share of the pending questions into its
    own shard file; the main process merges them and writes the summary, which every process returns.

    Raises:
        ValueError: the output directory holds a run with other arguments, or the benchmark cannot be read.
        FileNotFoundError: the model directory does not exist.
    """
    from ..policy import is_policy, resolve_policy_path

    shard = rundir.current_shard()
    if shard.device and cfg.device == "auto":
        cfg = replace(cfg, device=shard.device)  # one GPU per process
    cfg, source, model_path = resolve(cfg)
    identity_path = resolve_policy_path(cfg.model) if is_policy(cfg.model) else model_path
    if shard.main:  # one writer of run.json; the others then check theirs against it
        prepare_run_dir(cfg, identity_path, source)
    shard.barrier()
    if not shard.main:
        prepare_run_dir(cfg, identity_path, source)
    out = Path(cfg.out)
    indices = sources.question_indices(source.size(), cfg.seed, cfg.n)
    done = {(int(r["index"]), r["agent"]) for r in rundir.load_all(out)}
    pending = [(i, [a for a in cfg.agents if (i, a) not in done]) for i in indices]
    pending = shard.take([(i, todo) for i, todo in pending if todo])
    path = out / RESULTS if shard.world == 1 else rundir.shard_path(out, shard.rank)
    if pending:
        logger.info("%d of %d questions to run here (%d pairs already done)", len(pending), cfg.n, len(done))
        _run_pending(cfg, source, pending, path, cfg.n - len(pending) if shard.world == 1 else 0)
    else:
        logger.info("nothing left to run here: %d questions x %d agents in %s", cfg.n, len(cfg.agents), out)
    shard.barrier()
    if shard.main:
        rundir.merge_shards(out, indices, cfg.agents)
        write_summary(cfg, rundir.load_results(out / RESULTS), source)
    shard.barrier()
    return json.loads((out / SUMMARY_JSON).read_text(encoding="utf-8"))

def write_summary(cfg: CompareConfig, records: list[dict[str, Any]], source: sources.QuestionSource
                  ) -> dict[str, Any]:
    """Summarise ``records`` of this run's questions (drawn from ``source``) and agents into summary.json,
    summary.md and the plots."""
    wanted = set(sources.question_indices(source.size(), cfg.seed, cfg.n))
    records = [r for r in records if int(r["index"]) in wanted and r["agent"] in cfg.agents]
    summary = metrics.summarize(records, cfg.agents)
    matched = {key: report.matched_accuracy(summary, key) for key in ("accuracy", "accuracy_fine")}
    if any(matched.values()):
        summary["matched"] = matched
    out = Path(cfg.out)
    (out / SUMMARY_JSON).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    title = f"{cfg.bench}, n={cfg.n}, seed={cfg.seed}"
    if sources.is_zoomworld(cfg.bench):
        title += f", alphabet {cfg.alphabet or zoomworld.DEFAULT_ALPHABET}"
    text = f"# {title}\n\n{report.markdown_table(summary)}\n"
    for key, caption in (("accuracy_by_family", "Accuracy by question family"),
                         ("roi_hit_by_family", "RoI hit (box covers >= 70% of the target, <= 16x its area) by fine "
                                               "question family")):
        table = report.family_table(summary, key)
        if table:
            text += f"\n{caption}:\n\n{table}\n"
    extra = report.findings(summary)
    if extra:
        text += "\n" + "\n".join(extra) + "\n"
    (out / SUMMARY_MD).write_text(text, encoding="utf-8")
    report.plot_accuracy_by_budget(summary, out / PLOT, title=f"Accuracy by visual-token budget\n{title}")
    for key, name in (("accuracy", PARETO), ("accuracy_fine", PARETO_FINE)):
        report.plot_pareto(summary, out / name, title=f"{key.replace('_', ' ')} against throughput\n{title}",
                           key=key)
    report.plot_accuracy_latency(summary, out / ACC_LATENCY, title=f"Accuracy against latency\n{title}")
    report.plot_tool_calls(records, cfg.agents, out / TOOL_CALLS, title=f"Tool calls per question\n{title}")
    return summary
