"""The two Q-Zoom branches on the layer-K hidden state: the twig (SD-RPN scorer) and the gate.

Both are plain ``nn.Module``s made of the backbone's own decoder-layer class. They run on the hidden state
captured during the one prefill, with the same causal mask and rotary embeddings, and never touch the HF
forward. Attribute names follow the released Q-Zoom checkpoints (``twig_layers``, ``high_res_layers``,
``high_res_head``) so their weights load by prefix.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .backbones.base import BackboneAdapter


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (1, H, n, d); cos/sin (1, n, d)."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


class QZoomHeads(nn.Module):
    """Twig and gate branches.

    Args:
        twig_layers: T decoder layers of the SD-RPN branch.
        gate_layers: T decoder layers of the gate branch.
        hidden_size: the language model's hidden size, for the gate's linear head.
        branch_layer: K, the base layer whose input the heads read.
    """

    def __init__(
        self, twig_layers: list[nn.Module], gate_layers: list[nn.Module], hidden_size: int, branch_layer: int
    ):
        super().__init__()
        self.branch_layer = branch_layer
        self.twig_layers = nn.ModuleList(twig_layers)
        self.high_res_layers = nn.ModuleList(gate_layers)
        self.high_res_head = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.high_res_head.weight, std=0.02)
        nn.init.zeros_(self.high_res_head.bias)

    @classmethod
    def from_base(cls, adapter: BackboneAdapter, K: int, T: int) -> QZoomHeads:
        """New heads whose twig and gate layers are copies of base layers K..K+T-1 (0-indexed)."""
        base = adapter.layers
        if K + T > len(base):
            raise ValueError(f"K + T = {K + T} exceeds the {len(base)} decoder layers")
        twig = [copy.deepcopy(base[K + i]) for i in range(T)]
        gate = [copy.deepcopy(base[K + i]) for i in range(T)]
        heads = cls(twig, gate, adapter.hidden_size, K)
        return heads.to(device=adapter.device, dtype=adapter.dtype)

    @property
    def T(self) -> int:
        return len(self.twig_layers)

    def gate_logit(
        self, hidden_k: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Gate logit from the last prompt token.

        Args:
            hidden_k: (1, L, D) the input of base layer K.
            rotary: (cos, sin), each (1, L, head_dim).
            mask: the causal mask for L tokens (None for sdpa's implicit causal mask).

        Returns:
            (1,) raw logit; ``sigmoid`` gives the zoom probability.
        """
        h = hidden_k
        for layer in self.high_res_layers:
            h = layer(h, attention_mask=mask, position_embeddings=rotary)
        # No final norm: the head reads the raw last-token state, as in the released models.
        return self.high_res_head(h[:, -1]).squeeze(-1)

    def twig_states(
        self, hidden_k: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The hidden state after the first T-1 twig layers (the input of the last one's q/k).

        Args:
            hidden_k: (1, L, D) the input of base layer K.
            rotary: (cos, sin), each (1, L, head_dim).
            mask: the causal mask for L tokens.

        Returns:
            (1, L, D); ``hidden_k`` itself when T is 1.
        """
        h = hidden_k
        for layer in self.twig_layers[:-1]:
            h = layer(h, attention_mask=mask, position_embeddings=rotary)
        return h

    def roi_scores(
        self,
        adapter: BackboneAdapter,
        states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        image_start: int,
        image_end: int,
        query_index: int = -1,
    ) -> torch.Tensor:
        """The last twig layer's head-averaged ``q(query) . k(visual) / sqrt(d)`` on :meth:`twig_states`.

        Args:
            states: (1, L, D) from :meth:`twig_states`.
            rotary, image_start, image_end, query_index: as in :meth:`roi_logits`.

        Returns:
            (N,) raw logits, N = image_end - image_start.
        """
        last = self.twig_layers[-1]
        length = states.shape[1]
        qi = query_index % length
        cos, sin = rotary
        q, _ = adapter.project_qk(last, last.input_layernorm(states[:, qi : qi + 1]))
        _, k = adapter.project_qk(last, last.input_layernorm(states[:, image_start:image_end]))
        q = _rope(q, cos[:, qi : qi + 1], sin[:, qi : qi + 1])
        k = _rope(k, cos[:, image_start:image_end], sin[:, image_start:image_end])
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped-query attention: share kv heads
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (1, H, 1, N)
        return scores.mean(dim=1)[0, 0]

    def roi_logits(
        self,
        adapter: BackboneAdapter,
        hidden_k: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        image_start: int,
        image_end: int,
        query_index: int = -1,
    ) -> torch.Tensor:
        """SD-RPN scores of the visual tokens for the query token.

        The first T-1 twig layers run in full; the last contributes its input norm and q/k projections (plus
        RoPE), and the score is the head-averaged scaled dot product ``q(query) . k(visual) / sqrt(d)``.

        Args:
            adapter: the backbone adapter (for family-specific q/k projection).
            hidden_k: (1, L, D) the input of base layer K.
            rotary: (cos, sin), each (1, L, head_dim).
            mask: the causal mask for L tokens.
            image_start: index of the first visual token; image_end: index after the last.
            query_index: position of the query token (the last prompt token by default).

        Returns:
            (N,) raw logits, N = image_end - image_start, in raster order of the merged-token grid.
        """
        states = self.twig_states(hidden_k, rotary, mask)
        return self.roi_scores(adapter, states, rotary, image_start, image_end, query_index)
