"""Backbone adapters: one module per model family, each holding everything family-specific."""

from __future__ import annotations

from .base import BackboneAdapter, ImageInputs, Prompt, Splice, VisualFeatures
from .llava import LlavaAdapter
from .qwen2_5_vl import Qwen2_5_VLAdapter
from .qwen3_vl import Qwen3VLAdapter

ADAPTERS: dict[str, type[BackboneAdapter]] = {
    t: cls for cls in (Qwen2_5_VLAdapter, Qwen3VLAdapter, LlavaAdapter) for t in cls.model_types
}


def adapter_class_for(config) -> type[BackboneAdapter]:
    """The adapter class for a model config, by ``config.model_type``."""
    try:
        return ADAPTERS[config.model_type]
    except KeyError:
        raise ValueError(
            f"model type {config.model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}"
        ) from None


__all__ = [
    "ADAPTERS",
    "BackboneAdapter",
    "ImageInputs",
    "LlavaAdapter",
    "Prompt",
    "Qwen2_5_VLAdapter",
    "Qwen3VLAdapter",
    "Splice",
    "VisualFeatures",
    "adapter_class_for",
]
