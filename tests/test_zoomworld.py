"""ZoomWorld: determinism, disjoint splits, record/pixel consistency, the family mix, and the export paths."""

from __future__ import annotations

import collections
import hashlib
import io
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from qzoom_agent.cli import main
from qzoom_agent.zoomworld import (
    DEFAULT_ALPHABET,
    FAMILIES,
    FINE_FAMILIES,
    SPLITS,
    export_folder,
    generate,
    sample,
    seed_for,
    to_dataset,
)
from qzoom_agent.zoomworld.render import PALETTE, layout_glyphs, text_colour
from qzoom_agent.zoomworld.samples import ASPECT_BOUNDS, SIZE_RANGE

REPO = Path(__file__).resolve().parents[1]
SMALL = (448, 896)  # small canvases keep most tests fast; a few tests use the default 1024-4096 px


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def inside(box, outer) -> bool:
    return outer[0] <= box[0] < box[2] <= outer[2] and outer[1] <= box[1] < box[3] <= outer[3]


def disjoint(a, b) -> bool:
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def check_geometry(s, size_range) -> None:
    w, h = s.image.size
    assert s.image.mode == "RGB"
    assert size_range[0] <= min(w, h) and max(w, h) <= size_range[1]
    lo, hi = ASPECT_BOUNDS[s.variant]
    assert lo <= w / h <= hi
    frame = (0, 0, w, h)
    every = [s.target_box] + [r["box"] for group in (s.panels, s.glyphs, s.objects, s.dots, s.texts) for r in group]
    assert all(inside(box, frame) for box in every)
    solid = [r["box"] for group in (s.panels, s.objects, s.dots) for r in group]
    assert all(disjoint(a, b) for a, b in itertools.combinations(solid, 2))
    assert len({p["colour"] for p in s.panels}) == len(s.panels) >= 1
    assert len({o["colour"] for o in s.objects}) == len({o["shape"] for o in s.objects}) == len(s.objects) >= 1


def check_panels(s) -> None:
    for i, panel in enumerate(s.panels):
        x1, y1, x2, y2 = panel["box"]
        assert 32 <= y2 - y1 <= 96 and 32 <= x2 - x1 <= 96 and 1 <= (x2 - x1) / (y2 - y1) <= 2
        assert 1 <= len(panel["text"]) <= 3 and set(panel["text"]) <= set(s.alphabet)
        glyphs = [g for g in s.glyphs if g["panel"] == i]
        assert "".join(g["char"] for g in glyphs) == panel["text"]
        for g in glyphs:
            assert inside(g["box"], panel["box"])
            assert 0.3 <= (g["box"][3] - g["box"][1]) / (y2 - y1) <= 0.5
        # pixels agree with the records: the fill just inside the border, ink on every edge of each glyph box
        assert s.image.getpixel((x1 + 2, y1 + 2)) == PALETTE[panel["colour"]]
        ink = text_colour(PALETTE[panel["colour"]])
        for g in glyphs:
            gx1, gy1, gx2, gy2 = g["box"]
            for edge in ((gx1, gy1, gx2, gy1 + 1), (gx1, gy2 - 1, gx2, gy2), (gx1, gy1, gx1 + 1, gy2),
                         (gx2 - 1, gy1, gx2, gy2)):
                assert ink in [c for _, c in s.image.crop(edge).getcolors(4096)]
    assert len(s.glyphs) == sum(len(p["text"]) for p in s.panels)


