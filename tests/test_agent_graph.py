"""The agent layer: ChatQZoom as a LangChain chat model, the zoom tools through LangGraph's ToolNode, and the loop's
robustness (every bad turn ends in an error tool message or a final answer, never an exception), its checkpointed
resume and its drawing.

Robustness tests script the policy's turns (a chat model that replays given messages): they test the graph and the
tools, which are real; the model-driven paths run ChatQZoom on a tiny random model.
"""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import PrivateAttr
from tiny_models import QUESTION, make_image, make_model

from qzoom_agent.agent.chat_model import ChatQZoom
from qzoom_agent.agent.graph import build_graph, extract_answer, question_message
from qzoom_agent.agent.lc_tools import crop_tool, zoom_tool
from qzoom_agent.agent.messages import parse_tool_calls
from qzoom_agent.agent.run import ask_agent, format_trace

SNAPSHOT = Path(__file__).parent / "snapshots" / "agent_graph.mmd"


class Scripted(BaseChatModel):
    """Replays ``replies`` in order (the last one forever)."""

    replies: list
    _at: int = PrivateAttr(default=0)

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools, **kwargs):
        return self

    def _generate(self, messages, stop=None, run_manager=None, **kwargs) -> ChatResult:
        msg = self.replies[min(self._at, len(self.replies) - 1)]
        self._at += 1
        return ChatResult(generations=[ChatGeneration(message=msg.model_copy())])


def _call(name: str, args: dict, i: int = 0) -> AIMessage:
    return AIMessage(content="", tool_calls=[{"name": name, "args": args, "id": f"c{i}", "type": "tool_call"}])


@pytest.fixture(scope="module")
def chat():
    return ChatQZoom(model=make_model("qwen2_5_vl", roi_threshold=0.3), budget=(16, 64), max_new_tokens=6)


def _run(chat, replies, *, image=True, tools=None, max_turns=5, mode="tool"):
    graph = build_graph(chat, policy=Scripted(replies=replies), tools=tools, max_turns=max_turns)
    msg = question_message(make_image(seed=7), QUESTION) if image else HumanMessage(QUESTION)
    return graph.invoke({"messages": [msg], "mode": mode, "turns": 0})


def test_the_graph_drawing_is_stable(chat):
    drawing = build_graph(chat).get_graph().draw_mermaid()
    assert SNAPSHOT.read_text() == drawing


def test_a_zoom_call_returns_the_crop_and_its_box(chat):
    out = _run(chat, [_call("zoom", {}), AIMessage("7")])
    tool_msgs = [m for m in out["messages"] if m.type == "tool"]
    assert len(tool_msgs) == 1 and tool_msgs[0].status == "success"
    blocks = tool_msgs[0].content
    assert [b["type"] for b in blocks] == ["image", "text"] and blocks[0]["mime_type"] == "image/png"
    art = tool_msgs[0].artifact
    assert art["box"] is not None and art["source"] == "fresh" and art["perception"] == "rebuilt"
    assert out["answer"] == "7"
    hinted = _run(chat, [_call("zoom", {"hint": "the green tag"}), AIMessage("8")])
    assert [m for m in hinted["messages"] if m.type == "tool"][0].artifact["source"] == "hinted"


@pytest.mark.parametrize("bad", [
    {"bbox_2d": [5000, 5000, 6000, 6000]},  # outside the image
    {"bbox_2d": [math.nan, 1, 2, 3]},
    {"bbox_2d": [10**400, 0, 10**401, 50]},
    {"bbox_2d": [math.inf, 0, 40, 40]},
    {"bbox_2d": "not a box"},
    {"bbox_2d": [1, 2, 3, 4], "img_idx": 9},
])
def test_bad_crop_arguments_are_error_tool_messages(chat, bad):
    tools = [zoom_tool(chat.session_for), crop_tool(chat.session_for)]
    out = _run(chat, [_call("image_zoom_in_tool", bad), AIMessage("done")], tools=tools)
    tool_msg = [m for m in out["messages"] if m.type == "tool"][0]
    assert tool_msg.status == "error" or tool_msg.artifact.get("is_error")
    assert out["answer"] == "done"


def test_malformed_unknown_and_mistyped_calls_end_cleanly(chat):
    malformed = AIMessage(content="", invalid_tool_calls=[{"name": None, "args": "{bad", "id": "x",
                                                           "error": "malformed JSON", "type": "invalid_tool_call"}])
    out = _run(chat, [malformed, _call("crop_it", {}, 1), _call("zoom", {"hint": 123}, 2), AIMessage("B")])
    kinds = [(m.type, getattr(m, "status", None)) for m in out["messages"]]
    assert kinds.count(("tool", "error")) == 3
    assert [r["node"] for r in out["trace"]] == ["policy", "reject", "policy", "tools", "policy", "tools", "policy",
                                                "answer"]
    assert out["answer"] == "B"


