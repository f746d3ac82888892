"""File plumbing of the head checkpoints: atomic writes, JSON with clear errors, safetensors-ready copies, and
strict head loading that says what does not match."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .heads import QZoomHeads

SAFETENSORS_META = {"format": "pt"}


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temp file beside ``path``, then move it over ``path``; never leaves half a file."""
    tmp = str(path.with_name(f".{path.name}.{os.getpid()}-{id(write):x}.tmp"))  # created with the usual mode
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:  # a ValueError already; say which file
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def savable(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies that share no memory (safetensors refuses shared or strided storage)."""
    return {key: value.detach().to("cpu", copy=True).contiguous() for key, value in state.items()}


def load_into(heads: QZoomHeads, state: dict[str, torch.Tensor], source: Path) -> None:
    """``load_state_dict(strict=True)`` with messages that say what does not match and why."""
    expected = heads.state_dict()
    few = lambda keys: ", ".join(sorted(keys)[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or unexpected:
        parts = [f"missing keys: {few(missing)}"] if missing else []
        parts += [f"unexpected keys: {few(unexpected)}"] if unexpected else []
        raise ValueError(f"head weights in {source} do not match the heads: " + "; ".join(parts))
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"shape mismatch for {key} in {source}: checkpoint {tuple(value.shape)}, heads "
                             f"{tuple(expected[key].shape)}; the heads were trained for another backbone")
    heads.load_state_dict(state, strict=True)
