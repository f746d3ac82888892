"""`qzoom-agent ask` and `make-tiny`: JSON output, real images, and one-line errors on bad input."""

from __future__ import annotations

import dataclasses
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from qzoom_agent.cli import main
from qzoom_agent.images import load_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".tif", ".tiff"}
JSON_KEYS = {"answer", "zoomed", "gate_score", "bbox", "visual_tokens", "forward_passes", "latency_s", "image_size"}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    out = {}
    for family in ("qwen2_5_vl", "qwen3_vl", "llava"):
        assert main(["make-tiny", str(root / family), "--family", family]) == 0
        out[family] = root / family
    return out


def ask_json(capsys, *args: str) -> dict:
    code = main(["ask", *args, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def check_answer(rec: dict, image_size: tuple[int, int], max_tokens: int) -> None:
    assert JSON_KEYS <= rec.keys()
    assert rec["image_size"] == list(image_size)
    assert rec["visual_tokens"] - rec["roi_tokens"] <= max_tokens  # the global view
    assert rec["roi_tokens"] <= max_tokens  # the RoI crop obeys the same per-image cap
    if rec["bbox"] is not None:
        x1, y1, x2, y2 = rec["bbox"]
        assert 0 <= x1 < x2 <= image_size[0] and 0 <= y1 < y2 <= image_size[1]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "llava"])
@pytest.mark.parametrize("mode", ["auto", "never", "always"])
def test_ask_json_on_every_family(tiny_dirs, capsys, tmp_path, family, mode):
    path = tmp_path / "scene.png"
    Image.new("RGB", (640, 420), (40, 120, 200)).save(path)
    max_tokens = 64
    rec = ask_json(capsys, str(path), "What color is the sky?", "--model", str(tiny_dirs[family]), "--mode", mode,
                   "--max-tokens", str(max_tokens), "--max-new-tokens", "4")
    check_answer(rec, (640, 420), max_tokens)
    if mode == "never":
        assert rec["gate_score"] is None and not rec["zoomed"] and rec["roi_tokens"] == 0
    else:
        assert 0.0 <= rec["gate_score"] <= 1.0
    assert rec["zoomed"] == (rec["bbox"] is not None)
    assert rec["forward_passes"] >= 1


def test_ask_roi_query_finds_the_box_for_that_text(tiny_dirs, capsys, tmp_path):
    path = tmp_path / "scene.png"
    Image.fromarray((torch.rand(420, 640, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()
                    ).save(path)
    common = [str(path), "--model", str(tiny_dirs["qwen2_5_vl"]), "--mode", "always", "--max-tokens", "64",
              "--max-new-tokens", "2"]
    query = "the green tag"
    asked = ask_json(capsys, common[0], query, *common[1:])
    via = ask_json(capsys, common[0], "What is written on it?\n(A) 1\n(B) 2", *common[1:], "--roi-query", query)
    assert asked["bbox"] is not None and via["bbox"] == asked["bbox"]
    assert main(["ask", *common[:1], "What is on it?", *common[1:], "--roi-query", " "]) == 2
    assert "roi_query" in capsys.readouterr().err


def test_ask_runs_on_every_real_image(tiny_dirs, capsys, real_data):
    paths = sorted(p for p in real_data.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    assert len(paths) >= 20
    names = {p.name for p in paths}
    assert {"dc2_demo.jpg"} <= names  # the 8064x5241 photo is among them
    max_tokens = 256
    for path in paths:
        size = load_image(path).size
        rec = ask_json(capsys, str(path), "What is written here?", "--model", str(tiny_dirs["qwen2_5_vl"]),
                       "--mode", "always", "--max-tokens", str(max_tokens), "--max-new-tokens", "2")
        check_answer(rec, size, max_tokens)
        assert rec["bbox"] is not None, path  # untrained heads fire broadly at the default threshold


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims width x height pixels but carries almost no data (the decompression-bomb case)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    empty = tmp / "empty.png"
    empty.write_bytes(b"")
    text = tmp / "notes.png"
    text.write_text("this is not an image\n")
    good = tmp / "good.jpg"
    Image.new("RGB", (400, 300), (200, 10, 10)).save(good, quality=90)
    truncated = tmp / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:400])
    bomb = tmp / "bomb.png"
    _png_header_only(bomb, 30000, 30000)
    return {
        "empty": (empty, "empty"),
        "text": (text, "not an image"),
        "truncated": (truncated, "truncated"),
        "bomb": (bomb, "QZOOM_MAX_IMAGE_PIXELS"),
        "missing": (tmp / "nope.png", "not found"),
    }


@pytest.mark.parametrize("case", ["empty", "text", "truncated", "bomb", "missing"])
def test_bad_images_exit_2_with_one_line(tiny_dirs, capsys, tmp_path, case):
    path, words = _bad_inputs(tmp_path)[case]
    code = main(["ask", str(path), "q", "--model", str(tiny_dirs["qwen2_5_vl"])])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("qzoom-agent: error:")
    assert words in err and "Traceback" not in err


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("RGB", (1, 5000), (0, 200, 0)),
        lambda: Image.new("RGB", (5000, 1), (0, 200, 0)),
        lambda: Image.linear_gradient("L").resize((300, 200)).convert("I;16"),
        lambda: Image.new("CMYK", (300, 200), (0, 255, 255, 0)),
    ],
    ids=["1x5000", "5000x1", "16bit-gray", "cmyk"],
)
def test_odd_images_work(tiny_dirs, capsys, tmp_path, make):
    image = make()
    path = tmp_path / ("odd.jpg" if image.mode == "CMYK" else "odd.png")
    image.save(path)
    rec = ask_json(capsys, str(path), "What is it?", "--model", str(tiny_dirs["qwen2_5_vl"]), "--mode", "always",
                   "--max-tokens", "64", "--max-new-tokens", "2")
    check_answer(rec, image.size, 64)


