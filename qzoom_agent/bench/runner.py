"""`qzoom-agent compare`: run agents on benchmark questions, interleaved, and summarise accuracy against cost.

Questions: ``--seed S --n N`` draws ``random.Random(S).sample(range(T), N)`` question indices, where ``T`` is the
size of ZoomWorld's TEST split, so every seed gives held-out questions and the same seed always the same ones
(a larger N with the same seed extends the list: the first N' indices are the same).

Timing: batch size 1; one unrecorded warm-up question per agent (from the val split); then, for each question,
every agent in turn before the next question, so machine drift cancels and costs are compared side by side. The
order of the agents rotates by one each question, so no agent always runs first (after another's allocations) or
last.

Robustness: an agent that raises on a question (a bug, never a policy's bad output, which agents turn into trace
entries) does not stop the run: the record keeps the error, scores the answer wrong, and the run goes on.

Output in ``--out DIR``:
    results.jsonl  one line per (question, agent), written and flushed as it goes; an interrupted run resumes,
                   skipping pairs already there and never rewriting lines (a torn last line is dropped, logged).
    run.json       arguments, resolved model path, date, agents, question indices; a rerun with other arguments
                   is refused.
    summary.json, summary.md  per-agent accuracy and mean costs, recomputed from all of results.jsonl.
    accuracy_by_budget.png    fine/coarse accuracy against the token budget, when two or more plain@B agents ran.
    pareto.png, pareto_fine.png  accuracy against throughput for plain@N, qzoom@N and deepeyes@N agents.
    accuracy_latency.png      accuracy against mean latency, one point per agent.
    tool_calls.png            the distribution of tool calls (or internal zooms) per question, per agent.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .. import boxes, scoring, zoomworld
from ..checks import int_at_least
from ..config import budget_for
from . import metrics, registry, report
from .agents import Agent, AgentResult

logger = logging.getLogger(__name__)

TEST_SPLIT = "test"
WARMUP_SPLIT, WARMUP_INDEX = "val", 0
RESULTS, RUN, SUMMARY_JSON, SUMMARY_MD, PLOT = (
    "results.jsonl", "run.json", "summary.json", "summary.md", "accuracy_by_budget.png")
PARETO, PARETO_FINE = "pareto.png", "pareto_fine.png"  # accuracy against throughput, plain@N and qzoom@N
ACC_LATENCY, TOOL_CALLS = "accuracy_latency.png", "tool_calls.png"  # one point per agent; calls per question
IDENTITY_KEYS = ("bench", "agents", "seed", "n", "model", "lowres_tokens", "highres_tokens", "max_new_tokens",
                 "alphabet", "qzoom_tokens", "policy", "crop_policy")
NEW_KEY_DEFAULTS = {"policy": "", "crop_policy": ""}


@dataclass
class CompareConfig:
    """A validated `compare` run.

    Attributes:
        bench: ``zoomworld:VARIANT``.
        agents: agent names in run order (``--agents`` then ``plain@B`` for each ``--budgets`` value).
        n: number of questions.
        seed: picks the question indices (see :func:`question_indices`).
        out: output directory.
        model: model directory, bundled model name, or a policy (a directory with policy.json, or a bundled policy).
        lowres_tokens: visual tokens of ``lowres``.
        highres_tokens: visual tokens of ``highres``.
        max_new_tokens: decoding budget per answer.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ...
        qzoom_tokens: global-view tokens of the Q-Zoom agents.
        alphabet: tag characters of the questions; "" means the model's training alphabet (``zoomworld.json``
            next to its weights), else A-Z0-9.
        policy: the tool-calling policy of ``qzoom-tool``; "" for the bundled one.
        crop_policy: the external-crop policy of the ``deepeyes*`` agents; "" for the default
            (`registry.crop_policy_for`).
    """

    bench: str
    agents: list[str]
    n: int
    seed: int
    out: str
    model: str = "zoomworld-tiny"
    lowres_tokens: int = registry.DEFAULT_LOWRES_TOKENS
    highres_tokens: int = registry.DEFAULT_HIGHRES_TOKENS
    max_new_tokens: int = 8
    device: str = "auto"
    alphabet: str = ""
    qzoom_tokens: int = registry.DEFAULT_QZOOM_TOKENS
    policy: str = ""
    crop_policy: str = ""

    @property
    def variant(self) -> str:
        return self.bench.partition(":")[2]


def split_size() -> int:
    """Number of questions in ZoomWorld's test split."""
    start, stop = zoomworld.SPLITS[TEST_SPLIT]
    return stop - start


