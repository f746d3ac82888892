"""Tiny Q-Zoom models and test images that several test modules build the same way."""

from __future__ import annotations

import torch
from PIL import Image

from qzoom_agent.backbones import adapter_class_for
from qzoom_agent.config import QZoomConfig
from qzoom_agent.model import QZoomModel
from qzoom_agent.tiny import build_tiny

QUESTION = "What is written on the green tag?"


def make_model(family: str, attn: str = "sdpa", **overrides) -> QZoomModel:
    """A tiny random model of ``family`` (seed 1) with fresh heads at K=2, T=2 (seed 2); ``overrides`` are
    QZoomConfig fields."""
    model, tok = build_tiny(family, seed=1)
    if attn != "sdpa":
        model.set_attn_implementation(attn)
    cls = adapter_class_for(model.config)
    adapter = cls(model, tok, cls.default_image_processor(model.config))
    settings = dict(twig_K=2, twig_T=2, min_tokens=16, max_tokens=64, gate_threshold=0.0, roi_threshold=0.2)
    qm = QZoomModel(adapter, None, QZoomConfig(**{**settings, **overrides}))
    torch.manual_seed(2)
    qm.init_heads()
    return qm


def make_image(w: int = 451, h: int = 300, seed: int = 0) -> Image.Image:
    """A ``w`` x ``h`` image of uniform noise."""
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy())
