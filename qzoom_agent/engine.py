"""Running slices of a backbone's decoder by hand: layer ranges with a shared KV cache, and greedy decoding.

The HF forward runs all layers at once. Q-Zoom needs to stop at layer K, look at the hidden state, and then
either continue, or rewrite the sequence tail and resume. Running the model's own decoder layers in a loop,
with masks and rotary embeddings built the way the HF text model builds them, reproduces its forward exactly.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from .backbones.base import BackboneAdapter, VisualFeatures


def cache_keyword(fn: Callable) -> str:
    """The name ``fn`` takes the KV cache under: ``cache`` in recent transformers 5.x, ``past_key_values`` before.

    Versions with the new name (5.24 among them) still accept the old one, but warn on every call: once per
    decoder layer per forward.
    """
    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


_MASK_CACHE = cache_keyword(create_causal_mask)


class DecoderRunner:
    """Layer-range execution and decoding for one backbone (batch size 1)."""

    def __init__(self, adapter: BackboneAdapter) -> None:
        self.adapter = adapter
        self._layer_cache = cache_keyword(type(adapter.layers[0]).forward)

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.adapter.text_config)

    def causal_mask(self, hidden: torch.Tensor, cache: DynamicCache | None, layer_idx: int = 0):
        """Causal mask for ``hidden`` (1, q, D) attending to the ``cache`` entries of ``layer_idx`` plus itself.

        Returns None when the attention implementation can use its implicit causal mask.
        """
        return create_causal_mask(
            config=self.adapter.text_config,
            inputs_embeds=hidden,
            attention_mask=None,
            layer_idx=layer_idx,
            **{_MASK_CACHE: cache},
        )

    def run(
        self,
        start: int,
        end: int,
        hidden: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        mask,
        cache: DynamicCache | None,
        visual_mask: torch.Tensor | None = None,
        visual: VisualFeatures | None = None,
    ) -> torch.Tensor:
        """Run decoder layers ``start .. end-1``.

        Args:
            hidden: (1, q, D) input of layer ``start``.
            rotary: (cos, sin) for the q tokens, each (1, q, head_dim).
            mask: causal mask from `causal_mask` (or None).
            cache: KV cache the layers append to, or None for a cache-free pass.
            visual_mask: (1, q) bool, visual tokens among the q tokens (for per-layer visual injection).
            visual: the features injected at those tokens (Qwen3-VL deepstack).

        Returns:
            (1, q, D) output of layer ``end-1``.
        """
        layers = self.adapter.layers
        for i in range(start, end):
            hidden = layers[i](
                hidden,
                attention_mask=mask,
                position_embeddings=rotary,
                use_cache=cache is not None,
                **{self._layer_cache: cache},
            )
            hidden = self.adapter.inject(i, hidden, visual_mask, visual)
        return hidden

    def logits(self, hidden_last: torch.Tensor) -> torch.Tensor:
        """(1, 1, D) last hidden state -> (1, V) next-token logits."""
        return self.adapter.lm_head(self.adapter.norm(hidden_last))[:, -1]

    def greedy(
        self, first_logits: torch.Tensor, cache: DynamicCache, next_position: torch.Tensor, max_new_tokens: int
    ) -> tuple[list[int], int]:
        """Greedy decoding from the prefill's last logits.

        Args:
            first_logits: (1, V) logits after the prompt.
            cache: the full KV cache of the prompt, all layers the same length.
            next_position: position ids of the first generated token, family layout with length 1.
            max_new_tokens: upper bound on generated tokens.

        Returns:
            ``(tokens, decode_steps)``: generated ids (ending with an end-of-turn id when one was produced) and
            the number of single-token forward passes run.
        """
        eos = self.adapter.eos_token_ids
        n_layers = self.adapter.num_layers
        embed = self.adapter.embed_tokens
        tokens: list[int] = []
        steps = 0
        token = int(first_logits.argmax(-1))
        position = next_position
        while True:
            tokens.append(token)
            if token in eos or len(tokens) >= max_new_tokens:
                return tokens, steps
            hidden = embed(torch.tensor([[token]], device=first_logits.device))
            rotary = self.adapter.rotary(hidden, position)
            # A single query token may attend to every cached key, so no mask is needed.
            hidden = self.run(0, n_layers, hidden, rotary, None, cache)
            steps += 1
            token = int(self.logits(hidden).argmax(-1))
            position = position + 1