def question_indices(seed: int, n: int) -> list[int]:
    """The ``n`` test-split question indices of ``seed``: ``random.Random(seed).sample(range(test size), n)``."""
    return random.Random(seed).sample(range(split_size()), n)


def parse_bench(text: str) -> str:
    """Check ``zoomworld:VARIANT`` and return it; raises ValueError naming the valid benches."""
    valid = [f"zoomworld:{v}" for v in zoomworld.VARIANTS]
    if text not in valid:
        raise ValueError(f"unknown bench {text!r}; choose one of {', '.join(valid)}")
    return text


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    """Validate the parsed `compare` options.

    Raises:
        ValueError: unknown bench or agent, n < 1 or beyond the test split, a bad budget list, or bad token counts.
    """
    bench = parse_bench(args.bench)
    names = [a.strip() for a in str(args.agents).split(",") if a.strip()]
    if args.budgets is not None:
        names += [f"plain@{b}" for b in registry.parse_budgets(args.budgets)]
    if not names:
        raise ValueError("no agents given; pass --agents lowres,highres or --budgets 256,1024")
    for name in names:
        registry.check_agent_name(name)
    repeated = sorted({a for a in names if names.count(a) > 1})
    if repeated:
        raise ValueError(f"agents repeat: {', '.join(repeated)}; list each agent once")
    int_at_least(args.n, 1, "--n")
    if args.n > split_size():
        raise ValueError(f"--n {args.n} exceeds the {split_size()} questions of the test split")
    for opt in ("lowres_tokens", "highres_tokens", "max_new_tokens", "qzoom_tokens"):
        int_at_least(getattr(args, opt), 1, "--" + opt.replace("_", "-"))
    alphabet = args.alphabet or ""
    if alphabet:
        zoomworld.check_alphabet(alphabet)
    return CompareConfig(bench, names, args.n, args.seed, str(args.out), str(args.model), args.lowres_tokens,
                         args.highres_tokens, args.max_new_tokens, args.device, alphabet, args.qzoom_tokens,
                         args.policy or "", args.crop_policy or "")


# ---- run directory -------------------------------------------------------------------------------------------
def _identity(cfg: CompareConfig, model_path: Path) -> dict[str, Any]:
    values = {**asdict(cfg), "model": str(model_path.resolve())}
    return {key: values[key] for key in IDENTITY_KEYS}


