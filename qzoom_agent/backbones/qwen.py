"""Behaviour shared by the Qwen VL families: M-RoPE positions, dynamic-resolution images, RoI splicing."""

from __future__ import annotations

import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ..images import fit_to_token_budget, resize_to
from .base import BackboneAdapter, ImageInputs, Prompt, Splice, VisualFeatures


def source_aligned_positions(positions: torch.Tensor, image_start: int, image_end: int, src_grid: tuple[int, int],
                             roi_grid: tuple[int, int], roi_cells: tuple[int, int, int, int]) -> torch.Tensor:
    """Q-Zoom's continuous alignment, as the released code builds it, for the spliced sequence
    ``[... source image, <|vision_end|>] [<|vision_start|> RoI <|vision_end|>] [rest]``.

    The RoI is a new frame two steps after the source image's (t = t_src + max(h_src, w_src) + 2); its (h, w)
    indices run in float32 ``linspace`` from the source positions of the first cell of ``roi_cells`` to those of
    its last row and column; its start and end tokens follow the source's end token, and every token after the RoI
    block shifts by max(h_roi, w_roi) + 2.

    Args:
        positions: (3, 1, L) first-pass M-RoPE positions.
        image_start, image_end: the source image tokens' span; ``image_end`` is the source ``<|vision_end|>``.
        src_grid, roi_grid: (rows, cols) of the source view and of the RoI.
        roi_cells: ``(r0, c0, r1, c1)``, the source cells the RoI came from (exclusive ends).

    Returns:
        (3, 1, L + n_roi + 2) float32 positions of the spliced sequence.
    """
    pos = positions.to(torch.float32)
    sh, sw = src_grid
    r0, c0, r1, c1 = roi_cells
    r1, c1 = min(r1, sh), min(c1, sw)
    at = lambda r, c: image_start + r * sw + c  # noqa: E731 - the sequence index of source cell (r, c)
    gh, gw = roi_grid
    rows = torch.linspace(float(pos[1, 0, at(r0, c0)]), float(pos[1, 0, at(r1 - 1, c0)]), gh, dtype=torch.float32,
                          device=pos.device)
    cols = torch.linspace(float(pos[2, 0, at(r0, c0)]), float(pos[2, 0, at(r0, c1 - 1)]), gw, dtype=torch.float32,
                          device=pos.device)
    t_roi = float(pos[0, 0, image_start]) + max(sh, sw) + 2
    grid_h, grid_w = torch.meshgrid(rows, cols, indexing="ij")
    roi_pos = torch.stack([torch.full((gh * gw,), t_roi, device=pos.device), grid_h.flatten(),
                           grid_w.flatten()])[:, None, :]
    shift = max(gh, gw) + 2
    end = pos[:, :, image_end : image_end + 1]  # the source <|vision_end|>
    tail = pos[:, :, image_end + 1 :] + shift
    return torch.cat([pos[:, :, : image_end + 1], end + 1, roi_pos, end + shift, tail], 2)


