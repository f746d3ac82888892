"""What every backbone adapter provides, and the small records they exchange with the model.

An adapter wraps one loaded Hugging Face VLM and holds everything that differs between families: where the
decoder layers live, how positions are built, how an image becomes visual tokens under a token budget, and how
a region-of-interest (RoI) image is spliced into a prompt. The Q-Zoom model code above it is family-agnostic.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class ImageInputs:
    """One image, resized and turned into pixel inputs for the vision tower."""

    pixel_values: torch.Tensor  # processor output, family-specific layout
    image_grid_thw: torch.Tensor | None  # (1, 3) patch grid for Qwen families, None for LLaVA
    grid: tuple[int, int]  # (gh, gw): visual tokens after merging
    resized_size: tuple[int, int]  # (width, height) in pixels, as the model saw the image
    source_size: tuple[int, int]  # (width, height) of the image before resizing
    # A view padded to a square before resizing (LLaVA): (ox, oy, cw, ch), the source pasted at (ox, oy) on a cw x ch
    # canvas; None when the source itself was resized (see boxes.box_to_cells).
    canvas: tuple[int, int, int, int] | None = None

    @property
    def n_tokens(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass
class VisualFeatures:
    """Visual token embeddings of one or more images, in sequence order."""

    embeds: torch.Tensor  # (N, D)
    deepstack: list[torch.Tensor] | None = None  # Qwen3-VL: per injected layer, (N, D)

    @staticmethod
    def cat(parts: list[VisualFeatures]) -> VisualFeatures:
        embeds = torch.cat([p.embeds for p in parts], 0)
        if parts[0].deepstack is None:
            return VisualFeatures(embeds)
        layers = len(parts[0].deepstack)
        return VisualFeatures(embeds, [torch.cat([p.deepstack[i] for p in parts], 0) for i in range(layers)])


@dataclass
class Prompt:
    """A tokenised single-image prompt."""

    input_ids: torch.LongTensor  # (1, L)
    image_start: int  # index of the first visual token
    image_end: int  # index after the last visual token
    image: ImageInputs


@dataclass
class Splice:
    """The spliced sequence ``[prefix | tail]`` after a RoI image is inserted behind the source image.

    The prefix (everything up to and including the source image tokens) is unchanged, so its key/value cache
    below layer K can be reused; only the tail is recomputed there.
    """

    input_ids: torch.LongTensor  # (1, N2) the whole spliced sequence
    positions: torch.Tensor  # family layout over N2 tokens, e.g. (3, 1, N2) for M-RoPE; may be fractional
    prefix_len: int  # P: tokens shared with the first pass
    roi_start: int  # index of the first RoI visual token in the spliced sequence
    roi_end: int  # index after the last RoI visual token


class BackboneAdapter(ABC):
    """Family-specific access to a loaded VLM. Subclasses set ``family`` and implement the abstract methods."""

    family: str = ""
    model_types: tuple[str, ...] = ()

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, image_processor) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    # ---- structure -------------------------------------------------------------------------------------------
    @property
    def text_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def text_config(self):
        return self.text_model.config

    @property
    def layers(self) -> nn.ModuleList:
        return self.text_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def norm(self) -> nn.Module:
        return self.text_model.norm

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def embed_tokens(self) -> nn.Module:
        return self.text_model.embed_tokens

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def eos_token_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return {i for i in ids if i is not None}

    @property
    def default_reuse_src_pos(self) -> bool:
        """RoI positions when the config leaves ``reuse_src_pos`` unset: source-aligned on M-RoPE families."""
        return True

    @property
    def min_branch_layer(self) -> int:
        """The smallest K at which the layer-K hidden state is complete (Qwen3-VL: after deepstack injection)."""
        return 1

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (1, L, head_dim), for ``positions`` in the family layout."""
        return self.text_model.rotary_emb(hidden, positions)

    def project_qk(self, layer: nn.Module, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Query and key projections of a decoder layer, before RoPE.

        Args:
            layer: a decoder layer of this family.
            normed: (1, L, D) hidden states after the layer's input norm.

        Returns:
            ``(q, k)`` with shapes (1, heads, L, head_dim) and (1, kv_heads, L, head_dim).
        """
        attn = layer.self_attn
        shape = (*normed.shape[:-1], -1, attn.head_dim)
        q = attn.q_proj(normed).view(shape).transpose(1, 2)
        k = attn.k_proj(normed).view(shape).transpose(1, 2)
        return q, k

    def inject(self, layer_idx: int, hidden: torch.Tensor, visual_mask: torch.Tensor | None, visual) -> torch.Tensor:
        """Add per-layer visual features after decoder layer ``layer_idx`` (Qwen3-VL deepstack); a no-op here."""
        return hidden

    # ---- inputs ----------------------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def default_image_processor(cls, config):
        """An image processor for ``config`` that works without torchvision."""

    @abstractmethod
    def prepare_image(self, image: Image.Image, *, min_tokens: int, max_tokens: int) -> ImageInputs:
        """Resize ``image`` to a visual-token budget and make its pixel inputs."""

    def prepare_roi(self, crop: Image.Image, *, min_tokens: int, max_tokens: int) -> ImageInputs:
        """The pixel inputs of a RoI crop; as :meth:`prepare_image` unless the family encodes crops differently."""
        return self.prepare_image(crop, min_tokens=min_tokens, max_tokens=max_tokens)

    def build_prompt(self, image: ImageInputs, question: str, *, system: str | None = None) -> Prompt:
        """Tokenise a one-image, one-question chat prompt ending with the assistant header.

        The chat template renders one visual placeholder; it is expanded to the image's token count here.
        """
        messages = [] if system is None else [{"role": "system", "content": system}]
        messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        at = ids.index(self.image_token_id) if self.image_token_id in ids else -1
        ids = self.expand_images(ids, [image])
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        return Prompt(input_ids, at, at + image.n_tokens, image)

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """A whole conversation as prompt text ending with the assistant header, one visual placeholder per image.

        Images may sit in user and in tool turns. Qwen's tool format is used: a tool turn is a user turn holding
        ``<tool_response>`` blocks (Qwen3-VL's template; the stock Qwen2.5-VL template drops images in tool turns, so
        a tokenizer whose template does is rendered with TRL's Qwen3-VL template instead).

        Args:
            messages: chat messages (``role`` system, user, assistant or tool; ``content`` a string or parts such
                as ``{"type": "image", ...}`` and ``{"type": "text", "text": ...}``; assistant ``tool_calls``).
            tools: function schemas to list in the system turn, or None.
        """
        bare = [_without_payloads(m) for m in messages]
        return self.tokenizer.apply_chat_template(bare, tools=tools or None, tokenize=False,
                                                  add_generation_prompt=True, chat_template=self._tool_template())

    def _tool_template(self) -> str | None:
        """None when the tokenizer's own template renders an image in a tool turn, else TRL's Qwen3-VL template."""
        if not hasattr(self, "_tool_template_choice"):
            probe = [{"role": "user", "content": [{"type": "text", "text": "q"}]},
                     {"role": "assistant", "content": "a"},
                     {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": "r"}]}]
            placeholder = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
            try:
                text = self.tokenizer.apply_chat_template(probe, tokenize=False)
            except Exception:  # noqa: BLE001 - a template that rejects tool turns altogether
                text = ""
            if text.count(placeholder) == 1:
                self._tool_template_choice = None
            else:
                from trl.chat_template_utils import qwen3_vl_chat_template

                self._tool_template_choice = qwen3_vl_chat_template
        return self._tool_template_choice

    def expand_images(self, ids: list[int], images: list[ImageInputs]) -> list[int]:
        """Replace the chat template's visual placeholders in ``ids``, in order, by each image's token count.

        Raises:
            ValueError: the number of placeholders differs from ``len(images)``.
        """
        where = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(where) != len(images):
            raise ValueError(f"the chat template rendered {len(where)} image placeholders for {len(images)} images")
        out: list[int] = []
        last = 0
        for at, image in zip(where, images, strict=True):
            out += ids[last:at] + [self.image_token_id] * image.n_tokens
            last = at + 1
        return out + ids[last:]

    @abstractmethod
    def hf_inputs(self, input_ids: torch.LongTensor, images: list[ImageInputs]) -> dict[str, torch.Tensor]:
        """Keyword arguments for the stock HF ``forward``/``generate`` (the plain-model baseline)."""

    @abstractmethod
    def encode_image(self, images: list[ImageInputs]) -> VisualFeatures:
        """Run the vision tower; the embeddings come out in the order of ``images``."""

    @abstractmethod
    def positions(self, input_ids: torch.LongTensor, images: list[ImageInputs]) -> torch.Tensor:
        """Standard position ids for a sequence holding ``images`` in order."""

    @abstractmethod
    def splice_roi(
        self,
        prompt: Prompt,
        positions: torch.Tensor,
        rois: list[ImageInputs],
        roi_cells: list[tuple[int, int, int, int]],
        reuse_src_pos: bool,
    ) -> Splice:
        """Insert ``rois`` behind the source image of ``prompt``, in order.

        Args:
            prompt: the first-pass prompt.
            positions: the first-pass position ids.
            rois: the encoded-size inputs of the cropped regions (Qwen families take one, LLaVA up to two).
            roi_cells: per RoI, ``(r0, c0, r1, c1)`` the source token cells it came from (exclusive ends).
            reuse_src_pos: True for source-aligned (interpolated) RoI positions, False for plain positions.
        """

    def next_position(self, positions: torch.Tensor) -> torch.Tensor:
        """Position ids of the token after the last one, in the family layout (one step)."""
        return positions[..., -1:] + 1

    def image_mask(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """(1, L) bool: True at visual-token placeholders."""
        return input_ids == self.image_token_id

    @property
    @abstractmethod
    def image_token_id(self) -> int:
        """Token id of the visual placeholder."""

    def embed(self, input_ids: torch.LongTensor, visual: VisualFeatures | None) -> torch.Tensor:
        """Token embeddings with the visual embeddings scattered into the placeholders: (1, L, D)."""
        hidden = self.embed_tokens(input_ids)
        if visual is None:
            return hidden
        mask = self.image_mask(input_ids)
        n = int(mask.sum())
        if n != visual.embeds.shape[0]:
            raise ValueError(f"{n} visual placeholders but {visual.embeds.shape[0]} visual embeddings")
        hidden = hidden.clone()
        hidden[mask] = visual.embeds.to(hidden.dtype)
        return hidden


def _without_payloads(message: dict) -> dict:
    """``message`` with image parts reduced to ``{"type": "image"}``: templates only need to know where they are."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    parts = [{"type": "image"} if _is_image_part(part) else part for part in content]
    return {**message, "content": parts}


def _is_image_part(part) -> bool:
    return isinstance(part, dict) and (part.get("type") in ("image", "image_url") or "image" in part)
