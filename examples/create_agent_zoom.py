"""LangChain's own agent (`create_agent`) with ChatQZoom and the internal zoom tool.

    python examples/create_agent_zoom.py
"""

from __future__ import annotations

from langchain.agents import create_agent

from qzoom_agent.agent.chat_model import ChatQZoom
from qzoom_agent.agent.graph import question_message
from qzoom_agent.agent.lc_tools import zoom_tool
from qzoom_agent.zoomworld import sample


def main(policy: str = "zoomworld-tiny-tool") -> dict:
    chat = ChatQZoom.from_pretrained(policy)
    agent = create_agent(chat, tools=[zoom_tool(chat.session_for)])
    s = sample("hr", "test", 3)
    return agent.invoke({"messages": [question_message(s.image, s.question)]})


if __name__ == "__main__":
    for message in main()["messages"]:
        content = message.content if isinstance(message.content, str) else [b["type"] for b in message.content]
        print(f"{message.type:>5}: {content} {getattr(message, 'tool_calls', '') or ''}")
