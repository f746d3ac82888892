"""The Q-Zoom agent in ``tool`` mode for `compare`: a tool-calling policy decides whether to call the internal zoom.

It runs the agent layer's LangGraph loop (`qzoom_agent.agent.graph`): the policy's first prefill of the image and
question is the Q-Zoom perception, a ``zoom`` call crops the twig's box from that cached perception (the image is
not encoded again), and the crop returns as a tool turn that prefills only its own tokens on the continued cache.
"""

from __future__ import annotations

from typing import Any

from ..agent.chat_model import ChatQZoom
from ..agent.graph import MAX_TURNS, build_graph
from ..agent.run import ask_agent
from ..model import QZoomModel
from .agents import AgentResult

DEFAULT_POLICY = "zoomworld-tiny-tool"


class QZoomToolAgent:
    """A tool-calling policy with the internal zoom tool, run through the agent loop.

    Args:
        policy: the policy model (its Q-Zoom heads serve the zoom).
        name: the agent's name in results.
        max_new_tokens: decoding budget per policy turn.
        max_turns: policy turns per question.
    """

    def __init__(self, policy: QZoomModel, name: str, *, max_new_tokens: int = 64,
                 max_turns: int = MAX_TURNS) -> None:
        if policy.heads is None:
            raise ValueError(f"agent {name!r} needs Q-Zoom heads for its zoom tool; the policy model has none")
        self.name = name
        self.graph = build_graph(ChatQZoom(model=policy, max_new_tokens=max_new_tokens, max_sessions=1),
                                 max_turns=max_turns)
        self.last_run = None

    def run(self, image: Any, question: str) -> AgentResult:
        """Answer through the loop in tool mode; costs are summed over the policy turns and the zoom."""
        run = ask_agent(self.graph, image, question, "tool")
        self.last_run = run
        c = run.costs
        return AgentResult(answer=run.answer, latency_s=run.latency_s, visual_tokens=c["visual_tokens"],
                           forward_passes=c["forward_passes"], generated_tokens=c["generated_tokens"],
                           tool_calls=run.tool_calls, zooms=run.zooms, gate_score=run.gate_score, bbox=run.box,
                           vision_encodes=c["vision_encodes"], layer_tokens=c["layer_tokens"])
