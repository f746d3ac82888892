"""The ``zoomworld-tiny`` model: Qwen2.5-VL's real architecture at about 3.6 M parameters, trained from scratch.

The size measured first (``docs/zoomworld-tiny.md``, "Where the recipe started"): a 128-wide, 4-block vision
tower (patch 14, 2x2 merge, temporal patch 2, window attention) feeding a 256-wide, 4-layer language model with
M-RoPE, on the project's character tokenizer. Weights start at std ``1/sqrt(width)``: with HF's default 0.02 the
measured image features collapsed to one shared vector and almost no gradient reached the vision tower.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from ...backbones.qwen import QwenAdapter
from ...tokenization import build_char_tokenizer

FAMILY = "qwen2_5_vl"


class ZoomWorldTinySizes(BaseModel):
    """Widths and depths of ``zoomworld-tiny`` (the ``model:`` section of the recipe's ``base.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    vision_hidden: int = Field(128, ge=16, multiple_of=16, description="vision tower width (4 heads)")
    vision_depth: int = Field(4, ge=1, description="vision blocks; every second one uses full attention")
    hidden: int = Field(256, ge=32, multiple_of=32, description="language-model width (4 heads, 2 KV heads)")
    layers: int = Field(4, ge=1, description="language-model decoder layers")
    intermediate: int = Field(512, ge=16, description="language-model MLP width")
    rope_theta: float = Field(1e6, gt=1.0, description="language-model M-RoPE base (see zoomworld_tiny_config)")


def _mrope_section(head_dim: int) -> list[int]:
    """(t, h, w) rotary split summing to ``head_dim / 2``, in Qwen2.5-VL's 16:24:24 proportion ([8, 12, 12] at 64)."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def zoomworld_tiny_config(
    tok: PreTrainedTokenizerFast,
    *,
    vision_hidden: int = 128,
    vision_depth: int = 4,
    hidden: int = 256,
    layers: int = 4,
    intermediate: int = 512,
    rope_theta: float = 1e6,
) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config for ``tok``'s vocabulary at ``zoomworld-tiny`` scale.

    Args:
        tok: the character tokenizer from ``build_char_tokenizer("qwen2_5_vl")`` (special-token ids come from it).
        vision_hidden: vision tower width; its MLP is twice as wide.
        vision_depth: number of vision blocks. Odd-numbered blocks (1, 3, ...) attend over the whole image, the
            others within 112 px windows (4x4 merged tokens), Qwen2.5-VL's pattern at a small depth.
        hidden: language-model width; also the vision merger's output width (one vector per 28 px token).
        layers: language-model decoder layers.
        intermediate: language-model MLP width.
        rope_theta: M-RoPE base of the language model. Qwen2.5-VL gives the (t, h, w) sections contiguous
            frequency bands, the width (w) the lowest: at 64-dim heads and Qwen's 1e6 the fastest w frequency is
            1.8e-4 rad per token column (0.056 at a base of 100), so rotary positions barely tell columns apart.
            Measured, smaller bases did not help the language model read characters in order: on single-tag
            crops after 12.8k examples, 2-character tags 53/107 at 1e6, 47/107 at 100, 44/107 at 10 (a coin
            flip on the order), so the default stays Qwen's.

    Returns:
        The config, with ``initializer_range`` = 1/sqrt(width) in both sub-configs and sdpa attention.
    """
    heads = 4
    rope = {"rope_type": "default", "rope_theta": rope_theta, "mrope_section": _mrope_section(hidden // heads)}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=2,
            rope_parameters=rope,
            initializer_range=1 / math.sqrt(hidden),
            bos_token_id=None,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            depth=vision_depth,
            hidden_size=vision_hidden,
            intermediate_size=2 * vision_hidden,
            num_heads=heads,
            out_hidden_size=hidden,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=list(range(1, vision_depth, 2)) or [0],
            initializer_range=1 / math.sqrt(vision_hidden),
        ),
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    return config


def build_zoomworld_tiny(
    seed: int = 0, **sizes: int
) -> tuple[Qwen2_5_VLForConditionalGeneration, PreTrainedTokenizerFast, object]:
    """Build a freshly initialised ``zoomworld-tiny`` with its tokenizer and image processor, in memory.

    Args:
        seed: seed for the random weights.
        **sizes: overrides of :class:`ZoomWorldTinySizes` fields (validated), e.g. ``hidden=64`` for tests.

    Returns:
        ``(model, tokenizer, image_processor)``; the model is fp32, in train mode, about 3.6 M parameters at the
        default sizes. The processor is the one `QwenAdapter` uses (28 px per merged token).
    """
    dims = ZoomWorldTinySizes(**sizes)
    tok = build_char_tokenizer(FAMILY)
    config = zoomworld_tiny_config(tok, **dims.model_dump())
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    return model, tok, QwenAdapter.default_image_processor(config)