class QwenAdapter(BackboneAdapter):
    """Qwen2-VL-style models: ``<|vision_start|> IMG <|vision_end|>`` blocks and 3-D (t, h, w) M-RoPE."""

    @property
    def vision_config(self):
        return self.model.config.vision_config

    @property
    def merge(self) -> int:
        return self.vision_config.spatial_merge_size

    @property
    def px_per_token(self) -> int:
        """Resized pixels per merged visual token side: patch size times merge size (28 or 32)."""
        return self.vision_config.patch_size * self.merge

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def vision_start_id(self) -> int:
        return self.model.config.vision_start_token_id

    @property
    def vision_end_id(self) -> int:
        return self.model.config.vision_end_token_id

    @classmethod
    def default_image_processor(cls, config) -> Qwen2VLImageProcessorPil:
        vc = config.vision_config
        f = vc.patch_size * vc.spatial_merge_size
        return Qwen2VLImageProcessorPil(
            size={"shortest_edge": 4 * f * f, "longest_edge": 16384 * f * f},
            patch_size=vc.patch_size,
            temporal_patch_size=vc.temporal_patch_size,
            merge_size=vc.spatial_merge_size,
        )

    def prepare_image(self, image: Image.Image, *, min_tokens: int, max_tokens: int) -> ImageInputs:
        f = self.px_per_token
        width, height = fit_to_token_budget(image.width, image.height, factor=f, min_tokens=min_tokens,
                                            max_tokens=max_tokens)
        resized = resize_to(image, (width, height))
        # The image already has its final size; equal bounds make the processor's own resize a no-op.
        out = self.image_processor(
            images=[resized],
            size={"shortest_edge": width * height, "longest_edge": width * height},
            return_tensors="pt",
        )
        thw = out["image_grid_thw"]
        grid = (int(thw[0, 1]) // self.merge, int(thw[0, 2]) // self.merge)
        if grid != (height // f, width // f):
            raise RuntimeError(f"image processor produced grid {grid}, expected {(height // f, width // f)}")
        return ImageInputs(out["pixel_values"], thw, grid, (width, height), (image.width, image.height))

    def hf_inputs(self, input_ids: torch.LongTensor, images: list[ImageInputs]) -> dict[str, torch.Tensor]:
        """Keyword arguments for the stock HF ``forward``/``generate`` on ``input_ids`` holding ``images``."""
        return {
            "input_ids": input_ids,
            "pixel_values": torch.cat([im.pixel_values for im in images], 0).to(self.device),
            "image_grid_thw": torch.cat([im.image_grid_thw for im in images], 0).to(self.device),
            "mm_token_type_ids": self.image_mask(input_ids).int(),
        }

    def _vision_outputs(self, images: list[ImageInputs]):
        pixels = torch.cat([im.pixel_values for im in images], 0).to(self.device)
        thw = torch.cat([im.image_grid_thw for im in images], 0).to(self.device)
        return self.model.model.get_image_features(pixel_values=pixels, image_grid_thw=thw)

    def encode_image(self, images: list[ImageInputs]) -> VisualFeatures:
        out = self._vision_outputs(images)
        return VisualFeatures(torch.cat(out.pooler_output, 0))

    def positions(self, input_ids: torch.LongTensor, images: list[ImageInputs]) -> torch.Tensor:
        """(3, 1, L) M-RoPE position ids, exactly as the HF model computes them."""
        thw = torch.cat([im.image_grid_thw for im in images], 0).to(input_ids.device) if images else None
        types = self.image_mask(input_ids).int()
        pos, _ = self.model.model.get_rope_index(input_ids, mm_token_type_ids=types, image_grid_thw=thw)
        return pos

    def splice_roi(
        self,
        prompt: Prompt,
        positions: torch.Tensor,
        rois: list[ImageInputs],
        roi_cells: list[tuple[int, int, int, int]],
        reuse_src_pos: bool,
    ) -> Splice:
        if len(rois) != 1 or len(roi_cells) != 1:
            raise ValueError(f"Q-Zoom splices one RoI on Qwen models, got {len(rois)}")
        roi, cells = rois[0], roi_cells[0]
        ids = prompt.input_ids
        p = prompt.image_end  # the prefix ends with the source image tokens; the tail starts at its <|vision_end|>
        n_roi = roi.n_tokens
        block = [self.vision_end_id, self.vision_start_id] + [self.image_token_id] * n_roi + [self.vision_end_id]
        block_t = torch.tensor([block], dtype=ids.dtype, device=ids.device)
        new_ids = torch.cat([ids[:, :p], block_t, ids[:, p + 1 :]], 1)
        roi_start, roi_end = p + 2, p + 2 + n_roi
        if not reuse_src_pos:
            new_pos = self.positions(new_ids, [prompt.image, roi])
        else:
            new_pos = source_aligned_positions(positions, prompt.image_start, p, prompt.image.grid, roi.grid, cells)
        return Splice(new_ids, new_pos, p, roi_start, roi_end)
