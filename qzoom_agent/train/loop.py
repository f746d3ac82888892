"""The optimiser loop the three Q-Zoom stages share: AdamW steps with clipping and a schedule, the next batch
prepared in a worker thread while this one trains, a smoothed loss on the progress bar, and atomic checkpoints
that a rerun resumes from.

Each stage says what it trains (``weights`` / ``load_weights``: its entries of the checkpoint), how a batch is
drawn (``batch_at``, a pure function of the step) and how one batch's loss is backpropagated (``step_loss``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch import nn
from tqdm import tqdm

from .common import atomic_torch_save, prefetched

Batch = TypeVar("Batch")
_EMA, _NEW = 0.95, 0.05  # smoothing of the loss shown on the progress bar and returned: old and new weights


@dataclass
class StageLoop(Generic[Batch]):
    """A resumable optimisation of ``params``.

    Attributes:
        params: the trained parameters (clipped together).
        optimizer: AdamW over ``params``.
        scheduler: the learning-rate schedule, stepped once per optimiser step.
        weights: the checkpoint entries of the trained weights, e.g. ``{"twig": twig.state_dict()}``.
        load_weights: the inverse of ``weights`` on a loaded checkpoint; raises ValueError when it does not fit.
        grad_clip: max global gradient norm.
        step: optimiser steps taken.
        seconds: training time so far (rendering in the worker overlaps it).
        running: smoothed loss of the steps taken in this process (None before the first).
    """

    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    weights: Callable[[], dict[str, Any]]
    load_weights: Callable[[dict[str, Any]], None]
    grad_clip: float
    step: int = 0
    seconds: float = 0.0
    running: float | None = None

    def save(self, path: Path) -> None:
        """Write the checkpoint atomically: a crash leaves the previous one intact."""
        atomic_torch_save({**self.weights(), "optimizer": self.optimizer.state_dict(),
                           "scheduler": self.scheduler.state_dict(), "step": self.step, "seconds": self.seconds},
                          path)

    def restore(self, path: Path) -> None:
        """Continue from the checkpoint at ``path``."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            self.load_weights(state)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.seconds = state["step"], state["seconds"]

    def run(self, stop: int, batch_at: Callable[[int], Batch], step_loss: Callable[[Batch], dict[str, float]], *,
            checkpoint: Path, checkpoint_every: int, desc: str) -> float | None:
        """Train from ``self.step`` to ``stop``, checkpointing every ``checkpoint_every`` steps and at ``stop``.

        Args:
            stop: the step to stop at.
            batch_at: the batch of step ``k``; it runs in a worker thread one step ahead, so it must not touch
                the parameters.
            step_loss: backpropagates the loss of one batch and returns its figures, the smoothed one first
                (``{"bce": 0.41, "aux": 0.09}``).
            checkpoint: the checkpoint file.
            checkpoint_every: steps between checkpoints.
            desc: the progress bar's label.

        Returns:
            The smoothed loss, or None when no step ran.
        """
        with tqdm(total=stop, initial=self.step, desc=desc, dynamic_ncols=True, mininterval=2.0) as bar:
            for _, fetch in prefetched(batch_at, self.step, stop):
                tick = time.perf_counter()
                batch = fetch()
                self.optimizer.zero_grad(set_to_none=True)
                figures = step_loss(batch)
                torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                self.seconds += time.perf_counter() - tick
                name, loss = next(iter(figures.items()))
                self.running = loss if self.running is None else _EMA * self.running + _NEW * loss
                bar.update(1)
                bar.set_postfix({name: f"{self.running:.3f}", **{k: f"{v:.3f}" for k, v in list(figures.items())[1:]}})
                if self.step % checkpoint_every == 0 or self.step == stop:
                    self.save(checkpoint)
        return self.running