def test_no_image_and_too_many_turns(chat):
    out = _run(chat, [_call("zoom", {}), AIMessage("?")], image=False)
    tool_msg = [m for m in out["messages"] if m.type == "tool"][0]
    assert "needs an image" in tool_msg.content[-1]["text"]
    auto = _run(chat, [AIMessage("unused")], image=False, mode="auto")
    assert auto["answer"] == "" and "error" in auto["trace"][0]
    capped = _run(chat, [_call("zoom", {})], max_turns=2)
    assert capped["turns"] == 2 and "turn limit" in capped["trace"][-1]["stopped"]


def test_auto_mode_is_one_gated_pass(chat):
    run = ask_agent(build_graph(chat), make_image(seed=7), QUESTION, "auto")
    assert run.turns == 0 and run.tool_calls == 0 and run.costs["forward_passes"] >= 1
    assert run.costs["layer_tokens"] > 0 and "auto" in format_trace(run)


def test_chat_model_invoke_stream_batch_and_cache_reuse(chat):
    first = [question_message(make_image(seed=3), QUESTION)]
    msg = chat.invoke(first)
    q = msg.response_metadata["qzoom"]
    assert msg.usage_metadata["input_tokens"] == q["prompt_tokens"] > q["visual_tokens"] > 0
    assert q["vision_encodes"] == 1 and q["perception"] == "captured"
    follow = chat.invoke([*first, msg, HumanMessage("Are you sure?")])
    assert follow.usage_metadata["input_token_details"]["cache_read"] >= q["prompt_tokens"]
    assert follow.response_metadata["qzoom"]["vision_encodes"] == 0
    streamed = "".join(c.content for c in chat.stream(first))
    assert streamed == msg.content
    batch = chat.batch([first, [question_message(make_image(seed=4), QUESTION)]])
    assert len(batch) == 2 and batch[0].content == msg.content


def test_tool_call_parsing():
    text = 'Let me look.\n<tool_call>\n{"name": "zoom", "arguments": {"hint": "tag"}}\n</tool_call>'
    content, calls, invalid = parse_tool_calls(text)
    assert content == "Let me look." and calls[0]["name"] == "zoom" and calls[0]["args"] == {"hint": "tag"}
    assert invalid == []
    _, calls, invalid = parse_tool_calls('<tool_call>{"name": "zoom", "arguments": [1]}</tool_call><tool_call>{x')
    assert calls == [] and len(invalid) == 2 and all(i["type"] == "invalid_tool_call" for i in invalid)
    assert extract_answer("so <answer> 42 </answer>") == "42"


def test_a_checkpointed_thread_resumes_after_a_restart(tmp_path):
    from langgraph.checkpoint.sqlite import SqliteSaver

    image_path = tmp_path / "scene.png"
    make_image(seed=7).save(image_path)
    db = tmp_path / "threads.sqlite"
    qm = make_model("qwen2_5_vl", roi_threshold=0.3)
    config = {"configurable": {"thread_id": "t1"}}
    conn = sqlite3.connect(db, check_same_thread=False)
    chat = ChatQZoom(model=qm, budget=(16, 64))
    graph = build_graph(chat, policy=Scripted(replies=[_call("zoom", {}), AIMessage("first")]),
                        checkpointer=SqliteSaver(conn))
    graph.invoke({"messages": [question_message(image_path, QUESTION)], "mode": "tool", "turns": 0}, config)
    conn.close()
    # a new process: new chat model, no sessions; the thread's messages come back from the database
    conn = sqlite3.connect(db, check_same_thread=False)
    chat = ChatQZoom(model=qm, budget=(16, 64))
    graph = build_graph(chat, policy=Scripted(replies=[_call("zoom", {}, 5), AIMessage("second")]),
                        checkpointer=SqliteSaver(conn))
    before = graph.get_state(config).values
    assert before["answer"] == "first" and len(before["messages"]) == 4
    out = graph.invoke({"messages": [HumanMessage("Look again.")], "turns": 0}, config)
    conn.close()
    tool_msgs = [m for m in out["messages"] if m.type == "tool"]
    assert len(tool_msgs) == 2 and tool_msgs[-1].artifact["perception"] == "rebuilt"
    assert tool_msgs[-1].artifact["box"] == tool_msgs[0].artifact["box"]
    assert out["answer"] == "second"
