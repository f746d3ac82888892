"""Qwen2.5-VL: 14 px patches merged 2x2, so 28 resized pixels per visual token."""

from __future__ import annotations

from .qwen import QwenAdapter


class Qwen2_5_VLAdapter(QwenAdapter):
    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
