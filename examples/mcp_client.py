"""An MCP client session against `qzoom-agent serve-mcp` over stdio: list the tools, zoom, ask.

    python examples/mcp_client.py
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from mcp import Client, StdioServerParameters

from qzoom_agent.zoomworld import sample


async def session(folder: Path) -> dict:
    s = sample("hr", "test", 3)
    s.image.save(folder / "scene.png")
    server = StdioServerParameters(command=sys.executable, args=["-m", "qzoom_agent.cli", "serve-mcp",
                                                                 "--allow-dir", str(folder)])
    async with Client(server) as client:
        tools = [t.name for t in (await client.list_tools()).tools]
        zoom = await client.call_tool("zoom", {"image": "scene.png", "question": s.question})
        ask = await client.call_tool("ask", {"image": "scene.png", "question": s.question, "mode": "auto"})
        return {"tools": tools, "zoom": zoom, "ask": ask}


def main() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return asyncio.run(session(Path(tmp)))


if __name__ == "__main__":
    out = main()
    print(out["tools"], out["zoom"].structured_content, out["ask"].structured_content)