def test_bad_options_exit_2(tiny_dirs, capsys, tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (64, 64)).save(path)
    cases = [
        ["ask", str(path)],  # missing question
        ["ask", str(path), "q", "--mode", "sometimes"],
        ["ask", str(path), "q", "--max-tokens", "0"],
        ["ask", str(path), "q", "--model", str(tmp_path / "no-model")],
        ["ask", str(path), "q", "--model", str(tiny_dirs["qwen2_5_vl"]), "--min-tokens", "100", "--max-tokens", "50"],
        ["ask", str(path), "q", "--model", str(tiny_dirs["llava"]), "--max-tokens", "8"],  # LLaVA's grid is 64
        ["make-tiny", str(tmp_path / "m"), "--family", "gpt2"],
    ]
    for argv in cases:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, argv
        assert err.count("\n") == 1 and "Traceback" not in err, (argv, err)


def test_console_script_end_to_end(tmp_path):
    """The installed entry point, as a user runs it."""
    exe = Path(sys.executable).with_name("qzoom-agent")
    model = tmp_path / "m"
    subprocess.run([str(exe), "make-tiny", str(model), "--family", "qwen2_5_vl"], check=True, capture_output=True)
    image = tmp_path / "x.png"
    Image.new("RGB", (300, 200), (0, 0, 255)).save(image)
    out = subprocess.run([str(exe), "ask", str(image), "Color?", "--model", str(model), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert JSON_KEYS <= json.loads(out.stdout).keys()
    bad = subprocess.run([str(exe), "ask", str(tmp_path / "none.png"), "q", "--model", str(model)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not found" in bad.stderr


def test_demo_writes_png_and_compare_is_wired(tiny_dirs, capsys, tmp_path):
    out = tmp_path / "demo.png"
    assert main(["demo", "--model", str(tiny_dirs["qwen2_5_vl"]), "--n", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("truth ") == 2 and "gate " in printed
    with Image.open(out) as im:
        assert im.width > 400 and im.height > 200
    run = tmp_path / "cmp"
    code = main(["compare", "--bench", "zoomworld:hr", "--agents", "lowres,highres", "--n", "2", "--seed", "3",
                 "--out", str(run), "--model", str(tiny_dirs["qwen2_5_vl"]), "--lowres-tokens", "16",
                 "--highres-tokens", "64", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and set(summary["agents"]) == {"lowres", "highres"}
    assert all(v["n"] == 2 for v in summary["agents"].values())
    assert main(["compare", "--bench", "zoomworld:nope", "--out", str(tmp_path / "x")]) == 2


def test_max_tokens_alone_keeps_the_aspect_ratio(tiny_dirs, capsys, tmp_path):
    from qzoom_agent.images import fit_to_token_budget

    path = tmp_path / "wide.png"
    Image.new("RGB", (1600, 800), (10, 10, 10)).save(path)
    rec = ask_json(capsys, str(path), "q", "--model", str(tiny_dirs["qwen2_5_vl"]), "--mode", "never",
                   "--max-tokens", "256", "--max-new-tokens", "1")
    w, h = fit_to_token_budget(1600, 800, factor=28, min_tokens=64, max_tokens=256)  # the CLI's default floor
    assert (w // 28) == 2 * (h // 28)  # a 2:1 image keeps a 2:1 token grid
    assert rec["visual_tokens"] == (w // 28) * (h // 28) <= 256


def test_demo_line_marks_a_box_the_gate_did_not_use():
    from qzoom_agent.cli import demo_line
    from qzoom_agent.demo import DemoRow

    row = DemoRow(0, "fine", "What is written on the red tag?", "67", "1", "67", 0.9, [1, 2, 30, 40], "67", True,
                  [0, 0, 30, 40])
    assert "box [1, 2, 30, 40] | Q-Zoom '67' (zoomed=True)" in demo_line(row, with_heads=True)
    skipped = dataclasses.replace(row, gate_score=0.1, zoomed=False, qzoom_answer="1")
    assert "box [1, 2, 30, 40] (not used: the gate skipped the zoom) | Q-Zoom '1'" in demo_line(skipped, True)
    assert "not used" not in demo_line(dataclasses.replace(skipped, box=None), True)  # no box, nothing to mark
    assert "gate" not in demo_line(row, with_heads=False)  # a head-less model prints the answers only
