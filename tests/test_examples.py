"""The examples run as written: the LangGraph loop, LangChain's create_agent with the zoom tool, an MCP client."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from qzoom_agent.policy import is_policy

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
needs_policy = pytest.mark.skipif(not is_policy("zoomworld-tiny-tool"), reason="the bundled policy is not installed")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_policy
def test_langgraph_loop_calls_zoom_on_a_fine_question():
    run = _load("langgraph_loop").main()
    assert run.tool_calls == 1 and run.zooms == 1 and run.box is not None
    tools = [r for r in run.trace if r["node"] == "tools"]
    assert tools[0]["artifact"]["source"] == "cached"  # the box came from the policy's own first prefill
    assert run.costs["vision_encodes"] == 2  # the global image once, the crop once


@needs_policy
def test_create_agent_runs_the_zoom_tool():
    out = _load("create_agent_zoom").main()
    kinds = [m.type for m in out["messages"]]
    assert kinds[:3] == ["human", "ai", "tool"] and kinds[-1] == "ai"
    tool = out["messages"][2]
    assert [b["type"] for b in tool.content] == ["image", "text"] and tool.artifact["box"] is not None


def test_mcp_client_session():
    out = _load("mcp_client").main()
    assert set(out["tools"]) >= {"zoom", "ask"}
    assert not out["zoom"].is_error and out["zoom"].structured_content["box"] is not None
    assert not out["ask"].is_error and "answer" in out["ask"].structured_content
