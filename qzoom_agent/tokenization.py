"""Character-level tokenizers built in code, so tiny models need no hub.

Every printable ASCII character is one token. Qwen's special tokens are real special tokens; the tool and
thinking tags are added as ordinary (non-special) tokens, as in the released Qwen tokenizers, so that
decoding keeps them in the text.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
LLAVA_SPECIAL_TOKENS = ["<|endoftext|>", "<s>", "</s>", "<image>"]
TAG_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
CHARACTERS = [c for c in string.printable if c not in "\x0b\x0c\r"]

# A compact LLaVA-1.5 style template: one user turn may carry an image, rendered as a single <image> token
# that the backbone adapter expands to the fixed number of visual tokens.
LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' -%}{{ message.content if message.content is string else '' }}{{ '\\n' }}"
    "{%- elif message.role == 'user' -%}{{ 'USER: ' }}"
    "{%- if message.content is string -%}{{ message.content }}"
    "{%- else -%}{%- for c in message.content -%}"
    "{%- if c.type == 'image' or 'image' in c -%}{{ '<image>\\n' }}{%- elif 'text' in c -%}{{ c.text }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{ ' ' }}"
    "{%- elif message.role == 'assistant' -%}{{ 'ASSISTANT: ' }}"
    "{{ message.content if message.content is string else message.content[0].text }}{{ '</s>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


def qwen_chat_template() -> str:
    """The Qwen3-VL chat template shipped with TRL: tool calls, and images inside tool turns."""
    from trl.chat_template_utils import qwen3_vl_chat_template

    return qwen3_vl_chat_template


def build_char_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """Build a character-level tokenizer for a model family.

    Args:
        family: ``"qwen2_5_vl"``, ``"qwen3_vl"`` or ``"llava"``.

    Returns:
        A fast tokenizer with the family's special tokens, chat template, eos and pad tokens. It saves with
        ``save_pretrained`` and reloads offline with ``AutoTokenizer.from_pretrained``.
    """
    if family in ("qwen2_5_vl", "qwen3_vl"):
        specials, eos, pad, template = QWEN_SPECIAL_TOKENS, "<|im_end|>", "<|endoftext|>", qwen_chat_template()
    elif family == "llava":
        specials, eos, pad, template = LLAVA_SPECIAL_TOKENS, "</s>", "<|endoftext|>", LLAVA_CHAT_TEMPLATE
    else:
        raise ValueError(f"unknown model family {family!r}; expected qwen2_5_vl, qwen3_vl or llava")
    vocab = {"<unk>": 0}
    for ch in CHARACTERS:
        vocab[ch] = len(vocab)
    # BPE with no merges splits text into single characters; Fuse joins them back without spaces.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", eos_token=eos, pad_token=pad, chat_template=template
    )
    tok.add_tokens(specials, special_tokens=True)
    tok.add_tokens(TAG_TOKENS, special_tokens=False)
    return tok
