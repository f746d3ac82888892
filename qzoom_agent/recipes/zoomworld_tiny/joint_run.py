"""State of a joint (phase 2 or 3) run: the previous phase's model (all parameters trainable), the probe, AdamW,
schedule and checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ...backbones import BackboneAdapter
from ...loading import load_backbone
from ...train.common import decay_groups
from .answer_config import AnswerConfig
from .dense_probe import DenseProbe
from .run_state import RunState
from .scene_targets import MAX_TAG_CHARS, SHAPES


@dataclass(kw_only=True)
class JointRun(RunState):
    """Everything a phase-2 run holds: the whole model trains and is checkpointed."""

    adapter: BackboneAdapter

    @property
    def model(self) -> torch.nn.Module:
        return self.adapter.model

    def weights(self) -> torch.nn.Module:
        return self.adapter.model


def build_joint_run(cfg: AnswerConfig, previous: Path) -> JointRun:
    """Load ``previous/model`` and the probe from ``previous/checkpoint.pt``; AdamW (decay on matrices) + schedule.

    Raises:
        FileNotFoundError: the previous phase has not written its model or checkpoint.
    """
    model_dir, ckpt = previous / "model", previous / "checkpoint.pt"
    if not (model_dir / "config.json").is_file() or not ckpt.is_file():
        raise FileNotFoundError(f"{previous} lacks model/ or checkpoint.pt; run the previous phase first")
    adapter = load_backbone(model_dir)
    model = adapter.model
    model.requires_grad_(True)
    probe_state = torch.load(ckpt, map_location="cpu", weights_only=True)["probe"]
    extra = {k: cfg.aux_weights.get(k, 0.0) > 0 for k in ("shape", "index")}
    probe = DenseProbe(model.config.vision_config.out_hidden_size, n_shapes=len(SHAPES) if extra["shape"] else 0,
                       n_index=MAX_TAG_CHARS if extra["index"] else 0)
    probe.load_heads(probe_state)  # by name: phase 1's probe may lack the heads this phase adds
    vision = [*model.model.visual.parameters(), *probe.parameters()]
    seen = {id(p) for p in vision}
    rest = [p for p in model.parameters() if id(p) not in seen]
    # the warmed-up tower may want a smaller step than the LM, which starts from its seeded init
    groups = decay_groups(rest, cfg.weight_decay, cfg.lr)
    if cfg.vision_lr_scale > 0:
        groups += decay_groups(vision, cfg.weight_decay, cfg.lr * cfg.vision_lr_scale)
    else:  # a frozen tower: no backward pass through it at all, which is most of a long-view step's cost
        model.model.visual.requires_grad_(False)
        probe.requires_grad_(False)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cfg.lr_factor)
    model.train()
    return JointRun(adapter=adapter, probe=probe, optimizer=optimizer, scheduler=scheduler)
