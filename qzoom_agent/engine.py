"""Running slices of a backbone's decoder by hand: layer ranges with a shared KV cache, and greedy decoding.

The HF forward runs all layers at once. Q-Zoom needs to stop at layer K, look at the hidden state, and then
either continue, or rewrite the sequence tail and resume. Running the model's own decoder layers in a loop,
with masks and rotary embeddings built the way the HF text model builds them, reproduces its forward exactly.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

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
        """Greedy decoding from the prefill's last logits until an end-of-turn id or ``max_new_tokens``.

        Returns:
            ``(tokens, decode_steps)`` as :meth:`decode`.
        """
        out = self.decode(first_logits, cache, next_position, max_new_tokens)
        return out.tokens, out.steps

    def decode(
        self,
        first_logits: torch.Tensor,
        cache: DynamicCache,
        next_position: torch.Tensor,
        max_new_tokens: int,
        *,
        stop_ids: set[int] | None = None,
        stop_strings: tuple[str, ...] = (),
        sampling: Sampling | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> Decoding:
        """Decode from the prefill's last logits.

        Args:
            first_logits: (1, V) logits after the prompt.
            cache: the full KV cache of the prompt, all layers the same length; extended in place by every token
                fed back (all generated tokens but the last).
            next_position: position ids of the first generated token, family layout with length 1.
            max_new_tokens: upper bound on generated tokens.
            stop_ids: ids that end decoding (default: the backbone's end-of-turn ids).
            stop_strings: texts that end decoding once the decoded text (special tokens kept) contains one.
            sampling: temperature / top-p sampling with a seeded generator; None decodes greedily.
            on_token: called with each token as it is chosen (streaming).

        Returns:
            The generated ids (ending with the id that stopped decoding, when one did), the decode steps run (the
            single-token forward passes), and why decoding stopped.
        """
        stops = self.adapter.eos_token_ids if stop_ids is None else stop_ids
        tok = self.adapter.tokenizer
        n_layers = self.adapter.num_layers
        embed = self.adapter.embed_tokens
        tokens: list[int] = []
        steps = 0
        logits, position = first_logits, next_position
        while True:
            token = _pick(logits, sampling)
            tokens.append(token)
            if on_token is not None:
                on_token(token)
            if token in stops:
                return Decoding(tokens, steps, "stop_id")
            if stop_strings and any(s in tok.decode(tokens, skip_special_tokens=False) for s in stop_strings):
                return Decoding(tokens, steps, "stop_string")
            if len(tokens) >= max_new_tokens:
                return Decoding(tokens, steps, "length")
            hidden = embed(torch.tensor([[token]], device=first_logits.device))
            rotary = self.adapter.rotary(hidden, position)
            # A single query token may attend to every cached key, so no mask is needed.
            hidden = self.run(0, n_layers, hidden, rotary, None, cache)
            steps += 1
            logits = self.logits(hidden)
            position = position + 1


@dataclass(frozen=True)
class Sampling:
    """Sampled decoding: ``temperature`` > 0, nucleus ``top_p`` in (0, 1], and a ``seed`` for reproducible draws."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"temperature must be > 0 (use sampling=None for greedy), got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        object.__setattr__(self, "_gen", None)

    def generator(self, device: torch.device) -> torch.Generator | None:
        """One generator per Sampling, seeded once, so successive tokens draw different numbers."""
        if self.seed is None:
            return None
        if self._gen is None:
            object.__setattr__(self, "_gen", torch.Generator(device=device).manual_seed(self.seed))
        return self._gen


@dataclass
class Decoding:
    """What `DecoderRunner.decode` produced: ``tokens``, single-token forward passes ``steps``, and ``reason``
    (``"stop_id"``, ``"stop_string"`` or ``"length"``). Every token but the last was fed back into the cache."""

    tokens: list[int]
    steps: int
    reason: str


def _pick(logits: torch.Tensor, sampling: Sampling | None) -> int:
    """The next token from (1, V) ``logits``: the argmax, or a draw under ``sampling``."""
    if sampling is None:
        return int(logits.argmax(-1))
    probs = torch.softmax(logits[0].float() / sampling.temperature, -1)
    if sampling.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < sampling.top_p  # the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=sampling.generator(probs.device)))