def prepare_run_dir(cfg: CompareConfig, model_path: Path) -> dict[str, Any]:
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
    run = {
        "args": identity, "device": cfg.device, "model_path": identity["model"], "out": str(out),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "agents": cfg.agents,
        "budgets": {name: _budget_of(cfg, name) for name in cfg.agents}, "split": TEST_SPLIT,
        "question_indices": question_indices(cfg.seed, cfg.n), "generator_version": zoomworld.GENERATOR_VERSION,
        "command": " ".join(sys.argv),
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return run


def _budget_of(cfg: CompareConfig, name: str) -> list[int] | None:
    tokens = registry.agent_tokens(name, {"lowres": cfg.lowres_tokens, "highres": cfg.highres_tokens,
                                            "qzoom": cfg.qzoom_tokens})
    return list(budget_for(tokens)) if tokens else None


def load_results(path: Path) -> list[dict[str, Any]]:
    """Read results.jsonl, first record of each (index, agent) pair only.

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


# ---- running ---------------------------------------------------------------------------------------------------
def _record(cfg: CompareConfig, s: zoomworld.ZoomWorldSample, name: str, res: AgentResult,
            error: str | None = None) -> dict:
    target = list(s.target_box) if s.target_box is not None else None
    return {
        "index": s.index, "seed": s.seed, "run_seed": cfg.seed, "split": s.split, "variant": s.variant,
        "family": s.family, "kind": s.kind, "agent": name, "question": s.question, "answer": res.answer,
        "truth": s.answer, "options": s.options, "correct": scoring.is_correct(res.answer, s.answer, s.options),
        "latency_s": res.latency_s, "visual_tokens": res.visual_tokens, "forward_passes": res.forward_passes,
        "generated_tokens": res.generated_tokens, "tool_calls": res.tool_calls, "zooms": res.zooms,
        "gate_score": res.gate_score, "bbox": res.bbox, "target_box": target,
        "vision_encodes": res.vision_encodes, "layer_tokens": res.layer_tokens, "external_calls": res.external_calls,
        "iou": boxes.iou(res.bbox, target), "coverage": boxes.coverage(res.bbox, target),
        "trace": res.trace, "error": error,
    }


def _load_model(cfg: CompareConfig):
    from transformers.utils import logging as hf_logging

    from ..loading import resolve_device
    from ..model import QZoomModel

    hf_logging.disable_progress_bar()
    device, dtype = resolve_device(cfg.device)
    logger.info("loading %s on %s", cfg.model, device)
    return QZoomModel.from_pretrained(cfg.model, device=device, dtype=dtype)


def _extra(agent: Agent, s: zoomworld.ZoomWorldSample) -> dict[str, Any]:
    """Keyword arguments beyond (image, question): the target box, for reference agents that declare they use it."""
    return {"target_box": tuple(s.target_box)} if getattr(agent, "uses_target_box", False) else {}


def _run_pending(cfg: CompareConfig, pending: list[tuple[int, list[str]]], path: Path) -> None:
    """Warm every agent up, then run the pending (question, agents) pairs interleaved, appending to ``path``."""
    from tqdm import tqdm

    ctx = registry.AgentContext(_load_model(cfg), cfg.lowres_tokens, cfg.highres_tokens, cfg.max_new_tokens,
                                  cfg.qzoom_tokens, cfg.policy or None, cfg.crop_policy or None)
    names = [a for a in cfg.agents if any(a in todo for _, todo in pending)]
    runners = {name: registry.make_agent(name, ctx) for name in names}
    warm = zoomworld.sample(cfg.variant, WARMUP_SPLIT, WARMUP_INDEX, alphabet=cfg.alphabet)
    for agent in runners.values():
        _run_one(agent, warm)  # warm-up: not recorded (a failure is logged)
    done = cfg.n - len(pending)
    with path.open("a", encoding="utf-8") as fh, tqdm(total=cfg.n, initial=done, unit="q", file=sys.stderr,
                                                      desc=f"compare {cfg.bench}", disable=None) as bar:
        for index, todo in pending:
            s = zoomworld.sample(cfg.variant, TEST_SPLIT, index, alphabet=cfg.alphabet)
            shift = index % len(cfg.agents)  # rotate the order, by question, so no agent always goes first
            for name in sorted(todo, key=lambda a: (cfg.agents.index(a) - shift) % len(cfg.agents)):
                fh.write(json.dumps(_record(cfg, s, name, *_run_one(runners[name], s))) + "\n")
                fh.flush()
            bar.update(1)


def _run_one(agent: Agent, s: zoomworld.ZoomWorldSample) -> tuple[AgentResult, str | None]:
    """Run one agent on one question; an exception is logged and recorded (answer "", costs 0), not raised."""
    t0 = time.perf_counter()
    try:
        return agent.run(s.image, s.question, **_extra(agent, s)), None
    except Exception as err:  # noqa: BLE001 - one agent's failure must not lose a long run; it is recorded
        logger.warning("agent %s failed on question %d: %s: %s", agent.name, s.index, type(err).__name__, err)
        empty = AgentResult(answer="", latency_s=time.perf_counter() - t0, visual_tokens=0, forward_passes=0,
                            generated_tokens=0)
        return empty, f"{type(err).__name__}: {err}"


def run_compare(cfg: CompareConfig) -> dict[str, Any]:
    """Run (or resume) a comparison and write its outputs; returns the summary ``{"agents": {...}}``.

    Raises:
        ValueError: the output directory holds a run with other arguments.
        FileNotFoundError: the model directory does not exist.
    """
    from ..loading import resolve_model_path, trained_alphabet
    from ..policy import is_policy, policy_base, resolve_policy_path

    # a policy delta (e.g. a GRPO run's) is a model too: its base gives the directory, its delta the weights
    model_path = resolve_model_path(policy_base(cfg.model))
    if not cfg.alphabet:
        cfg = replace(cfg, alphabet=trained_alphabet(model_path) or zoomworld.DEFAULT_ALPHABET)
    prepare_run_dir(cfg, resolve_policy_path(cfg.model) if is_policy(cfg.model) else model_path)
    out = Path(cfg.out)
    path = out / RESULTS
    done = {(int(r["index"]), r["agent"]) for r in load_results(path)}
    pending = [(i, [a for a in cfg.agents if (i, a) not in done]) for i in question_indices(cfg.seed, cfg.n)]
    pending = [(i, todo) for i, todo in pending if todo]
    if pending:
        logger.info("%d of %d questions to run (%d already done)", len(pending), cfg.n, len(done))
        _run_pending(cfg, pending, path)
    else:
        logger.info("all %d questions x %d agents already in %s", cfg.n, len(cfg.agents), path)
    return write_summary(cfg, load_results(path))


def write_summary(cfg: CompareConfig, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Summarise ``records`` of this run's questions and agents into summary.json, summary.md and the plot."""
    wanted = set(question_indices(cfg.seed, cfg.n))
    records = [r for r in records if int(r["index"]) in wanted and r["agent"] in cfg.agents]
    summary = metrics.summarize(records, cfg.agents)
    matched = {key: report.matched_accuracy(summary, key) for key in ("accuracy", "accuracy_fine")}
    if any(matched.values()):
        summary["matched"] = matched
    out = Path(cfg.out)
    (out / SUMMARY_JSON).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    title = f"{cfg.bench}, n={cfg.n}, seed={cfg.seed}, alphabet {cfg.alphabet or zoomworld.DEFAULT_ALPHABET}"
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


# ---- command line ------------------------------------------------------------------------------------------------
def add_compare_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``compare`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser("compare", help="compare agents' accuracy and cost on benchmark questions",
                              description="Run agents on benchmark questions, interleaved, and summarise accuracy "
                              "against cost. Rerun with the same --out and arguments to resume.")
    p.add_argument("--bench", required=True, help="zoomworld:hr or zoomworld:doc")
    p.add_argument("--agents", default="lowres,highres",
                   help=f"comma-separated agents: {', '.join(registry.known_agents())} (default: lowres,highres)")
    p.add_argument("--n", type=int, default=100, help="number of test questions (default 100)")
    p.add_argument("--seed", type=int, default=0, help="picks the test questions (default 0)")
    p.add_argument("--out", required=True, help="output directory; rerun with the same arguments to resume")
    p.add_argument("--budgets", default=None, help="also run plain@B for each budget, e.g. 256,576,1024,2048,4096")
    p.add_argument("--model", default="zoomworld-tiny",
                   help="model directory, bundled model name or a policy (directory with policy.json)")
    p.add_argument("--lowres-tokens", type=int, default=registry.DEFAULT_LOWRES_TOKENS,
                   help="visual tokens of the lowres agent (default 256)")
    p.add_argument("--highres-tokens", type=int, default=registry.DEFAULT_HIGHRES_TOKENS,
                   help="visual tokens of the highres agent (default 4096)")
    p.add_argument("--qzoom-tokens", type=int, default=registry.DEFAULT_QZOOM_TOKENS,
                   help="global-view visual tokens of the qzoom agents (default 576)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="max generated tokens per answer (default 8)")
    p.add_argument("--alphabet", default=None,
                   help="tag characters of the questions (default: the model's training alphabet, else A-Z0-9)")
    p.add_argument("--device", default="auto", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--policy", default=None, help="tool-calling policy of qzoom-tool (default: zoomworld-tiny-tool)")
    p.add_argument("--crop-policy", default=None,
                   help="external-crop policy of the deepeyes agents (default: zoomworld-tiny-deepeyes on the bundled "
                        "model, else --model itself)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(func=cmd_compare)
    return p


def cmd_compare(args: argparse.Namespace) -> int:
    """Run `qzoom-agent compare`; prints the summary table (or one JSON object with ``--json``); returns 0."""
    cfg = config_from_args(args)
    summary = run_compare(cfg)
    if args.json:
        print(json.dumps(summary))  # noqa: T201 - CLI output
    else:
        print(report.markdown_table(summary))  # noqa: T201 - CLI output
        extra = report.findings(summary)
        if extra:
            print("\n" + "\n".join(extra))  # noqa: T201 - CLI output
    return 0