def check_answer(s) -> None:
    if s.family in ("read", "mcq"):
        (panel,) = [p for p in s.panels if f"the {p['colour']} tag?" in s.question]
        assert tuple(panel["box"]) == s.target_box
        if s.family == "read":
            assert s.answer == panel["text"] and s.options is None
        else:
            assert len(s.options) == len(set(s.options)) == 4
            assert all(len(o) == len(panel["text"]) and set(o) <= set(s.alphabet) for o in s.options)
            assert s.options["ABCD".index(s.answer)] == panel["text"]
            assert all(f"({letter}) {o}" in s.question for letter, o in zip("ABCD", s.options, strict=True))
    elif s.family == "relpos":
        named = sorted((s.question.index(f"the {p['colour']} tag"), p) for p in s.panels
                       if f"the {p['colour']} tag" in s.question)
        a, b = named[0][1]["box"], named[1][1]["box"]
        axis = 0 if s.answer in ("left", "right") else 1
        ca, cb = (a[axis] + a[axis + 2]) / 2, (b[axis] + b[axis + 2]) / 2
        assert (ca < cb) == (s.answer in ("left", "above"))
        assert abs(ca - cb) > 2 * max(a[axis + 2] - a[axis], b[axis + 2] - b[axis])
        assert s.target_box == (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
    elif s.family == "count":
        colour = s.question.split()[2]
        dots = [d["box"] for d in s.dots if d["colour"] == colour]
        assert s.answer == str(len(dots)) and 1 <= len(dots) <= 5
        assert all(8 <= b[2] - b[0] <= 14 for b in dots)
        assert all(inside(b, s.target_box) for b in dots)
        assert all(s.image.getpixel(((b[0] + b[2]) // 2, (b[1] + b[3]) // 2)) == PALETTE[colour] for b in dots)
    else:
        key, value = ("shape", "colour") if s.family == "color" else ("colour", "shape")
        (obj,) = [o for o in s.objects if f"large {o[key]}" in s.question]
        assert s.answer == obj[value] and tuple(obj["box"]) == s.target_box
        x1, y1, x2, y2 = obj["box"]
        assert s.image.getpixel(((x1 + x2) // 2, (y1 + y2) // 2)) == PALETTE[obj["colour"]]
    assert s.kind == ("fine" if s.family in FINE_FAMILIES else "coarse")


def check_all(s, size_range) -> None:
    check_geometry(s, size_range)
    check_panels(s)
    check_answer(s)
    json.dumps(s.to_json())


@pytest.mark.parametrize("variant", ["hr", "doc"])
def test_same_seed_same_bytes_and_records(variant):
    a, b = generate(variant, 7, size_range=SMALL), generate(variant, 7, size_range=SMALL)
    assert png_bytes(a.image) == png_bytes(b.image)
    assert a.to_json() == b.to_json()
    c = generate(variant, 8, size_range=SMALL)
    assert png_bytes(c.image) != png_bytes(a.image) and c.to_json() != a.to_json()


def test_fresh_process_gives_the_same_bytes():
    code = ("import hashlib, io, json; from qzoom_agent.zoomworld import sample; s = sample('hr', 'test', 3); "
            "b = io.BytesIO(); s.image.save(b, format='PNG'); "
            "print(hashlib.sha256(b.getvalue()).hexdigest(), json.dumps(s.to_json(), sort_keys=True))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    here = sample("hr", "test", 3)
    digest, record = out.stdout.strip().split(" ", 1)
    assert digest == hashlib.sha256(png_bytes(here.image)).hexdigest()
    assert json.loads(record) == json.loads(json.dumps(here.to_json()))


def test_splits_are_disjoint_seed_ranges():
    for (na, (a0, a1)), (nb, (b0, b1)) in itertools.combinations(SPLITS.items(), 2):
        assert a0 < a1 and b0 < b1 and (a1 <= b0 or b1 <= a0), (na, nb)
    for split, (start, stop) in SPLITS.items():
        assert seed_for(split, 0) == start and seed_for(split, stop - start - 1) == stop - 1
        for bad in (-1, stop - start, True):
            with pytest.raises(ValueError, match="outside"):
                seed_for(split, bad)
    with pytest.raises(ValueError, match="unknown split"):
        seed_for("dev", 0)
    s = sample("doc", "val", 5, size_range=SMALL)
    assert (s.split, s.index, s.seed) == ("val", 5, SPLITS["val"][0] + 5)


@pytest.mark.parametrize("variant", ["hr", "doc"])
def test_small_scenes_are_consistent(variant):
    for seed in range(40):
        check_all(generate(variant, seed, size_range=SMALL), SMALL)


@pytest.mark.parametrize("variant", ["hr", "doc"])
def test_default_scenes_are_consistent_and_fine_needs_zoom(variant):
    for index in range(4):
        s = sample(variant, "test", index)
        check_all(s, SIZE_RANGE[variant])
        w, h = s.image.size
        scale = math.sqrt(256 * 28 * 28 / (w * h))  # a view of ~256 merged 28 px tokens
        view = s.image.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
        assert 200 <= (view.width / 28) * (view.height / 28) <= 320
        for panel in s.panels:
            ph = panel["box"][3] - panel["box"][1]
            assert ph >= 32 and ph * scale <= 14  # a blob at most half a token tall: located, not read
            assert panel["size"] * scale <= 7
        for obj in s.objects:  # coarse targets stay large in the same view
            x1, y1, x2, y2 = obj["box"]
            assert min(x2 - x1, y2 - y1) * scale >= 20


def test_family_mix_is_reproducible_and_sane():
    samples = [generate("hr" if seed % 2 else "doc", seed, size_range=(320, 480)) for seed in range(200)]
    counts = collections.Counter(s.family for s in samples)
    assert set(counts) == set(FAMILIES)
    fine = sum(counts[f] for f in FINE_FAMILIES) / len(samples)
    assert 0.58 <= fine <= 0.82
    assert counts["read"] > counts["mcq"] and counts["read"] > counts["count"]
    for s in samples:
        check_answer(s)
    again = [generate("hr" if seed % 2 else "doc", seed, size_range=(320, 480)).family for seed in range(20)]
    assert again == [s.family for s in samples[:20]]
    only = [generate("hr", seed, size_range=SMALL, mix={"count": 1.0}) for seed in range(5)]
    assert {s.family for s in only} == {"count"}
    for s in only:
        check_answer(s)


def test_digit_alphabet_and_bad_arguments():
    for seed in range(10):
        s = generate("hr", seed, size_range=SMALL, alphabet="0123456789", mix={"mcq": 1, "read": 1})
        assert all(p["text"].isdigit() for p in s.panels) and all(t["text"].replace(" ", "").isdigit()
                                                                   for t in s.texts)
        check_answer(s)
    for kwargs, match in [({"alphabet": "abc"}, "cannot draw"), ({"alphabet": "AAB1"}, "at least 4"),
                          ({"mix": {"zoom": 1}}, "unknown question"), ({"mix": {"read": 0}}, "positive sum"),
                          ({"size_range": (100, 200)}, "size_range")]:
        with pytest.raises(ValueError, match=match):
            generate("hr", 0, **kwargs)
    with pytest.raises(ValueError, match="unknown variant"):
        generate("photo", 0)
    with pytest.raises(ValueError, match="seed"):
        generate("hr", -1)


def test_text_records_reproduce_their_glyphs():
    s = generate("doc", 3, size_range=SMALL)
    assert len(s.texts) > 20
    for t in s.texts[:30]:
        boxes = layout_glyphs(tuple(t["origin"]), t["text"], t["size"])
        assert "".join(c for c, _ in boxes) == t["text"].replace(" ", "")
        assert all(inside(b, t["box"]) for _, b in boxes)
        assert set(t["text"]) <= set(DEFAULT_ALPHABET + " ")


def test_export_folder_resumes_without_rewriting(tmp_path):
    out = tmp_path / "zw"
    assert export_folder("hr", "val", 3, out, size_range=SMALL) == out
    first = (out / "val.jsonl").read_text().splitlines()
    assert len(first) == 3
    export_folder("hr", "val", 6, out, size_range=SMALL)
    lines = (out / "val.jsonl").read_text().splitlines()
    assert lines[:3] == first and len(lines) == 6
    records = [json.loads(line) for line in lines]
    assert sorted(r["index"] for r in records) == list(range(6))
    for r in records:
        with Image.open(out / r["image"]) as im:
            assert im.size == (r["width"], r["height"])
    assert r["image"] == "images/val_000005.png" and r["split"] == "val" and r["variant"] == "hr"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["variant"] == "hr" and meta["splits"] == ["val"] and meta["alphabet"] == DEFAULT_ALPHABET
    assert set(meta["mix"]) == set(FAMILIES) and "version" in meta
    with (out / "val.jsonl").open("a") as fh:  # a run killed mid-line
        fh.write('{"image": "images/val_0000')
    export_folder("hr", "val", 7, out, size_range=SMALL)
    lines = (out / "val.jsonl").read_text().splitlines()
    assert lines[:6] == [json.dumps(r) for r in records] and len(lines) == 7 and json.loads(lines[6])["index"] == 6
    with pytest.raises(ValueError, match="other settings"):
        export_folder("hr", "val", 1, out, size_range=SMALL, alphabet="0123456789")


def test_to_dataset_has_an_image_column():
    ds = to_dataset("doc", "test", 2, start=4, size_range=SMALL)
    assert len(ds) == 2 and ds.features["image"].__class__.__name__ == "Image"
    row = ds[1]
    assert isinstance(row["image"], Image.Image) and row["image"].size == (row["width"], row["height"])
    s = sample("doc", "test", 5, size_range=SMALL)
    assert row["index"] == 5 and row["question"] == s.question and row["target_box"] == list(s.target_box)
    assert row["panels"] == s.panels


def test_cli_writes_records_and_rejects_bad_input(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["zoomworld", "--variant", "doc", "--split", "test", "--n", "3", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert len((out / "test.jsonl").read_text().splitlines()) == 3
    assert len(list((out / "images").glob("*.png"))) == 3
    bad = (["--variant", "photo", "--split", "test"], ["--variant", "hr", "--split", "test", "--alphabet", "ab"])
    for argv in bad:
        assert main(["zoomworld", *argv, "--n", "1", "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("qzoom-agent: error:") and err.count("\n") == 1
