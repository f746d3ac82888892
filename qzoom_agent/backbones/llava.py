"""LLaVA-1.5: a CLIP tower on a fixed square input, a fixed grid of visual tokens, and 1-D RoPE.

As LLaVA-1.5 (``image_aspect_ratio: pad``) and SD-RPN do it: the whole image is padded to a square with the
processor's mean colour before it is resized, so its aspect ratio survives; a RoI crop is stretched to the square
input. RoI tokens go right behind the image tokens (LLaVA has no vision start or end tokens).
"""

from __future__ import annotations

import json

import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from ..images import resize_to
from .base import BackboneAdapter, ImageInputs, Prompt, Splice, VisualFeatures


class LlavaAdapter(BackboneAdapter):
    """LLaVA has no vision start/end tokens; the RoI tokens go right behind the source image tokens."""

    family = "llava"
    model_types = ("llava",)

    @property
    def image_size(self) -> int:
        return self.model.config.vision_config.image_size

    @property
    def grid_side(self) -> int:
        return self.image_size // self.model.config.vision_config.patch_size

    @property
    def px_per_token(self) -> float:
        """Input pixels per visual token side on the fixed grid (14 for LLaVA-1.5's 336 px / 24)."""
        return self.image_size / self.grid_side

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @classmethod
    def default_image_processor(cls, config) -> CLIPImageProcessorPil:
        side = config.vision_config.image_size
        return CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})

    @property
    def default_reuse_src_pos(self) -> bool:
        return False  # SD-RPN places RoI tokens at contiguous positions

    def _inputs(self, square: Image.Image, source_size: tuple[int, int],
                canvas: tuple[int, int, int, int] | None) -> ImageInputs:
        side = self.image_size
        resized = resize_to(square, (side, side))  # the processor's own resize and centre crop then change nothing
        out = self.image_processor(images=[resized], return_tensors="pt")
        grid = (self.grid_side, self.grid_side)
        return ImageInputs(out["pixel_values"], None, grid, (side, side), source_size, canvas)

    def _check_budget(self, max_tokens: int) -> None:
        n = self.grid_side**2
        if max_tokens < n:
            raise ValueError(f"LLaVA encodes every image as {n} visual tokens; max_tokens={max_tokens} is too small")

    def prepare_image(self, image: Image.Image, *, min_tokens: int, max_tokens: int) -> ImageInputs:
        """The whole image padded to a square with the processor's mean colour (centred, as LLaVA's
        ``expand2square``), then resized to the square input."""
        self._check_budget(max_tokens)
        w, h = image.size
        side = max(w, h)
        ox, oy = (side - w) // 2, (side - h) // 2
        if ox == 0 and oy == 0:
            return self._inputs(image, (w, h), None)
        fill = tuple(int(m * 255) for m in self.image_processor.image_mean)  # as LLaVA truncates it
        square = Image.new(image.mode, (side, side), fill if image.mode == "RGB" else fill[0])
        square.paste(image, (ox, oy))
        return self._inputs(square, (w, h), (ox, oy, side, side))

    def prepare_roi(self, crop: Image.Image, *, min_tokens: int, max_tokens: int) -> ImageInputs:
        """A RoI crop stretched to the square input, as SD-RPN encodes it."""
        self._check_budget(max_tokens)
        return self._inputs(crop, crop.size, None)

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The conversation in LLaVA-1.5's ``USER: ... ASSISTANT:`` format, one ``<image>`` per image.

        The first user turn renders exactly as :meth:`build_prompt` (so a conversation's first prefill is the
        perception's); tool turns are user turns holding a ``<tool_response>`` block, as in Qwen's tool format; the
        tool listing, when given, follows the system text.
        """
        out = []
        for m in messages:
            role, content = m.get("role"), m.get("content")
            if role == "system":
                out.append(_text_of(content) + (_tools_block(tools) if tools else "") + "\n")
            elif role == "user":
                out.append("USER: " + _parts_text(content) + " ")
            elif role == "tool":
                out.append("USER: <tool_response>\n" + _parts_text(content) + "\n</tool_response> ")
            elif role == "assistant":
                out.append("ASSISTANT: " + _text_of(content) + _calls_text(m.get("tool_calls"), _text_of(content))
                           + "</s>")
            else:
                raise ValueError(f"unknown chat role {role!r}; use system, user, assistant or tool")
        if tools and not (messages and messages[0].get("role") == "system"):
            out.insert(0, _tools_block(tools).lstrip() + "\n")
        return "".join(out) + "ASSISTANT:"

    def hf_inputs(self, input_ids: torch.LongTensor, images: list[ImageInputs]) -> dict[str, torch.Tensor]:
        """Keyword arguments for the stock HF ``forward``/``generate`` on ``input_ids`` holding ``images``."""
        pixels = torch.cat([im.pixel_values for im in images], 0).to(self.device, self.dtype)
        return {"input_ids": input_ids, "pixel_values": pixels}

    def encode_image(self, images: list[ImageInputs]) -> VisualFeatures:
        cfg = self.model.config
        pixels = torch.cat([im.pixel_values for im in images], 0).to(self.device, self.dtype)
        out = self.model.model.get_image_features(
            pixel_values=pixels,
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        )
        return VisualFeatures(torch.cat([f.reshape(-1, f.shape[-1]) for f in out.pooler_output], 0))

    def positions(self, input_ids: torch.LongTensor, images: list[ImageInputs]) -> torch.Tensor:
        """(1, L) plain 1-D positions."""
        return torch.arange(input_ids.shape[1], device=input_ids.device)[None]

    def splice_roi(
        self,
        prompt: Prompt,
        positions: torch.Tensor,
        rois: list[ImageInputs],
        roi_cells: list[tuple[int, int, int, int]],
        reuse_src_pos: bool,
    ) -> Splice:
        if not rois or len(rois) != len(roi_cells):
            raise ValueError(f"need one cell range per RoI, got {len(rois)} RoIs and {len(roi_cells)} ranges")
        ids = prompt.input_ids
        p = prompt.image_end
        n_roi = sum(roi.n_tokens for roi in rois)
        roi_ids = torch.full((1, n_roi), self.image_token_id, dtype=ids.dtype, device=ids.device)
        new_ids = torch.cat([ids[:, :p], roi_ids, ids[:, p:]], 1)
        if not reuse_src_pos:  # SD-RPN: contiguous positions, every RoI in turn
            new_pos = self.positions(new_ids, [prompt.image, *rois])
        else:
            # 1-D analogue of source alignment (this project's option): each RoI token takes the (fractional)
            # raster position of the source cell it covers, and the text after the RoIs keeps its positions.
            src_w = prompt.image.grid[1]
            parts = []
            for roi, (r0, c0, r1, c1) in zip(rois, roi_cells, strict=True):
                gh, gw = roi.grid
                rows = torch.linspace(float(r0), float(r1 - 1), gh, device=ids.device)
                cols = torch.linspace(float(c0), float(c1 - 1), gw, device=ids.device)
                parts.append((rows[:, None] * src_w + cols[None, :]).reshape(1, -1) + prompt.image_start)
            pos = positions.to(torch.float32)
            new_pos = torch.cat([pos[:, :p], *parts, pos[:, p:]], 1)
        return Splice(new_ids, new_pos, p, p, p + n_roi)


def _text_of(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text")


def _parts_text(content) -> str:
    """User or tool content with ``<image>\n`` where each image part sits."""
    if isinstance(content, str):
        return content
    out = []
    for part in content or []:
        if isinstance(part, dict) and (part.get("type") in ("image", "image_url") or "image" in part):
            out.append("<image>\n")
        elif isinstance(part, dict):
            out.append(part.get("text", ""))
    return "".join(out)


def _calls_text(calls, content: str) -> str:
    """Tool calls as Qwen writes them: ``<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>``."""
    out = []
    for i, call in enumerate(calls or []):
        fn = call.get("function", call)
        args = fn.get("arguments", {})
        args = args if isinstance(args, str) else json.dumps(args)
        sep = "\n" if (i or content) else ""
        out.append(f'{sep}<tool_call>\n{{"name": "{fn.get("name")}", "arguments": {args}}}\n</tool_call>')
    return "".join(out)


def _tools_block(tools: list[dict]) -> str:
    listing = "\n".join(json.dumps(t) for t in tools)
    return ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n<tools>\n"
            + listing + "\n</tools>\n\nFor each function call, return a json object with function name and "
            "arguments within <tool_call></tool_call> XML tags.")
