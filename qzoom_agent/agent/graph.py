"""The reasoning loop: an explicit LangGraph ``StateGraph`` around a `ChatQZoom` policy and the zoom tools.

Two modes share the graph:

* ``auto``: the paper's inference. The gate decides and the RoI is spliced into one pass (`QZoomModel.answer`);
  no tool call, one node.
* ``tool``: thinking with images. The policy sees the image and question and decides whether to call ``zoom``
  (the box comes from its own first prefill) and when to answer; tool results come back as image turns.

::

    START -> route_mode -> auto_answer ----------------------------> END
                        -> policy -> tools  -> policy ...
                                  -> reject -> policy ...   (malformed calls: an error tool turn)
                                  -> finish -------------------> END

Every way a turn can go wrong (malformed call JSON, an unknown tool, bad arguments, no image, too many turns)
ends in an error tool message or a final answer in the trace, never in an exception out of the graph. The graph
compiles with any LangGraph checkpointer; with a persistent one a thread resumes after a restart, and the zoom
tool then rebuilds the perception once (its artifact says ``"perception": "rebuilt"``).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal, TypedDict

from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, ToolMessage
from langchain_core.tools import BaseTool
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode

from ..images import ImageLoadError, load_image
from .chat_model import ChatQZoom
from .lc_tools import zoom_tool
from .messages import text_of, to_chat

Mode = Literal["auto", "tool"]
MAX_TURNS = 5  # policy turns per question (DeepEyes' default)
_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL)


class AgentState(TypedDict, total=False):
    """The loop's state.

    Attributes:
        messages: the conversation (LangChain messages; images in human and tool messages).
        mode: ``"auto"`` or ``"tool"``.
        turns: policy turns taken.
        answer: the final answer, once there is one.
        trace: one record per step (policy turns, tool results, the answer), for people and for benchmarks.
    """

    messages: Annotated[list[AnyMessage], add_messages]
    mode: Mode
    turns: int
    answer: str | None
    trace: Annotated[list[dict], operator.add]


def extract_answer(text: str) -> str:
    """The final answer in a turn: inside ``<answer>...</answer>`` when present, else the whole text.

    >>> extract_answer("I zoomed. <answer>7B</answer>")
    '7B'
    >>> extract_answer(" red ")
    'red'
    """
    found = _ANSWER.findall(text or "")
    return (found[-1] if found else text or "").strip()


def _first_image_and_question(messages: list[AnyMessage]) -> tuple[Any, str]:
    """The image and text of the first human message (what ``auto`` mode answers)."""
    for m in messages:
        if isinstance(m, HumanMessage):
            chat = to_chat([m])[0]
            parts = chat["content"] if isinstance(chat["content"], list) else []
            images = [p["image"] for p in parts if p.get("type") == "image"]
            question = " ".join(p.get("text", "") for p in parts if p.get("type") == "text").strip()
            if isinstance(chat["content"], str):
                question = chat["content"]
            if not images:
                raise ValueError("the question has no image")
            return images[0], question
    raise ValueError("the conversation has no human message")


def build_graph(chat: ChatQZoom, *, tools: Sequence[BaseTool] | None = None, max_turns: int = MAX_TURNS,
                auto_tokens: int = 32, checkpointer: Any = None, policy: Any = None):
    """Compile the loop.

    Args:
        chat: the policy (its model also serves ``auto`` mode and the zoom tool's perception).
        tools: the tools the policy may call; default: the internal ``zoom``.
        max_turns: policy turns before the loop stops and answers with what it has.
        auto_tokens: decoding budget of ``auto`` mode's answer.
        checkpointer: a LangGraph checkpointer (e.g. ``SqliteSaver``) for threads that survive a restart.
        policy: another chat model to decide the turns (anything with ``bind_tools``); default: ``chat``.

    Returns:
        A compiled graph; invoke it with ``{"messages": [HumanMessage([image block, text])], "mode": "tool"}``.
    """
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    tools = list(tools) if tools is not None else [zoom_tool(chat.session_for)]
    policy = (policy or chat).bind_tools(tools)
    tool_node = ToolNode(tools, handle_tool_errors=True)

    def auto_answer(state: AgentState) -> dict:
        try:
            image, question = _first_image_and_question(state["messages"])
            image = load_image(_decoded(image))
            ans = chat.model.answer(image, question, mode="auto", max_new_tokens=auto_tokens)
        except (ValueError, ImageLoadError) as err:
            msg = AIMessage(content="", response_metadata={"error": str(err)})
            return {"messages": [msg], "answer": "", "trace": [{"node": "auto", "error": str(err)}]}
        record = ans.to_json()
        msg = AIMessage(content=ans.text, response_metadata={"qzoom": record})
        return {"messages": [msg], "answer": ans.text, "trace": [{"node": "auto", **record}]}

    def policy_turn(state: AgentState) -> dict:
        turns = state.get("turns", 0) + 1
        try:
            msg = policy.invoke(state["messages"])
        except (ValueError, ImageLoadError) as err:  # e.g. an image block that does not decode
            msg = AIMessage(content="", response_metadata={"error": str(err)})
            return {"messages": [msg], "turns": turns, "trace": [{"node": "policy", "error": str(err)}]}
        record = {"node": "policy", "text": msg.content, "tool_calls": [dict(c) for c in msg.tool_calls],
                  "invalid_tool_calls": [dict(c) for c in msg.invalid_tool_calls],
                  "stats": msg.response_metadata.get("qzoom", {})}
        return {"messages": [msg], "turns": turns, "trace": [record]}

    def run_tools(state: AgentState) -> dict:
        out = tool_node.invoke(state)
        msgs = out["messages"] if isinstance(out, dict) else out
        trace = [{"node": "tools", "tool": m.name, "status": m.status, "text": text_of(m.content),
                  "artifact": m.artifact if isinstance(m.artifact, dict) else None} for m in msgs]
        return {"messages": msgs, "trace": trace}

    def reject(state: AgentState) -> dict:
        last = state["messages"][-1]
        msgs = [ToolMessage(content=f"Error: {c.get('error') or 'malformed tool call'}. Write a call as "
                            '<tool_call>{"name": ..., "arguments": {...}}</tool_call>, or answer.',
                            tool_call_id=c.get("id") or "invalid", name=c.get("name") or "invalid", status="error")
                for c in last.invalid_tool_calls]
        return {"messages": msgs, "trace": [{"node": "reject", "errors": [c.get("error") for c in
                                                                          last.invalid_tool_calls]}]}

    def finish(state: AgentState) -> dict:
        last = state["messages"][-1]
        capped = isinstance(last, AIMessage) and bool(last.tool_calls or last.invalid_tool_calls)
        answer = extract_answer(text_of(last.content)) if isinstance(last, AIMessage) else ""
        record = {"node": "answer", "answer": answer, "turns": state.get("turns", 0)}
        if capped:
            record["stopped"] = f"turn limit ({max_turns}) reached with a tool call pending"
        return {"answer": answer, "trace": [record]}

    def route_mode(state: AgentState) -> str:
        return "auto_answer" if state.get("mode", "tool") == "auto" else "policy"

    def route_policy(state: AgentState) -> str:
        last = state["messages"][-1]
        if not isinstance(last, AIMessage) or state.get("turns", 0) >= max_turns:
            return "finish"
        if last.tool_calls:
            return "tools"
        return "reject" if last.invalid_tool_calls else "finish"

    g = StateGraph(AgentState)
    g.add_node("auto_answer", auto_answer)
    g.add_node("policy", policy_turn)
    g.add_node("tools", run_tools)
    g.add_node("reject", reject)
    g.add_node("finish", finish)
    g.add_conditional_edges(START, route_mode, {"auto_answer": "auto_answer", "policy": "policy"})
    g.add_conditional_edges("policy", route_policy, {"tools": "tools", "reject": "reject", "finish": "finish"})
    g.add_edge("tools", "policy")
    g.add_edge("reject", "policy")
    g.add_edge("auto_answer", END)
    g.add_edge("finish", END)
    graph = g.compile(checkpointer=checkpointer)
    return graph


def _decoded(image: Any) -> Any:
    from ..chat import decode_base64

    return decode_base64(image) if isinstance(image, str) else image


def question_message(image: Any, question: str) -> HumanMessage:
    """The first message of a run: ``image`` (a PIL image, a path, or base64 / data-URL text) and ``question``."""
    if isinstance(image, str) and (image.startswith("data:") or len(image) > 1024):
        block: dict = {"type": "image_url", "image_url": {"url": image}}
    elif isinstance(image, str) or hasattr(image, "__fspath__"):
        block = {"type": "image", "path": str(image)}
    else:
        block = {"type": "image", "image": image}
    return HumanMessage(content=[block, {"type": "text", "text": question}])
