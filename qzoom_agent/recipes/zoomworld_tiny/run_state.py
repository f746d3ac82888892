"""Resumable run state of the recipe's phases: optimiser, schedule, probe and counters, checkpointed atomically, and
the metrics log that a resumed run trims back to its checkpoint."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ...train.common import atomic_torch_save
from .dense_probe import DenseProbe


class CheckpointMismatchError(ValueError):
    """A run folder holds a checkpoint written under a different config."""


@dataclass(kw_only=True)
class RunState:
    """Optimiser, schedule, probe and counters of a run; subclasses say which weights are trained and saved.

    The data stream of every phase is a pure function of ``step``, so ``step`` is all the stream state to save.
    """

    weights_key: ClassVar[str] = "model"  # checkpoint key of the trained weights

    probe: DenseProbe
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: int = 0
    train_seconds: float = 0.0
    running: dict[str, float] = field(default_factory=dict)

    def weights(self) -> nn.Module:
        """The module whose parameters this phase trains (and checkpoints)."""
        raise NotImplementedError

    @property
    def params(self) -> list[nn.Parameter]:
        """The trained parameters."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def apply(self, loss: torch.Tensor, grad_clip: float) -> None:
        """One optimiser step on ``loss``: backward, clip, AdamW, schedule, and count the step."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1

    def state(self, key: str) -> dict[str, Any]:
        """Checkpoint contents: trained weights, probe, optimiser, schedule, counters and the torch RNG."""
        return {
            "format": 1, "config_key": key, "step": self.step, "train_seconds": self.train_seconds,
            "running": dict(self.running), self.weights_key: self.weights().state_dict(),
            "probe": self.probe.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
        }

    def save(self, path: Path, key: str) -> None:
        """Write the checkpoint atomically: a crash leaves the previous one intact."""
        atomic_torch_save(self.state(key), path)

    def restore(self, path: Path, key: str) -> None:
        """Load a checkpoint written under the same config ``key``."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("config_key") != key:
            raise CheckpointMismatchError(f"{path} was written under a different config; resume with the same "
                                          "config or use a new --out")
        self.weights().load_state_dict(state[self.weights_key])
        self.probe.load_state_dict(state["probe"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.train_seconds, self.running = state["step"], state["train_seconds"], state["running"]


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics JSONL file; [] when it does not exist yet."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint being resumed (they will be logged again), atomically."""
    rows = read_metrics(path)
    kept = [r for r in rows if r["step"] <= step]
    if len(kept) != len(rows):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)
