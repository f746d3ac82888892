"""The MCP server (`qzoom-agent serve-mcp`) with real MCP clients: in-process, over a stdio subprocess and over
streamable HTTP. Image references are untrusted input: every refusal must be a one-line tool error, after which the
server still answers."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from PIL import Image

from qzoom_agent import zoomworld
from qzoom_agent.agent.image_refs import ImageRefError, ImageRefPolicy, resolve_image_ref
from qzoom_agent.agent.mcp_server import build_server, request_body_limit
from qzoom_agent.checks import UsageError
from qzoom_agent.cli import main

MAX_BYTES = 3_000_000
MAX_PIXELS = 20_000_000
REPO = Path(__file__).resolve().parents[1]


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def forged_png(width: int, height: int) -> bytes:
    """A real 8x8 PNG whose IHDR claims ``width`` x ``height`` (CRC fixed): only a header check can refuse it
    before decoding; decoding would fail on the short pixel data instead."""
    data = bytearray(_png_bytes(Image.new("RGB", (8, 8), (200, 30, 30))))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.fixture(scope="module")
def model():
    from transformers.utils import logging as hf_logging

    from qzoom_agent.model import QZoomModel

    hf_logging.disable_progress_bar()
    return QZoomModel.from_pretrained("zoomworld-tiny")


@pytest.fixture(scope="module")
def sample():
    return zoomworld.sample("hr", "test", 3)  # a "read" question about a small tag


@pytest.fixture()
def folders(tmp_path, sample):
    """``root/`` (allowed) holding the ZoomWorld image and bad files; ``outside/`` (not allowed) with an image."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    sample.image.save(root / "scene.png")
    Image.new("RGB", (64, 64), (0, 128, 0)).save(outside / "secret.png")
    (root / "escape.png").symlink_to(outside / "secret.png")
    (root / "escape_dir").symlink_to(outside, target_is_directory=True)
    (root / "bomb.png").write_bytes(forged_png(30000, 30000))
    (root / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(MAX_BYTES))
    (root / "notes.txt").write_text("not an image")
    (root / "sub").mkdir()
    return root, outside


@pytest.fixture()
def server(model, folders):
    policy = ImageRefPolicy((folders[0],), max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)
    return build_server(model, policy)


def _text(result) -> str:
    texts = [c.text for c in result.content if c.type == "text"]
    assert len(texts) == 1, result.content
    return texts[0]


