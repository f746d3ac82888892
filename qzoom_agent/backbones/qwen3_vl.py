"""Qwen3-VL: 16 px patches merged 2x2 (32 px per token), q/k norms, and deepstack visual injection."""

from __future__ import annotations

import torch
from torch import nn

from .base import ImageInputs, VisualFeatures
from .qwen import QwenAdapter


class Qwen3VLAdapter(QwenAdapter):
    family = "qwen3_vl"
    model_types = ("qwen3_vl",)

    @property
    def n_deepstack(self) -> int:
        return len(self.vision_config.deepstack_visual_indexes)

    @property
    def min_branch_layer(self) -> int:
        # Deepstack features are added after the first decoder layers; the branch must see the finished state.
        return max(1, self.n_deepstack)

    def encode_image(self, images: list[ImageInputs]) -> VisualFeatures:
        out = self._vision_outputs(images)
        deepstack = [torch.cat(per_layer, 0) for per_layer in out.deepstack_features]
        return VisualFeatures(torch.cat(out.pooler_output, 0), deepstack)

    def project_qk(self, layer: nn.Module, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attn = layer.self_attn
        shape = (*normed.shape[:-1], -1, attn.head_dim)
        q = attn.q_norm(attn.q_proj(normed).view(shape)).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(normed).view(shape)).transpose(1, 2)
        return q, k

    def inject(self, layer_idx: int, hidden: torch.Tensor, visual_mask: torch.Tensor | None, visual) -> torch.Tensor:
        if visual is None or visual.deepstack is None or layer_idx >= len(visual.deepstack) or visual_mask is None:
            return hidden
        hidden = hidden.clone()
        hidden[visual_mask] = hidden[visual_mask] + visual.deepstack[layer_idx].to(hidden.dtype)
        return hidden
