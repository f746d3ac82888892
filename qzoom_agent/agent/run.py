"""Running one question through the loop, and reading its trace: for the CLI, the demo and the comparison runner.

`ask_agent` invokes a compiled graph on an image and a question and returns an `AgentRun`: the answer, the trace,
and the costs summed over every model call (policy turns, the zoom's perception, ``auto`` mode's one answer).
`format_trace` prints it for people.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from .graph import Mode, question_message

_COSTS = ("prompt_tokens", "kv_reused", "text_tokens", "visual_tokens", "vision_encodes", "forward_passes",
          "generated_tokens", "layer_tokens")


@dataclass
class AgentRun:
    """One question through the loop.

    Attributes:
        answer: the final answer.
        mode: ``"auto"`` or ``"tool"``.
        turns: policy turns (0 in ``auto`` mode).
        tool_calls: tool calls made (valid or not).
        zooms: successful internal zooms (a spliced RoI in ``auto`` mode, a zoom tool result in ``tool`` mode).
        box: the first zoom box in source pixels, or None.
        gate_score: the gate's score when it ran.
        costs: summed over the run's model calls (see `qzoom_agent.chat.CallStats`); the zoom tool's twig and a
            rebuilt perception add their layer-tokens and encodes.
        latency_s: wall time of the run.
        trace: the graph's trace records.
        thread_id: the checkpointer thread, when one was used.
    """

    answer: str
    mode: str
    turns: int = 0
    tool_calls: int = 0
    zooms: int = 0
    box: list[int] | None = None
    gate_score: float | None = None
    costs: dict[str, int] = field(default_factory=dict)
    latency_s: float = 0.0
    trace: list[dict] = field(default_factory=list)
    thread_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "latency_s": round(self.latency_s, 4)}


def summarize(state: dict, mode: str, latency_s: float, thread_id: str | None = None) -> AgentRun:
    """An `AgentRun` from a finished graph state."""
    trace = state.get("trace", [])
    run = AgentRun(answer=state.get("answer") or "", mode=mode, turns=state.get("turns", 0), latency_s=latency_s,
                   trace=trace, thread_id=thread_id, costs=dict.fromkeys(_COSTS, 0))
    for rec in trace:
        if rec["node"] == "auto" and "error" not in rec:
            run.zooms += int(rec["zoomed"])
            run.box = rec["bbox"]
            run.gate_score = rec["gate_score"]
            run.costs.update(visual_tokens=rec["visual_tokens"], forward_passes=rec["forward_passes"],
                             generated_tokens=rec["generated_tokens"], layer_tokens=rec["layer_tokens"],
                             vision_encodes=1 + int(rec["zoomed"]))
        elif rec["node"] == "policy":
            run.tool_calls += len(rec.get("tool_calls", [])) + len(rec.get("invalid_tool_calls", []))
            for key in _COSTS:
                run.costs[key] += int(rec.get("stats", {}).get(key, 0))
        elif rec["node"] == "tools":
            art = rec.get("artifact") or {}
            run.costs["layer_tokens"] += int(art.get("layer_tokens") or 0)
            run.costs["vision_encodes"] += int(art.get("vision_encodes") or 0)
            if art.get("gate_score") is not None:
                run.gate_score = art["gate_score"]
            if not art.get("is_error") and art.get("box") and rec.get("status") != "error":
                run.zooms += 1
                run.box = run.box or art["box"]
    return run


def ask_agent(graph, image: Any, question: str, mode: Mode = "tool", *, thread_id: str | None = None,
              checkpointed: bool = False) -> AgentRun:
    """Run one question through a compiled graph (`build_graph`).

    Args:
        graph: the compiled loop.
        image: a PIL image, a path, or base64 / data-URL text.
        question: the question.
        mode: ``"auto"`` or ``"tool"``.
        thread_id: the checkpointer thread to run in (a new one when None and ``checkpointed``).
        checkpointed: whether the graph was compiled with a checkpointer (a thread id is then required).
    """
    if mode not in ("auto", "tool"):
        raise ValueError(f"mode must be 'auto' or 'tool', got {mode!r}")
    config = None
    if checkpointed or thread_id is not None:
        thread_id = thread_id or uuid.uuid4().hex
        config = {"configurable": {"thread_id": thread_id}}
    t0 = time.perf_counter()
    state = graph.invoke({"messages": [question_message(image, question)], "mode": mode, "turns": 0,
                          "answer": None}, config)
    return summarize(state, mode, time.perf_counter() - t0, thread_id)


def format_trace(run: AgentRun) -> str:
    """The run for people: one line per step, then the answer and the costs."""
    lines = []
    for rec in run.trace:
        node = rec["node"]
        if node == "auto":
            lines.append(f"auto    gate {rec.get('gate_score')}  zoomed={rec.get('zoomed')}  box {rec.get('bbox')}"
                         if "error" not in rec else f"auto    error: {rec['error']}")
        elif node == "policy":
            if "error" in rec:
                lines.append(f"policy  error: {rec['error']}")
                continue
            calls = [f"{c['name']}({json.dumps(c['args'])})" for c in rec.get("tool_calls", [])]
            bad = [f"invalid: {c.get('error')}" for c in rec.get("invalid_tool_calls", [])]
            said = rec.get("text") or ""
            stats = rec.get("stats", {})
            new = stats.get("prompt_tokens", 0) - stats.get("kv_reused", 0)
            lines.append(f"policy  {said!r} {' '.join(calls + bad)}  [prefill {new} new / "
                         f"{stats.get('kv_reused', 0)} reused tokens]")
        elif node == "tools":
            art = rec.get("artifact") or {}
            extra = f"  source={art.get('source')}" if art.get("source") else ""
            lines.append(f"tool    {rec.get('tool')}: {rec.get('text')}{extra}")
        elif node == "reject":
            lines.append(f"reject  {rec.get('errors')}")
        elif node == "answer" and rec.get("stopped"):
            lines.append(f"stop    {rec['stopped']}")
    c = run.costs
    lines.append(f"answer  {run.answer!r}")
    lines.append(f"costs   turns {run.turns}, tool calls {run.tool_calls}, zooms {run.zooms}, vision encodes "
                 f"{c.get('vision_encodes', 0)}, visual tokens {c.get('visual_tokens', 0)}, forward passes "
                 f"{c.get('forward_passes', 0)}, generated {c.get('generated_tokens', 0)}, layer-tokens "
                 f"{c.get('layer_tokens', 0)}, KV reused {c.get('kv_reused', 0)}, {run.latency_s:.2f} s")
    return "\n".join(lines)
