"""The real architectures `bench-scale` times, written out as config dicts, and their CPU-sized versions.

Sources of the real values (the released ``config.json`` files, in transformers 5 key names: ``rope_parameters``
holds what ``config.json`` writes as ``rope_theta`` and ``rope_scaling``):

* Qwen2.5-VL-7B-Instruct. Language model: https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct-AWQ/blob/main/config.json
  (``_name_or_path: Qwen/Qwen2.5-VL-7B-Instruct``; the AWQ copy quantises the language model only): hidden 3584,
  intermediate 18944, 28 layers, 28 heads, 4 kv heads, rope_theta 1e6, mrope_section [16, 24, 24], rms eps 1e-6,
  max positions 128000, untied embeddings; vocab 152064 (https://huggingface.co/unsloth/Qwen2.5-VL-7B-Instruct,
  config.json). Vision tower (a full ``vision_config`` written by transformers 4.51 for a 7B fine-tune,
  https://huggingface.co/Icey444/Ground-R1_orig_1050/blob/main/config.json; the module printout in
  github.com/acproject/duorou docs/qwen2.5vl_graph.md agrees): depth 32, hidden 1280, intermediate 3420, 16 heads,
  out_hidden_size 3584, patch 14, spatial merge 2, temporal patch 2, window 112, full attention in blocks
  [7, 15, 23, 31], SiLU.
* Qwen3-VL-4B-Instruct: the Qwen3-VL-4B-Instruct ``config.json`` uploaded at
  https://huggingface.co/TechCarbasa/MyModels/commit/400bbbf998ac875feb9b2182d409b81aa3601ac8 and the same dict
  written out in code by DiffSynth's Qwen3-VL encoder (``transformers_version 4.57.0.dev0``): hidden 2560,
  intermediate 9728, 36 layers, 32 heads, 8 kv heads, head_dim 128, rope_theta 5e6, interleaved mrope_section
  [24, 20, 20], max positions 262144, vocab 151936, tied embeddings; vision depth 24, hidden 1024, intermediate
  4096, 16 heads, out_hidden_size 2560, patch 16, merge 2, temporal 2, 2304 position embeddings, deepstack
  [5, 11, 17], gelu_pytorch_tanh.

Q-Zoom heads: the released K and T (`config.DEFAULT_BRANCH`; the reference notes on the official code, section
3.3: "Qwen2.5-VL-3B K=24,T=3; 7B K=18,T=3; Qwen3-VL-4B K=24,T=3"), the gate branching at K too (section 2.5).

Sizes: ``full`` is the real model; ``medium`` keeps each architecture (head_dim, GQA, M-RoPE sections, window or
deepstack layout, untied or tied embeddings) at hidden 1024 with 16 (7B) or 18 (4B) decoder layers, proportionally
fewer heads and a smaller vision tower, and places K and T proportionally; ``tiny`` is for tests. Special-token
ids come from the offline character tokenizer (`tokenization.build_char_tokenizer`), so the prompt's text is a
few dozen character tokens where the real BPE tokenizer would use about 15: small against the visual tokens.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import DEFAULT_BRANCH

if TYPE_CHECKING:  # transformers is imported where a config is built: the CLI's parser only needs the names
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

QWEN2_5_VL_7B: dict[str, Any] = {
    "text_config": {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "hidden_act": "silu",
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "vocab_size": 152064,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        "use_sliding_window": False,
        "tie_word_embeddings": False,
    },
    "vision_config": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "hidden_act": "silu",
        "tokens_per_second": 2,
    },
    "tie_word_embeddings": False,
}

QWEN3_VL_4B: dict[str, Any] = {
    "text_config": {
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "hidden_act": "silu",
        "attention_bias": False,
        "max_position_embeddings": 262144,
        "rms_norm_eps": 1e-6,
        "vocab_size": 151936,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                            "mrope_interleaved": True},
        "tie_word_embeddings": True,
    },
    "vision_config": {
        "depth": 24,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_heads": 16,
        "out_hidden_size": 2560,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [5, 11, 17],
        "hidden_act": "gelu_pytorch_tanh",
    },
    "tie_word_embeddings": True,
}

# Per size: overrides of the real dict, and the heads' (K, T). Medium: hidden 1024 and head_dim kept (so the
# M-RoPE sections are the real ones); intermediate and vocabulary scaled with the hidden size (to multiples of
# 128); layers 28 -> 16 and 36 -> 18 with K, T scaled alike (18 * 16/28 = 10.3 -> 10, 3 * 16/28 = 1.7 -> 2;
# 24 / 2 = 12, 3 / 2 = 1.5 -> 2); vision towers of depth 8 keep their layouts (every 8th block full attention;
# deepstack after each quarter of the tower), at half the width with the real head size.
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "qwen2_5_vl_7b": {
        "full": {"twig": DEFAULT_BRANCH["Qwen2.5-VL-7B"]},
        "medium": {
            "text_config": {"hidden_size": 1024, "intermediate_size": 5376, "num_hidden_layers": 16,
                            "num_attention_heads": 8, "num_key_value_heads": 1, "vocab_size": 43392},
            "vision_config": {"depth": 8, "hidden_size": 640, "intermediate_size": 1710, "num_heads": 8,
                              "out_hidden_size": 1024, "fullatt_block_indexes": [7]},
            "twig": (10, 2),
        },
        "tiny": {
            "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
                            "num_attention_heads": 4, "num_key_value_heads": 1, "vocab_size": 512,
                            "rope_parameters": {"mrope_section": [2, 3, 3]}},
            "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                              "out_hidden_size": 64, "fullatt_block_indexes": [1]},
            "twig": (2, 2),
        },
    },
    "qwen3_vl_4b": {
        "full": {"twig": DEFAULT_BRANCH["Qwen3-VL-4B"]},
        "medium": {
            "text_config": {"hidden_size": 1024, "intermediate_size": 3840, "num_hidden_layers": 18,
                            "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 60800},
            "vision_config": {"depth": 8, "hidden_size": 512, "intermediate_size": 2048, "num_heads": 8,
                              "out_hidden_size": 1024, "deepstack_visual_indexes": [1, 3, 5]},
            "twig": (12, 2),
        },
        "tiny": {
            "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 5,
                            "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 512,
                            "rope_parameters": {"mrope_section": [4, 2, 2]}},
            "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                              "out_hidden_size": 64, "deepstack_visual_indexes": [0, 1]},
            "twig": (3, 2),
        },
    },
}

REAL = {"qwen2_5_vl_7b": QWEN2_5_VL_7B, "qwen3_vl_4b": QWEN3_VL_4B}
FAMILY = {"qwen2_5_vl_7b": "qwen2_5_vl", "qwen3_vl_4b": "qwen3_vl"}
ARCHS = tuple(REAL)
SIZE_NAMES = ("tiny", "medium", "full")


@dataclass(frozen=True)
class ArchSpec:
    """One architecture at one size: its config dict and where the Q-Zoom heads branch."""

    arch: str
    size: str
    family: str  # the tokenizer / adapter family: "qwen2_5_vl" or "qwen3_vl"
    config: dict[str, Any]  # text_config, vision_config and top-level keys, as in config.json
    twig_K: int
    twig_T: int

    @property
    def layers(self) -> int:
        return int(self.config["text_config"]["num_hidden_layers"])

    @property
    def hidden(self) -> int:
        return int(self.config["text_config"]["hidden_size"])


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` merged in, nested dicts key by key (neither is modified)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def arch_spec(arch: str, size: str) -> ArchSpec:
    """The config dict and heads of ``arch`` (``qwen2_5_vl_7b`` or ``qwen3_vl_4b``) at ``size``.

    Raises:
        ValueError: an unknown architecture or size, named with the valid ones.
    """
    if arch not in REAL:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    if size not in SIZE_NAMES:
        raise ValueError(f"unknown size {size!r}; expected one of {', '.join(SIZE_NAMES)}")
    over = dict(SIZES[arch][size])
    k, t = over.pop("twig")
    return ArchSpec(arch, size, FAMILY[arch], _merge(REAL[arch], over), int(k), int(t))


def hf_config(spec: ArchSpec, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The Hugging Face config of ``spec``, its special-token ids taken from ``tokenizer`` (whose ids must fit
    the vocabulary)."""
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    cfg = copy.deepcopy(spec.config)
    if len(tokenizer) > cfg["text_config"]["vocab_size"]:
        raise ValueError(f"the tokenizer has {len(tokenizer)} ids, more than the vocabulary's "
                         f"{cfg['text_config']['vocab_size']}")
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    cfg["text_config"].update(bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    config_class = Qwen2_5_VLConfig if spec.family == "qwen2_5_vl" else Qwen3VLConfig
    return config_class(**cfg, **ids)


def parameter_counts(spec: ArchSpec) -> dict[str, int]:
    """Approximate parameters of the language model's decoder layers, its embeddings and head, and the vision
    tower's blocks (weights only, biases and norms left out): for the report."""
    t, v = spec.config["text_config"], spec.config["vision_config"]
    head_dim = t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]
    h, q, kv = t["hidden_size"], t["num_attention_heads"] * head_dim, t["num_key_value_heads"] * head_dim
    layer = h * q * 2 + h * kv * 2 + 3 * h * t["intermediate_size"]
    embed = h * t["vocab_size"] * (1 if spec.config.get("tie_word_embeddings") else 2)
    vh = v["hidden_size"]
    block = 4 * vh * vh + (3 if "fullatt_block_indexes" in v else 2) * vh * v["intermediate_size"]
    return {"decoder": layer * t["num_hidden_layers"], "embeddings": embed, "vision": block * v["depth"]}
