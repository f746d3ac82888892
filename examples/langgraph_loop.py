"""The LangGraph loop in tool mode: the bundled policy decides whether to call the internal zoom, then answers.

    python examples/langgraph_loop.py [IMAGE QUESTION]
"""

from __future__ import annotations

import sys

from qzoom_agent.agent.chat_model import ChatQZoom
from qzoom_agent.agent.graph import build_graph
from qzoom_agent.agent.run import AgentRun, ask_agent, format_trace
from qzoom_agent.zoomworld import sample


def main(image=None, question: str | None = None, policy: str = "zoomworld-tiny-tool") -> AgentRun:
    if image is None:  # a ZoomWorld test question with a small tag to read
        s = sample("hr", "test", 3)
        image, question = s.image, s.question
    graph = build_graph(ChatQZoom.from_pretrained(policy))
    return ask_agent(graph, image, question, "tool")


if __name__ == "__main__":
    print(format_trace(main(*sys.argv[1:3])))
