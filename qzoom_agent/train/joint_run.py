"""State of a phase-2 run: the phase-1 model (all parameters trainable), the probe, AdamW, schedule, checkpoints."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..backbones import BackboneAdapter
from ..loading import load_backbone
from .dense_probe import DenseProbe
from .warmup import CheckpointMismatchError

if TYPE_CHECKING:
    from .joint import AnswerConfig


@dataclass
class JointRun:
    """Everything a phase-2 run holds; the example stream is a pure function of ``step``, so nothing else is saved."""

    adapter: BackboneAdapter
    probe: DenseProbe
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: int = 0
    train_seconds: float = 0.0
    running: dict[str, float] = field(default_factory=dict)

    @property
    def model(self) -> torch.nn.Module:
        return self.adapter.model

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def state(self, key: str) -> dict[str, Any]:
        """Checkpoint contents: the whole model (everything trains here), probe, optimiser, schedule, RNG."""
        return {"format": 1, "config_key": key, "step": self.step, "train_seconds": self.train_seconds,
                "running": dict(self.running), "model": self.model.state_dict(), "probe": self.probe.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "torch_rng": torch.get_rng_state()}

    def save(self, path: Path, key: str) -> None:
        """Write the checkpoint atomically: a crash leaves the previous one intact."""
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(self.state(key), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def restore(self, path: Path, key: str) -> None:
        """Load a checkpoint written under the same config ``key``."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("config_key") != key:
            raise CheckpointMismatchError(f"{path} was written under a different config; resume with the same "
                                          "config or use a new --out")
        self.model.load_state_dict(state["model"])
        self.probe.load_state_dict(state["probe"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.train_seconds, self.running = state["step"], state["train_seconds"], state["running"]


def build_joint_run(cfg: AnswerConfig, phase1: Path) -> JointRun:
    """Load ``phase1/model`` and the probe from ``phase1/checkpoint.pt``; AdamW (decay on matrices) + schedule.

    Raises:
        FileNotFoundError: phase 1 has not written its model or checkpoint.
    """
    model_dir, ckpt = phase1 / "model", phase1 / "checkpoint.pt"
    if not (model_dir / "config.json").is_file() or not ckpt.is_file():
        raise FileNotFoundError(f"{phase1} lacks model/ or checkpoint.pt; run phase 1 (train.warmup) first")
    adapter = load_backbone(model_dir)
    model = adapter.model
    model.requires_grad_(True)
    probe_state = torch.load(ckpt, map_location="cpu", weights_only=True)["probe"]
    probe = DenseProbe(model.config.vision_config.out_hidden_size)
    probe.load_state_dict(probe_state)
    vision = [*model.model.visual.parameters(), *probe.parameters()]
    seen = {id(p) for p in vision}
    rest = [p for p in model.parameters() if id(p) not in seen]
    groups = []
    # the warmed-up tower may want a smaller step than the LM, which starts from its seeded init
    for params, lr in ((rest, cfg.lr), (vision, cfg.lr * cfg.vision_lr_scale)):
        groups += [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay, "lr": lr},
                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr": lr}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cfg.lr_factor)
    model.train()
    return JointRun(adapter, probe, optimizer, scheduler)