def _refusals(root: Path, outside: Path) -> list[tuple[str, str, dict, str]]:
    """(case, tool, arguments, a phrase the one-line message must hold)."""
    q = "What is written on the cyan tag?"
    bomb_b64 = base64.b64encode(forged_png(30000, 30000)).decode()
    png = (root / "scene.png").read_bytes()
    truncated_png = base64.b64encode(png[: len(png) // 2]).decode()
    return [
        ("outside absolute", "zoom", {"image": str(outside / "secret.png"), "question": q}, "outside the allowed"),
        ("dot-dot", "zoom", {"image": "../outside/secret.png", "question": q}, "contains '..'"),
        ("dot-dot absolute", "zoom", {"image": f"{root}/sub/../../outside/secret.png", "question": q}, "'..'"),
        ("escaping symlink", "zoom", {"image": "escape.png", "question": q}, "outside the allowed"),
        ("escaping dir symlink", "zoom", {"image": str(root / "escape_dir" / "secret.png"), "question": q},
         "outside the allowed"),
        ("bad base64", "zoom", {"image": "iVBORw0KGgo@@@not*base64", "question": q}, "not valid base64"),
        ("base64 of a truncated png", "zoom", {"image": truncated_png, "question": q}, "truncated or corrupt"),
        ("base64 over the byte limit", "zoom", {"image": "iVBORw0KGgo" + "A" * (MAX_BYTES * 2), "question": q},
         "over this server's limit"),
        ("file url", "zoom", {"image": f"file://{root}/scene.png", "question": q}, "file:// URLs are not accepted"),
        ("http url", "ask", {"image": "http://127.0.0.1:9/cat.png", "question": q}, "URLs are not accepted"),
        ("https url", "zoom", {"image": "https://example.com/cat.png", "question": q}, "URLs are not accepted"),
        ("non-base64 data url", "zoom", {"image": "data:image/png,abc", "question": q}, "data:image/<type>;base64"),
        ("30000x30000 png file", "zoom", {"image": "bomb.png", "question": q}, "30000x30000"),
        ("30000x30000 png base64", "ask", {"image": bomb_b64, "question": q}, "30000x30000"),
        ("file over the byte limit", "zoom", {"image": "big.png", "question": q}, "over this server's limit"),
        ("not an image", "zoom", {"image": "notes.txt", "question": q}, "not an image"),
        ("a directory", "zoom", {"image": "sub", "question": q}, "not a regular file"),
        ("missing file", "zoom", {"image": "nope.png", "question": q}, "not found"),
        ("empty image", "zoom", {"image": "  ", "question": q}, "empty"),
        ("empty question", "zoom", {"image": "scene.png", "question": " "}, "question is empty"),
        ("unknown mode", "ask", {"image": "scene.png", "question": q, "mode": "fast"}, "mode must be one of"),
    ]


def test_refusals_are_one_line_tool_errors_and_the_server_keeps_serving(server, folders, sample, caplog):
    root, outside = folders
    cases = _refusals(root, outside)

    async def run():
        async with Client(server) as client:
            results = [(case, phrase, await client.call_tool(tool, args)) for case, tool, args, phrase in cases]
            return results, await client.call_tool("zoom", {"image": "scene.png", "question": sample.question})

    with caplog.at_level(logging.INFO):
        results, good = asyncio.run(run())
    for case, phrase, result in results:
        assert result.is_error, case
        text = _text(result)
        assert "\n" not in text and phrase in text, (case, text)
        assert "Traceback" not in text and "Error executing tool" not in text, (case, text)
    assert not [r for r in caplog.records if r.exc_info], "a refusal logged a traceback"
    assert sum("refused" in r.getMessage() for r in caplog.records) == len(cases)
    # and a good zoom still works
    assert not good.is_error, _text(good)
    kinds = [c.type for c in good.content]
    assert kinds == ["image", "text"]
    crop = Image.open(io.BytesIO(base64.b64decode(good.content[0].data)))
    assert good.content[0].mime_type == "image/png"
    meta = good.structured_content
    assert list(crop.size) == meta["view_size"]
    x1, y1, x2, y2 = meta["box"]
    w, h = sample.image.size
    assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
    assert meta["source"] == "fresh" and 0.0 <= meta["gate_score"] <= 1.0
    assert meta["image_size"] == [w, h]


def test_zoom_and_ask_accept_base64_data_urls_and_allowed_file_urls(model, folders, sample):
    root, _ = folders
    png = (root / "scene.png").read_bytes()
    b64 = base64.b64encode(png).decode()
    policy = ImageRefPolicy((root,), allow_urls=True, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)
    server = build_server(model, policy, max_new_tokens=8)

    async def run():
        async with Client(server) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            by_path = await client.call_tool("zoom", {"image": str(root / "scene.png"), "question": sample.question})
            by_b64 = await client.call_tool("zoom", {"image": b64, "question": sample.question})
            by_url = await client.call_tool("zoom", {"image": f"data:image/png;base64,{b64}",
                                                     "question": sample.question, "hint": "the cyan tag"})
            by_file = await client.call_tool("ask", {"image": f"file://{root}/scene.png", "question": sample.question,
                                                     "mode": "never"})
            escape = await client.call_tool("ask", {"image": f"file://{root}/escape.png", "question": "x"})
            remote = await client.call_tool("ask", {"image": "https://example.com/a.png", "question": "x"})
            return tools, by_path, by_b64, by_url, by_file, escape, remote

    tools, by_path, by_b64, by_url, by_file, escape, remote = asyncio.run(run())
    assert set(tools) == {"zoom", "ask"}
    assert set(tools["zoom"].input_schema["required"]) == {"image", "question"}
    assert "hint" in tools["zoom"].input_schema["properties"]
    assert tools["ask"].input_schema["properties"]["mode"]["default"] == "auto"
    assert not by_path.is_error and not by_b64.is_error and not by_url.is_error
    assert by_b64.structured_content["box"] == by_path.structured_content["box"]  # same image, same box
    assert by_url.structured_content["hint"] == "the cyan tag"
    assert not by_file.is_error
    record = by_file.structured_content
    assert record["mode"] == "never" and record["zoomed"] is False and record["gate_score"] is None
    assert record["image_size"] == list(sample.image.size) and record["visual_tokens"] > 0
    assert escape.is_error and "outside the allowed" in _text(escape)
    assert remote.is_error and "does not fetch remote images" in _text(remote)


def test_ask_modes_and_a_model_without_heads(folders, sample):
    from qzoom_agent.model import QZoomModel

    root, _ = folders
    plain = QZoomModel.from_pretrained("zoomworld-tiny", qzoom=False)
    calls = []

    def tool_mode(model, image, question):  # the hook a later agent-graph mode plugs into
        calls.append((image.size, question))
        return {"answer": "from the hook", "zoomed": False}

    server = build_server(plain, ImageRefPolicy((root,)), extra_modes={"tool": tool_mode})

    async def run():
        async with Client(server) as client:
            return [await client.call_tool(name, args) for name, args in (
                ("zoom", {"image": "scene.png", "question": sample.question}),
                ("ask", {"image": "scene.png", "question": sample.question, "mode": "auto"}),
                ("ask", {"image": "scene.png", "question": sample.question, "mode": "never"}),
                ("ask", {"image": "scene.png", "question": sample.question, "mode": "tool"}),
            )]

    zoom, auto, never, tool = asyncio.run(run())
    assert zoom.is_error and "needs Q-Zoom heads" in _text(zoom)
    assert auto.is_error and "needs Q-Zoom heads" in _text(auto)
    assert not never.is_error and isinstance(never.structured_content["answer"], str)
    assert tool.structured_content == {"answer": "from the hook", "zoomed": False, "mode": "tool"}
    assert calls == [(sample.image.size, sample.question)]
    with pytest.raises(UsageError, match="extra ask mode 'auto'"):
        build_server(plain, ImageRefPolicy((root,)), extra_modes={"auto": tool_mode})


def test_policy_is_validated_and_the_pixel_limit_reads_the_header_only(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        ImageRefPolicy((tmp_path / "missing",))
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is not a directory"):
        ImageRefPolicy((tmp_path / "file",))
    with pytest.raises(UsageError, match="max_bytes"):
        ImageRefPolicy((tmp_path,), max_bytes=0)
    no_paths = ImageRefPolicy(())
    with pytest.raises(ImageRefError, match="accepts no image paths"):
        resolve_image_ref("scene.png", no_paths)
    # a forged 30000x30000 header is refused as too large, not as truncated: decoding never started
    with pytest.raises(ImageRefError, match="30000x30000 = 900,000,000 pixels, over the limit"):
        resolve_image_ref(base64.b64encode(forged_png(30000, 30000)).decode(), no_paths)
    small = resolve_image_ref(base64.b64encode(forged_png(8, 8)).decode(), no_paths)
    assert small.size == (8, 8) and small.getpixel((0, 0)) == (200, 30, 30)
    assert request_body_limit(30_000_000) > 30_000_000 * 4 // 3


def test_real_photo_over_mcp(model, real_data):
    folder = real_data / "sahi"
    if not (folder / "terrain2.png").is_file():
        pytest.skip("sahi/terrain2.png is absent")
    server = build_server(model, ImageRefPolicy((folder,)))

    async def run():
        async with Client(server) as client:
            zoom = await client.call_tool("zoom", {"image": "terrain2.png", "question": "How many cars are there?",
                                                   "hint": "the cars"})
            ask = await client.call_tool("ask", {"image": str(folder / "terrain2.png"),
                                                 "question": "How many cars are there?"})
            return zoom, ask

    zoom, ask = asyncio.run(run())
    assert zoom.structured_content["image_size"] == [1024, 682]  # an error (no region) still says what it saw
    if not zoom.is_error:
        x1, y1, x2, y2 = zoom.structured_content["box"]
        assert 0 <= x1 < x2 <= 1024 and 0 <= y1 < y2 <= 682
    assert not ask.is_error and ask.structured_content["image_size"] == [1024, 682]


def test_cli_usage_errors(tmp_path, capsys):
    assert main(["serve-mcp"]) == 2
    assert "needs --allow-dir" in capsys.readouterr().err
    (tmp_path / "f.txt").write_text("x")
    assert main(["serve-mcp", "--allow-dir", str(tmp_path / "f.txt")]) == 2
    err = capsys.readouterr().err
    assert "is not a directory" in err and err.count("\n") == 1
    assert main(["serve-mcp", "--allow-dir", str(tmp_path), "--port", "9000"]) == 2
    assert "streamable-http" in capsys.readouterr().err
    assert main(["serve-mcp", "--allow-dir", str(tmp_path), "--transport", "streamable-http", "--port", "70000"]) == 2
    assert "1-65535" in capsys.readouterr().err
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:  # a port in use fails before serving
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        assert main(["serve-mcp", "--allow-dir", str(tmp_path), "--transport", "streamable-http", "--port", port]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def _cli(*args: str) -> list[str]:
    return ["-m", "qzoom_agent.cli", *args]


def test_stdio_subprocess(tmp_path, sample):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    sample.image.save(allowed / "scene.png")
    params = StdioServerParameters(command=sys.executable, args=_cli("serve-mcp", "--allow-dir", str(allowed)),
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=str(tmp_path))
    errlog = open(tmp_path / "stderr.txt", "w")  # noqa: SIM115 - the subprocess writes to it

    async def run():
        async with Client(stdio_client(params, errlog=errlog), read_timeout_seconds=60) as client:
            tools = sorted(t.name for t in (await client.list_tools()).tools)
            first = await client.call_tool("zoom", {"image": "scene.png", "question": sample.question})
            bad = await client.call_tool("zoom", {"image": "/etc/passwd", "question": sample.question})
            again = await client.call_tool("zoom", {"image": str(allowed / "scene.png"), "question": sample.question})
            return tools, first, bad, again

    try:
        tools, first, bad, again = asyncio.run(run())
    finally:
        errlog.close()
    assert tools == ["ask", "zoom"]
    assert not first.is_error and [c.type for c in first.content] == ["image", "text"]
    assert bad.is_error and "outside the allowed folders" in _text(bad)
    assert not again.is_error and again.structured_content["box"] == first.structured_content["box"]
    assert "Traceback" not in (tmp_path / "stderr.txt").read_text()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(proc: subprocess.Popen, port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the server exited before listening"
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listened on port {port} within {timeout:.0f} s")


def test_streamable_http_concurrent_calls(tmp_path, sample):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    images = []
    for i in (0, 4):  # the smallest images: the calls test concurrency, not the model
        s = zoomworld.sample("hr", "test", i)
        s.image.save(allowed / f"scene{i}.png")
        images.append((f"scene{i}.png", s.question))
    port = _free_port()
    stderr = open(tmp_path / "stderr.txt", "w")  # noqa: SIM115 - the subprocess writes to it
    proc = subprocess.Popen(
        [sys.executable, *_cli("serve-mcp", "--allow-dir", str(allowed), "--transport", "streamable-http",
                               "--host", "127.0.0.1", "--port", str(port))],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        _wait_for_port(proc, port)

        async def run():
            async with Client(f"http://127.0.0.1:{port}/mcp", read_timeout_seconds=120) as client:
                tools = sorted(t.name for t in (await client.list_tools()).tools)
                calls = [client.call_tool("zoom", {"image": images[i % 2][0], "question": images[i % 2][1]})
                         for i in range(16)]
                calls += [client.call_tool("ask", {"image": images[0][0], "question": images[0][1], "mode": "never"})
                          for _ in range(3)]
                calls.append(client.call_tool("zoom", {"image": "../x.png", "question": "q"}))
                return tools, await asyncio.gather(*calls)

        tools, results = asyncio.run(run())
        assert tools == ["ask", "zoom"]
        assert len(results) == 20
        zooms, asks, refused = results[:16], results[16:19], results[19]
        assert not any(r.is_error for r in zooms + asks)
        # model calls did not interleave: the same input gave the same box and gate every time
        for k in (0, 1):
            group = [r.structured_content for r in zooms[k::2]]
            assert all(g["box"] == group[0]["box"] for g in group)
            assert all(abs(g["gate_score"] - group[0]["gate_score"]) < 1e-5 for g in group)
        assert len({r.structured_content["answer"] for r in asks}) == 1
        assert refused.is_error and "'..'" in _text(refused)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        stderr.close()
    log = (tmp_path / "stderr.txt").read_text()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal: exit status 0 or -SIGTERM
    assert code in (0, -signal.SIGTERM), log[-2000:]
    assert "Application shutdown complete" in log and "Traceback" not in log
