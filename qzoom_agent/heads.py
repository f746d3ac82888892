"""The two Q-Zoom branches on the layer-K hidden state: the twig (SD-RPN scorer) and the gate.

Both are plain ``nn.Module``s made of the backbone's own decoder-layer class. They run on the hidden state
captured during the one prefill, with the same causal mask and rotary embeddings, and never touch the HF
forward. Attribute names follow the released checkpoints (``twig_layers``, ``high_res_layers``, ``high_res_head``;
SD-RPN's ``twig_norm``) so their weights load by prefix. A checkpoint of stage 1 or 2, or an SD-RPN one, has no
gate: its heads are the twig alone.
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
        self, twig_layers: list[nn.Module], gate_layers: list[nn.Module] | None, hidden_size: int, branch_layer: int,
        twig_norm: nn.Module | None = None,
    ):
        super().__init__()
        self.branch_layer = branch_layer
        self.twig_layers = nn.ModuleList(twig_layers)
        self.twig_norm = twig_norm  # SD-RPN (LLaVA): applied to the twig state before the last layer's q/k
        self.high_res_layers, self.high_res_head = None, None
        if gate_layers is not None:
            self._attach_gate(gate_layers, hidden_size)

    def _attach_gate(self, gate_layers: list[nn.Module], hidden_size: int) -> None:
        """The gate: ``gate_layers`` and a fresh linear head (weights N(0, 0.02), bias 0)."""
        self.high_res_layers = nn.ModuleList(gate_layers)
        self.high_res_head = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.high_res_head.weight, std=0.02)
        nn.init.zeros_(self.high_res_head.bias)

    @classmethod
    def from_base(cls, adapter: BackboneAdapter, K: int, T: int, *, gate: bool = True,
                  twig_norm: bool = False) -> QZoomHeads:
        """New heads whose twig (and gate) layers are copies of base layers K..K+T-1 (0-indexed); ``twig_norm``
        adds SD-RPN's norm (a copy of the final norm, weights reset to one)."""
        twig = cls._base_copies(adapter, K, T)
        gates = cls._base_copies(adapter, K, T) if gate else None
        norm = None
        if twig_norm:
            norm = copy.deepcopy(adapter.norm)
            nn.init.ones_(norm.weight)
        heads = cls(twig, gates, adapter.hidden_size, K, norm)
        return heads.to(device=adapter.device, dtype=adapter.dtype)

    @staticmethod
    def _base_copies(adapter: BackboneAdapter, K: int, T: int) -> list[nn.Module]:
        """Copies of base layers K..K+T-1 (0-indexed)."""
        base = adapter.layers
        if K + T > len(base):
            raise ValueError(f"K + T = {K + T} exceeds the {len(base)} decoder layers")
        return [copy.deepcopy(base[K + i]) for i in range(T)]

    def add_gate(self, adapter: BackboneAdapter) -> None:
        """Give twig-only heads a gate initialised from base layers K..K+T-1 (the start of stage 3)."""
        self._attach_gate(self._base_copies(adapter, self.branch_layer, self.T), adapter.hidden_size)
        self.high_res_layers.to(device=adapter.device, dtype=adapter.dtype)
        self.high_res_head.to(device=adapter.device, dtype=adapter.dtype)

    @property
    def has_gate(self) -> bool:
        return self.high_res_layers is not None

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

        Raises:
            ValueError: the heads have no gate.
        """
        if self.high_res_layers is None:
            raise ValueError("these heads have no gate (a stage-1/2 or SD-RPN checkpoint); the twig runs every time")
        h = hidden_k
        for layer in self.high_res_layers:
            h = layer(h, attention_mask=mask, position_embeddings=rotary)
        # No final norm: the head reads the raw last-token state, as in the released models.
        return self.high_res_head(h[:, -1]).squeeze(-1)

    def twig_states(
        self, hidden_k: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The hidden state after the first T-1 twig layers (and SD-RPN's ``twig_norm``): the input of the last
        layer's q/k.

        Args:
            hidden_k: (1, L, D) the input of base layer K.
            rotary: (cos, sin), each (1, L, head_dim).
            mask: the causal mask for L tokens.

        Returns:
            (1, L, D); ``hidden_k`` itself when T is 1 and there is no twig norm.
        """
        h = hidden_k
        for layer in self.twig_layers[:-1]:
            h = layer(h, attention_mask=mask, position_embeddings=rotary)
        return h if self.twig_norm is None else self.twig_norm(h)

    def _qk(self, adapter: BackboneAdapter, states: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
            qi: int, image_start: int, image_end: int, rope: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The last twig layer's query at ``qi`` (1, H, 1, d) and keys of the visual tokens (1, H, N, d), kv heads
        repeated for grouped-query attention."""
        last = self.twig_layers[-1]
        q, _ = adapter.project_qk(last, last.input_layernorm(states[:, qi : qi + 1]))
        _, k = adapter.project_qk(last, last.input_layernorm(states[:, image_start:image_end]))
        if rope:
            cos, sin = rotary
            q = _rope(q, cos[:, qi : qi + 1], sin[:, qi : qi + 1])
            k = _rope(k, cos[:, image_start:image_end], sin[:, image_start:image_end])
        return q, k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)

    def roi_scores(
        self,
        adapter: BackboneAdapter,
        states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        image_start: int,
        image_end: int,
        query_index: int = -1,
        *,
        rope: bool = True,
        multi_head: bool = True,
    ) -> torch.Tensor:
        """The last twig layer's ``q(query) . k(visual)`` on :meth:`twig_states`.

        Args:
            states: (1, L, D) from :meth:`twig_states`.
            rotary, image_start, image_end, query_index: as in :meth:`roi_logits`.
            rope: rotate q and k (Q-Zoom); SD-RPN's LLaVA twig does not.
            multi_head: average the heads' ``q . k / sqrt(d)``; False sums the unscaled per-head products (the dot
                product of the whole projections, the released modules' default without ``roi_multi_head``).

        Returns:
            (N,) raw logits, N = image_end - image_start.
        """
        qi = query_index % states.shape[1]
        q, k = self._qk(adapter, states, rotary, qi, image_start, image_end, rope)
        scores = q @ k.transpose(-1, -2)  # (1, H, 1, N)
        if multi_head:
            return (scores / math.sqrt(q.shape[-1])).mean(dim=1)[0, 0]
        return scores.sum(dim=1)[0, 0]

    def first_token_scores(
        self,
        adapter: BackboneAdapter,
        states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        image_start: int,
        image_end: int,
    ) -> torch.Tensor:
        """Qwen3-VL's sink probe: attention head 0's ``q(first token) . k(visual) / sqrt(d)`` in the last twig
        layer, with RoPE (`roi_official.qwen3_sink_keep` turns it into the sink mask).

        Returns:
            (N,) raw scores.
        """
        q, k = self._qk(adapter, states, rotary, 0, image_start, image_end, rope=True)
        return (q[:, :1] @ k[:, :1].transpose(-1, -2))[0, 0, 0] / math.sqrt(q.shape[-1])

    def roi_logits(
        self,
        adapter: BackboneAdapter,
        hidden_k: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        image_start: int,
        image_end: int,
        query_index: int = -1,
        *,
        rope: bool = True,
        multi_head: bool = True,
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
        return self.roi_scores(adapter, states, rotary, image_start, image_end, query_index, rope=rope,
                               multi_head=multi_head)
