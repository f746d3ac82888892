"""LLaVA-1.5: a CLIP tower on a fixed square input, a fixed grid of visual tokens, and 1-D RoPE."""

from __future__ import annotations

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

    def prepare_image(self, image: Image.Image, *, min_tokens: int, max_tokens: int) -> ImageInputs:
        n = self.grid_side**2
        if max_tokens < n:
            raise ValueError(f"LLaVA encodes every image as {n} visual tokens; max_tokens={max_tokens} is too small")
        # Resize straight to the square input (the aspect ratio is not kept), so the processor's
        # shortest-edge resize and centre crop change nothing and box coordinates map back exactly.
        side = self.image_size
        resized = resize_to(image, (side, side))
        out = self.image_processor(images=[resized], return_tensors="pt")
        grid = (self.grid_side, self.grid_side)
        return ImageInputs(out["pixel_values"], None, grid, (side, side), (image.width, image.height))

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
        roi: ImageInputs,
        roi_cells: tuple[int, int, int, int],
        reuse_src_pos: bool,
    ) -> Splice:
        ids = prompt.input_ids
        p = prompt.image_end
        n_roi = roi.n_tokens
        roi_ids = torch.full((1, n_roi), self.image_token_id, dtype=ids.dtype, device=ids.device)
        new_ids = torch.cat([ids[:, :p], roi_ids, ids[:, p:]], 1)
        if not reuse_src_pos:
            new_pos = self.positions(new_ids, [prompt.image, roi])
        else:
            # 1-D analogue of source alignment: each RoI token takes the (fractional) raster position of the
            # source cell it covers, and the text after the RoI keeps its first-pass positions.
            gh, gw = roi.grid
            r0, c0, r1, c1 = roi_cells
            src_w = prompt.image.grid[1]
            rows = torch.linspace(float(r0), float(r1 - 1), gh, device=ids.device)
            cols = torch.linspace(float(c0), float(c1 - 1), gw, device=ids.device)
            raster = (rows[:, None] * src_w + cols[None, :]).reshape(1, -1) + prompt.image_start
            pos = positions.to(torch.float32)
            new_pos = torch.cat([pos[:, :p], raster, pos[:, p:]], 1)
        return Splice(new_ids, new_pos, p, p, p + n_roi)
