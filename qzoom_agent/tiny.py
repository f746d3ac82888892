"""Tiny random models of each supported family, built from configs in code.

`qzoom-agent make-tiny DIR --family F` writes a model directory (config, safetensors weights, tokenizer, image
processor config) that `QZoomModel.from_pretrained(DIR)` loads offline. Tests use the same builders in memory.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from .tokenization import build_char_tokenizer

FAMILIES = ("qwen2_5_vl", "qwen3_vl", "llava")


def _qwen2_5_vl_config(tok: PreTrainedTokenizerFast, hidden: int, layers: int) -> Qwen2_5_VLConfig:
    heads = 4
    half = hidden // heads // 2  # mrope_section must sum to head_dim / 2
    section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section},
            bos_token_id=None,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_heads=4,
            out_hidden_size=hidden,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[1],
        ),
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def _qwen3_vl_config(tok: PreTrainedTokenizerFast, hidden: int, layers: int) -> Qwen3VLConfig:
    heads, head_dim = 4, hidden // 4
    half = head_dim // 2
    section = [half - 2 * (half // 4), half // 4, half // 4]
    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=2,
            head_dim=head_dim,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5e6,
                "mrope_section": section,
                "mrope_interleaved": True,
            },
            bos_token_id=None,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_heads=4,
            out_hidden_size=hidden,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=256,
            deepstack_visual_indexes=[0, 1],
        ),
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def _llava_config(tok: PreTrainedTokenizerFast, hidden: int, layers: int) -> LlavaConfig:
    image_size, patch = 112, 14
    return LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=patch,
            projection_dim=hidden,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            bos_token_id=None,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // patch) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


_CONFIGS = {"qwen2_5_vl": _qwen2_5_vl_config, "qwen3_vl": _qwen3_vl_config, "llava": _llava_config}
_CLASSES = {
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "qwen3_vl": Qwen3VLForConditionalGeneration,
    "llava": LlavaForConditionalGeneration,
}
DEFAULT_LAYERS = {"qwen2_5_vl": 4, "qwen3_vl": 5, "llava": 4}


def build_tiny(
    family: str, *, hidden: int = 64, layers: int | None = None, seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Build a tiny random VLM of ``family`` and its character-level tokenizer, in memory.

    Args:
        family: ``"qwen2_5_vl"``, ``"qwen3_vl"`` or ``"llava"``.
        hidden: hidden size of both the vision tower and the language model (divisible by 16).
        layers: number of language-model layers (defaults: 4, 5 for Qwen3-VL so that K can sit after the
            two deepstack layers, 4).
        seed: seed for the random weights.

    Returns:
        ``(model, tokenizer)``, the model in eval mode with sdpa attention and fp32 weights.
    """
    if family not in _CONFIGS:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    if hidden % 16:
        raise ValueError(f"hidden must be divisible by 16, got {hidden}")
    tok = build_char_tokenizer(family)
    config = _CONFIGS[family](tok, hidden, layers or DEFAULT_LAYERS[family])
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = _CLASSES[family](config).eval()
    return model, tok


def make_tiny(
    out_dir: str | Path,
    family: str,
    *,
    hidden: int = 64,
    layers: int | None = None,
    seed: int = 0,
    with_heads: bool = True,
) -> Path:
    """Build a tiny model of ``family`` and save it, with tokenizer and image processor, to ``out_dir``.

    With ``with_heads``, Q-Zoom heads initialised from the base layers (untrained) are saved to
    ``out_dir/qzoom``, which `QZoomModel.from_pretrained(out_dir)` picks up.

    Returns:
        The directory, which `QZoomModel.from_pretrained` loads offline.
    """
    from .backbones import adapter_class_for
    from .checkpoint import save_adapter
    from .config import QZoomConfig
    from .heads import QZoomHeads

    model, tok = build_tiny(family, hidden=hidden, layers=layers, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    cls = adapter_class_for(model.config)
    processor = cls.default_image_processor(model.config)
    processor.save_pretrained(out)
    if with_heads:
        adapter = cls(model, tok, processor)
        config = QZoomConfig.for_backbone(adapter.num_layers, adapter.min_branch_layer)
        save_adapter(QZoomHeads.from_base(adapter, config.twig_K, config.twig_T), config, out / "qzoom",
                     base_model=f"tiny-{family}")
    return out
