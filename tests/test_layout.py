"""The layout's rules, read off the source: what each room may import, no import circles, and what gets installed.

Rooms (``qzoom_agent.<room>``): the core (top-level modules and ``backbones``), ``zoomworld`` (the synthetic
benchmark, at the bottom), ``train`` (Q-Zoom stages 1-3), ``bench`` (comparison agents and runner), ``agent``,
``tools`` and ``rl`` (installed from the repo's ``tools/`` and ``rl/``), and ``recipes`` (the research recipe of
the bundled model, used by nothing but itself and the CLI).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# package -> folder, as pyproject.toml's package-dir maps them
ROOTS = {"qzoom_agent": REPO / "qzoom_agent", "qzoom_agent.tools": REPO / "tools", "qzoom_agent.rl": REPO / "rl"}
# the rooms built on the core
UPPER = ("bench", "train", "recipes", "agent", "tools", "rl", "integrations", "cli", "demo")


def _modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name (``pkg.__init__`` files as ``pkg``)."""
    out = {}
    for package, folder in ROOTS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("").parts
            if "assets" in rel:
                continue
            name = ".".join((package, *rel))
            out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The package's modules that ``name`` imports anywhere: at the top, inside functions, under TYPE_CHECKING."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + is_package]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from pkg import mod`` imports the module pkg.mod; ``from mod import name`` the module mod
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # ``import qzoom_agent.x.y`` -> the deepest module that exists
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _room(module: str) -> str:
    """``qzoom_agent.train.stage1`` -> ``train``; a core module -> ``core``."""
    parts = module.split(".")
    if len(parts) == 1:
        return "core"
    return parts[1] if parts[1] in (*UPPER, "zoomworld") else "core"


def _offending(rooms: tuple[str, ...], banned: tuple[str, ...]) -> list[str]:
    return sorted(f"{m} imports {t}" for m, targets in GRAPH.items() if _room(m) in rooms
                  for t in targets if _room(t) in banned)


def test_the_graph_sees_the_package():
    # the rules below are vacuous if the parser misses imports: check it on edges known to exist
    assert "qzoom_agent.zoomworld.samples" in GRAPH["qzoom_agent.zoomworld"]
    assert "qzoom_agent.train.stage1_config" in GRAPH["qzoom_agent.train.stage1"]
    assert "qzoom_agent.recipes.zoomworld_tiny.cli" in GRAPH["qzoom_agent.cli"]  # a function-level import
    assert "qzoom_agent.images" in GRAPH["qzoom_agent.tools.crop"]  # tools/ is qzoom_agent.tools
    assert len(MODULES) > 60


def test_nothing_but_the_cli_uses_the_recipe():
    users = sorted(m for m, targets in GRAPH.items() if _room(m) != "recipes" and m != "qzoom_agent.cli"
                   for t in targets if _room(t) == "recipes")
    assert users == []


def test_train_and_bench_do_not_import_the_recipe_or_each_other():
    assert _offending(("train", "bench"), ("recipes",)) == []
    assert _offending(("train",), ("bench",)) == []
    assert _offending(("bench",), ("train",)) == []


def test_zoomworld_sits_below_bench_and_train():
    assert _offending(("zoomworld",), UPPER) == []


def test_the_core_imports_no_room_built_on_it():
    assert _offending(("core",), UPPER) == []


def test_no_import_circles():
    # Tarjan-free: depth-first search with colours; a grey node reached again closes a circle
    colour: dict[str, int] = {}
    circles = []

    def visit(node: str, stack: list[str]) -> None:
        colour[node] = 1
        for nxt in sorted(GRAPH[node]):
            if colour.get(nxt) == 1:
                circles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in colour:
                visit(nxt, [*stack, nxt])
        colour[node] = 2

    for node in sorted(GRAPH):
        if node not in colour:
            visit(node, [node])
    assert circles == []


def test_every_package_is_installed_under_qzoom_agent():
    tomllib = pytest.importorskip("tomllib")
    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages, package_dir = setup["packages"], setup["package-dir"]
    assert all(p == "qzoom_agent" or p.startswith("qzoom_agent.") for p in packages)
    assert {k: REPO / v for k, v in package_dir.items()} == ROOTS
    on_disk = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    assert on_disk == set(packages), "a package folder missing from pyproject.toml would be left out of the wheel"


def test_no_top_level_tools_or_rl_is_importable(tmp_path):
    # run outside the repo, so only what the installation put on sys.path counts
    code = ("import importlib.util as u, json; "
            "print(json.dumps({n: getattr(u.find_spec(n), 'origin', None) for n in ('tools', 'rl')}))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path,
                         capture_output=True, text=True, env=env, check=True).stdout
    found = {name: origin for name, origin in json.loads(out).items() if origin}
    assert not any(str(origin).startswith(str(REPO)) for origin in found.values()), found
    import qzoom_agent.rl
    import qzoom_agent.tools

    assert Path(qzoom_agent.tools.__file__).parent == REPO / "tools"
    assert Path(qzoom_agent.rl.__file__).parent == REPO / "rl"
