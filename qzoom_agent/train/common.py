"""What the Q-Zoom training stages share: optimiser and device settings, parameter groups, YAML sections, atomic
writes and resumable caches."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..checks import one_line
from ..loading import resolve_device
from ..zoomworld import VARIANTS, ZoomWorldSample, generate, seed_for

T = TypeVar("T")


class OptimConfig(BaseModel):
    """AdamW and learning-rate schedule settings of one training phase."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(3000, ge=1, description="schedule length in optimiser steps")
    batch_size: int = Field(16, ge=1, description="examples per step")
    lr: float = Field(1e-3, gt=0.0, description="peak AdamW learning rate")
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW betas")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay on matrices (not biases or norms)")
    warmup_steps: int = Field(100, ge=0, description="linear LR warm-up steps, then cosine decay")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="final LR as a fraction of the peak")
    grad_clip: float = Field(1.0, gt=0.0, description="max global gradient norm")

    def lr_factor(self, step: int) -> float:
        """LR multiplier for optimiser step ``step`` (0-based): linear warm-up, then cosine to ``min_lr_ratio``."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        frac = min(1.0, (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))


class DeviceConfig(BaseModel):
    """Where a Q-Zoom training stage runs: ``auto`` is CUDA in bf16 when available, else the CPU in fp32."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'")
    dtype: str = Field("auto", pattern="^(auto|float32|bfloat16|float16)$", description="weight dtype")

    def resolve(self) -> tuple[str, torch.dtype]:
        """The concrete (device, dtype) (`loading.resolve_device`)."""
        return resolve_device(self.device, self.dtype)


@contextmanager
def eager_attention(module: nn.Module, on: bool = True) -> Iterator[None]:
    """Run ``module`` (an HF model or sub-model) on eager attention inside the block, the only implementation that
    returns attention weights, and restore its previous one after; ``on=False`` leaves it alone."""
    previous = module.config._attn_implementation
    if on:
        module.set_attn_implementation("eager")
    try:
        yield
    finally:
        if on:
            module.set_attn_implementation(previous)


def prefetched(make: Callable[[int], T], start: int, stop: int) -> Iterator[tuple[int, Callable[[], T]]]:
    """Steps ``start .. stop - 1``, each with a ``fetch`` that returns ``make(step)``. The next step's item is made
    in a worker thread while the caller works on this one (rendering with Pillow and training with torch both
    release the GIL), so ``make`` must be a pure function of the step that touches no trained weights. ``fetch``
    waits for the item: a caller that starts its clock before calling it counts the wait as step time.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(make, start) if start < stop else None
        for step in range(start, stop):
            current = pending
            pending = pool.submit(make, step + 1) if step + 1 < stop else None
            yield step, current.result


def decay_groups(params: Iterable[nn.Parameter], weight_decay: float, lr: float | None = None) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices only, none on biases and norms."""
    params = list(params)
    extra = {} if lr is None else {"lr": lr}
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay, **extra},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, **extra},
    ]


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file, synced, then renamed over ``path``: a crash leaves the previous file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_config(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A training YAML as a mapping. ``extends: OTHER.yaml`` (relative to the file) starts from OTHER's sections;
    each section the file names replaces OTHER's whole, so a variant recipe states only what it changes.

    Raises:
        ValueError: one line naming the file: unreadable, not a mapping, or an ``extends`` cycle.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read training config {path}: {one_line(err)}") from err
    if not isinstance(data, dict):
        raise ValueError(f"training config {path} must be a mapping of sections")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    base = (path.parent / str(parent)).resolve()
    if base in _seen or base == path.resolve():
        raise ValueError(f"training config {path} extends itself through {base.name}")
    return {**read_config(base, (*_seen, path.resolve())), **data}


def load_section(path: str | Path, section: str, cls: type[BaseModel], example: str | None = None) -> Any:
    """Validate the ``section:`` mapping of a training YAML as ``cls``; ``example``, a config file the error
    message points to.

    Raises:
        ValueError: one line naming the file and what is wrong.
    """
    data = read_config(path)
    if not isinstance(data.get(section), dict):
        hint = f" (see {example})" if example else ""
        raise ValueError(f"{path} needs a '{section}:' mapping{hint}")
    try:
        return cls(**data[section])
    except ValueError as err:
        raise ValueError(f"invalid {section} config {path}: {one_line(err)}") from err


def stage_question(cfg: Any, alphabet: str, split: str, index: int) -> ZoomWorldSample:
    """ZoomWorld question ``index`` of ``split`` for a Q-Zoom stage: ``cfg.families`` and ``cfg.size_range``,
    variants alternating hr/doc."""
    return generate(VARIANTS[index % 2], seed_for(split, index), alphabet=alphabet, mix=cfg.families,
                    size_range=cfg.size_range)


def resume_jsonl(path: Path) -> list[dict]:
    """The complete rows of an append-only JSONL cache; a torn last line (a killed run) is dropped from the file,
    so appending continues after the last complete row."""
    rows: list[dict] = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows
