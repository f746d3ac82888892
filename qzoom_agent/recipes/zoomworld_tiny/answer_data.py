"""Answer-training data of phase 2 (``joint``): what the model sees after a zoom, plus dense and coarse examples.

Four sources, drawn per example from a seeded stream (the same ``(cfg, alphabet, split, index)`` always give the
same example):

* ``oracle``: a ZoomWorld scene (hr or doc), a fine question (``fine_mix``), and a crop around its target box
  with random context (``margin`` target sizes per side), enlarged so the target is ``zoom`` times its native size
  and encoded under a token cap drawn from ``oracle_tokens``: the view an ideal zoom would splice in.
* ``dense``: a phase-1 dense crop (1-3 tags, free placement) asked "What is written on the <colour> tag?" about a
  tag whose colour is unique in the crop; its per-token targets feed the auxiliary probe loss.
* ``coarse``: colour/shape of the large object on the whole scene under a cap drawn from ``coarse_tokens``.
* ``tile``: a fine question on a window of the scene around its target, at ``tile_scale`` of native size (what a
  high token budget sees): small glyphs among other tags and clutter, so the model learns to find the asked tag
  by colour and read it without enlargement.
* ``locate``: a fine question on the whole scene at a low budget (``locate_tokens``), where the glyphs cannot be
  read. No answer is appended or supervised; the example only carries the focus loss (`focus`) on the last
  prompt token, so the model learns *where* the asked tag is at the resolution Q-Zoom's global view has. That
  token's attention is what the SD-RPN twig reads and what stage 1 distils. Its answer loss is 0 and still counts
  in the batch mean, so a share ``p`` of locate examples scales the answer loss by ``1 - p``.

Encoding builds the prompt exactly as inference does (``adapter.build_prompt``), then appends the answer and
``<|im_end|>``; only those appended tokens are supervised. Dense examples carry per-token probe targets; with
``scene_aux`` the oracle, coarse and tile views carry them too (`scene_targets`), computed on the token grid the
view is encoded at.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ...backbones import BackboneAdapter, ImageInputs
from ...bench.oracle import zoom_crop, zoom_window
from ...images import resize_to
from ...zoomworld import VARIANTS, ZoomWorldSample, generate, seed_for
from ...zoomworld.questions import FINE_FAMILIES
from .dense_crops import DenseCrop, DenseCropConfig, crop_seed, render_dense_crop
from .dense_probe import DenseTargets
from .focus import focus_mask
from .scene_targets import Window, crop_targets, scene_targets

SOURCES = ("oracle", "dense", "coarse", "tile", "locate")
END_TOKEN = "<|im_end|>"
IGNORE = -100
_DENSE_TRIES = 16  # dense crops tried per example until one has a tag of a unique colour
_COARSE_MIX = {"color": 1.0, "shape": 1.0}


class AnswerDataConfig(BaseModel):
    """How answer examples are drawn (the ``answer.data`` section of the training YAML)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mix: dict[str, float] = Field(default_factory=lambda: {"oracle": 0.5, "dense": 0.2, "coarse": 0.3},
                                  description="weight per source: oracle, dense, coarse, tile, locate")
    early_mix: dict[str, float] | None = Field(None, description="source weights of the first early_examples")
    early_examples: int = Field(0, ge=0, description="examples drawn from early_mix before mix takes over")
    fine_mix: dict[str, float] = Field(default_factory=lambda: {"read": 0.7, "mcq": 0.3},
                                       description="ZoomWorld fine families of oracle and tile examples")
    alphabet: str | None = Field(None, description="tag characters; None: the phase-1 alphabet (warmup.crops)")
    size_range: tuple[int, int] = Field((1024, 1792), description="ZoomWorld canvas side range (px); small = cheap")
    margin: tuple[float, float] = Field((0.5, 2.0), description="oracle context per side, in panel sizes")
    zoom: tuple[float, float] = Field((2.0, 4.0), description="oracle enlargement of the tag over its native size")
    oracle_tokens: tuple[int, int] = Field((64, 256), description="range of the token cap of oracle crops")
    coarse_tokens: tuple[int, int] = Field((64, 256), description="range of the token cap of whole coarse scenes")
    dense_max_tags: int = Field(3, ge=1, description="most tags in a 224 px dense crop (fewer in smaller ones)")
    dense_sizes: tuple[int, int] = Field((16, 40), description="glyph height range (px) of dense crops")
    tile_scale: tuple[float, float] = Field((0.45, 1.0), description="tile resize factor range (1 = native)")
    tile_side_tokens: tuple[int, int] = Field((4, 16), description="tile side range in 28 px tokens after resizing")
    tile_size_range: tuple[int, int] = Field((1024, 2048), description="ZoomWorld canvas side range of tiles (px)")
    tile_fine_mix: dict[str, float] = Field(default_factory=lambda: {"read": 0.6, "mcq": 0.2, "count": 0.2},
                                            description="fine families of tiles (relpos targets span too far)")
    scene_aux: bool = Field(False, description="oracle, coarse and tile views carry per-token probe targets too")
    min_glyph_px: float = Field(10.0, gt=0, description="smallest glyph height in a view that gets char labels")
    locate_tokens: tuple[int, int] = Field((256, 1024), description="range of the token cap of locate scenes")
    locate_size_range: tuple[int, int] = Field((1024, 4096), description="canvas side range of locate scenes (px)")

    @field_validator("mix", "early_mix")
    @classmethod
    def _check_mix(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        return value if value is None else check_weights(value, SOURCES, "mix")

    @field_validator("fine_mix", "tile_fine_mix")
    @classmethod
    def _check_fine_mix(cls, value: dict[str, float]) -> dict[str, float]:
        return check_weights(value, FINE_FAMILIES, "fine_mix")

    @field_validator("oracle_tokens", "coarse_tokens", "tile_side_tokens", "tile_scale", "tile_size_range",
                     "dense_sizes", "margin", "zoom", "size_range", "locate_tokens", "locate_size_range")
    @classmethod
    def _check_range(cls, value: tuple) -> tuple:
        return check_range(value)


def check_weights(value: dict[str, float], names: tuple[str, ...], what: str) -> dict[str, float]:
    """``value`` unless it names something outside ``names``, has a negative weight or sums to 0 (ValueError)."""
    if set(value) - set(names) or any(w < 0 for w in value.values()) or sum(value.values()) <= 0:
        raise ValueError(f"{what} needs non-negative weights over {names} with a positive sum, got {value}")
    return value


def check_range(value: tuple) -> tuple:
    """``value`` unless it is not a ``(low, high)`` range with ``0 < low <= high`` (ValueError)."""
    if not 0 < value[0] <= value[1]:
        raise ValueError(f"a range needs 0 < low <= high, got {value}")
    return value


@dataclass
class AnswerExample:
    """One training or evaluation example before encoding.

    Attributes:
        image: RGB image the model sees (resized again to ``budget`` by the adapter).
        question: the question text.
        answer: the reference answer.
        budget: (min_tokens, max_tokens) for ``adapter.prepare_image``.
        source: "oracle", "dense", "coarse", "tile" or "locate" (no answer supervised).
        dense: the dense crop (per-token targets) for ``dense`` examples, else None.
        view: for scene examples with ``scene_aux``: the scene, the source window the image shows, and the
            smallest labelled glyph height; per-token targets follow once the encoded grid is known.
        focus: (window, box): the source window the image shows and the box that answers the question, in the
            same pixels; the focus loss (`focus`) marks the tokens the box touches.
    """

    image: Image.Image
    question: str
    answer: str
    budget: tuple[int, int]
    source: str
    dense: DenseCrop | None = None
    view: tuple[ZoomWorldSample, Window, float] | None = None
    focus: tuple[Window, Window] | None = None


def _view(cfg: AnswerDataConfig, s: ZoomWorldSample, window: Window) -> tuple[ZoomWorldSample, Window, float] | None:
    return (s, window, cfg.min_glyph_px) if cfg.scene_aux else None


def _oracle(rng: random.Random, cfg: AnswerDataConfig, alphabet: str, seed: int) -> AnswerExample:
    s = generate(rng.choice(VARIANTS), seed, alphabet=alphabet, mix=cfg.fine_mix, size_range=cfg.size_range)
    margins = tuple(rng.uniform(*cfg.margin) for _ in range(4))
    image = zoom_crop(s.image, tuple(s.target_box), margins, rng.uniform(*cfg.zoom))
    window = zoom_window(s.image.size, tuple(s.target_box), margins)
    return AnswerExample(image, s.question, s.answer, (4, rng.randint(*cfg.oracle_tokens)), "oracle",
                         view=_view(cfg, s, window), focus=(window, tuple(s.target_box)))


def tile_window(rng: random.Random, size: tuple[int, int], box: tuple[int, int, int, int],
                side: tuple[int, int]) -> tuple[int, int, int, int]:
    """A ``side``-sized window (clipped to the image ``size``) placed at random so that it holds ``box`` whole
    whenever it is large enough to."""
    out = []
    for axis in (0, 1):
        extent, lo, hi = size[axis], box[axis], box[axis + 2]
        length = min(side[axis], extent)
        first = max(0, min(hi - length, extent - length))  # leftmost start that still holds the box's far edge
        last = min(lo, extent - length)  # rightmost start that still holds its near edge
        out.append(rng.randint(first, last) if first <= last else max(0, min(lo, extent - length)))
        out.append(length)
    x, w, y, h = out
    return x, y, x + w, y + h


def _tile(rng: random.Random, cfg: AnswerDataConfig, alphabet: str, seed: int) -> AnswerExample:
    s = generate(rng.choice(VARIANTS), seed, alphabet=alphabet, mix=cfg.tile_fine_mix,
                 size_range=cfg.tile_size_range)
    scale = rng.uniform(*cfg.tile_scale)
    side = tuple(round(rng.randint(*cfg.tile_side_tokens) * 28 / scale) for _ in range(2))
    window = tile_window(rng, s.image.size, tuple(s.target_box), side)
    crop = s.image.crop(window)
    image = resize_to(crop, (max(1, round(crop.width * scale)), max(1, round(crop.height * scale))))
    cap = max(4, -(-image.width // 28) * -(-image.height // 28))
    return AnswerExample(image, s.question, s.answer, (4, cap), "tile", view=_view(cfg, s, window),
                         focus=(window, tuple(s.target_box)))


def _whole_scene(rng: random.Random, cfg: AnswerDataConfig, alphabet: str, seed: int, source: str,
                 mix: dict[str, float], size_range: tuple[int, int], tokens: tuple[int, int],
                 probe_targets: bool) -> AnswerExample:
    """A whole scene under a token cap drawn from ``tokens``, its focus on the question's target; with
    ``probe_targets`` it carries ``scene_aux`` targets too."""
    s = generate(rng.choice(VARIANTS), seed, alphabet=alphabet, mix=mix, size_range=size_range)
    cap = rng.randint(*tokens)
    whole = (0, 0, *s.image.size)
    view = _view(cfg, s, whole) if probe_targets else None
    return AnswerExample(s.image, s.question, s.answer, (min(tokens[0], cap), cap), source, view=view,
                         focus=(whole, tuple(s.target_box)))


def _coarse(rng: random.Random, cfg: AnswerDataConfig, alphabet: str, seed: int) -> AnswerExample:
    return _whole_scene(rng, cfg, alphabet, seed, "coarse", _COARSE_MIX, cfg.size_range, cfg.coarse_tokens,
                        probe_targets=True)


def _locate(rng: random.Random, cfg: AnswerDataConfig, alphabet: str, seed: int) -> AnswerExample:
    return _whole_scene(rng, cfg, alphabet, seed, "locate", cfg.fine_mix, cfg.locate_size_range, cfg.locate_tokens,
                        probe_targets=False)


DENSE_EVAL_OFFSET = 5 * 10**8  # held-out dense questions use the crop eval range from here (phase 1 uses below)


def dense_example(rng: random.Random, cfg: AnswerDataConfig, alphabet: str, index: int,
                  split: str = "train") -> AnswerExample:
    """A dense crop (1-3 free-placed tags) asked about a tag of a colour unique in it; ``split`` "train" draws
    from the training crop range, "eval" from a held-out part of the crop eval range."""
    crop_cfg = DenseCropConfig(alphabet=alphabet, max_tags=cfg.dense_max_tags, size_end=cfg.dense_sizes)
    offset, crop_split = (0, "train") if split == "train" else (DENSE_EVAL_OFFSET, "eval")
    for attempt in range(_DENSE_TRIES):
        # the dense-crop ranges are separate from ZoomWorld's seeds; 16 slots per example keep indices apart
        crop = render_dense_crop(crop_seed(crop_split, offset + index * _DENSE_TRIES + attempt), 1.0, crop_cfg)
        colours = [t.colour for t in crop.tags]
        unique = [t for t in crop.tags if colours.count(t.colour) == 1]
        if unique:
            tag = rng.choice(unique)
            n = crop.grid[0] * crop.grid[1]  # min == max == native token count: the crop is encoded unresized
            return AnswerExample(crop.image, f"What is written on the {tag.colour} tag?", tag.text, (n, n), "dense",
                                 crop, focus=((0, 0, *crop.image.size), tuple(tag.box)))
    raise RuntimeError(f"no dense crop with a uniquely coloured tag for example {index}")


def make_example(cfg: AnswerDataConfig, alphabet: str, index: int, split: str = "train") -> AnswerExample:
    """Example ``index`` of ``split``: a pure function of its arguments.

    Args:
        cfg: data settings.
        alphabet: tag characters (e.g. "0123456789").
        index: example index; ZoomWorld scenes use ``seed_for(split, index)``, so train never meets val.
        split: a ZoomWorld split ("train" for training).
    """
    rng = random.Random(f"answer/{split}/{index}")
    # A curriculum: small dense crops first teach the LM to read the visual tokens at all, then the full mix.
    mix = cfg.early_mix if cfg.early_mix is not None and index < cfg.early_examples and split == "train" else cfg.mix
    source = rng.choices(SOURCES, weights=[mix.get(s, 0.0) for s in SOURCES])[0]
    if source == "dense":
        if split != "train":
            raise ValueError("dense examples are drawn from the training crop range only")
        return dense_example(rng, cfg, alphabet, index)
    make = {"oracle": _oracle, "coarse": _coarse, "tile": _tile, "locate": _locate}[source]
    return make(rng, cfg, alphabet, seed_for(split, index))


@dataclass
class EncodedExample:
    """An example as token ids and pixels.

    Attributes:
        input_ids: (L,) prompt (as ``adapter.build_prompt`` makes it) + answer + ``<|im_end|>`` (the prompt alone
            for ``locate`` examples).
        labels: (L,) -100 on the prompt, the token ids on the answer and ``<|im_end|>``.
        image: the encoded image.
        dense: per-token targets (dense examples, and scene views with ``scene_aux``), raster order,
            ``image.n_tokens`` long.
        prompt_len: length of the prompt part.
        focus: (image.n_tokens,) bool, the tokens the example's target box touches, raster order; None without
            a target.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    image: ImageInputs
    dense: DenseTargets | None
    prompt_len: int
    focus: torch.Tensor | None = None


def encode_example(adapter: BackboneAdapter, ex: AnswerExample) -> EncodedExample:
    """Tokenise ``ex`` exactly as inference prompts are built, then append the supervised answer."""
    image = adapter.prepare_image(ex.image, min_tokens=ex.budget[0], max_tokens=ex.budget[1])
    prompt = adapter.build_prompt(image, ex.question)
    # a locate example asks where, not what: its glyphs are unreadable at its budget, so no answer is taught
    answer = [] if ex.source == "locate" else adapter.tokenizer(ex.answer + END_TOKEN, add_special_tokens=False)[
        "input_ids"]
    ids = torch.cat([prompt.input_ids[0].cpu(), torch.tensor(answer, dtype=torch.long)])
    labels = ids.clone()
    labels[: prompt.input_ids.shape[1]] = IGNORE
    dense = None
    if ex.dense is not None:
        if image.grid != ex.dense.grid:
            raise RuntimeError(f"dense crop of grid {ex.dense.grid} was encoded at grid {image.grid}")
        dense = crop_targets(ex.dense).to_torch()
    elif ex.view is not None:
        sample, window, min_glyph_px = ex.view
        dense = scene_targets(sample, window, image.grid, min_glyph_px).to_torch()
    focus = None if ex.focus is None else focus_mask(*ex.focus, image.grid)
    return EncodedExample(ids, labels, image, dense, prompt.input_ids.shape[1], focus)


@dataclass
class AnswerBatch:
    """Right-padded examples for one stock HF forward.

    Attributes:
        inputs: ``input_ids`` (B, L), ``attention_mask`` (B, L), ``mm_token_type_ids`` (B, L), ``pixel_values``
            (P, C) and ``image_grid_thw`` (B, 3).
        labels: (B, L) with -100 on prompts and padding.
        n_tokens: (B,) visual tokens per image, the order of the vision tower's output.
        dense: per-token targets of the examples that have them, concatenated, with ``dense_rows`` their indices.
        sources: source name per example.
        focus: per example, (n_tokens,) bool target tokens or None (see `EncodedExample`); None when no
            example has one.
        prompt_lens: per example, the prompt length (its first answer token's position), with ``focus``.
    """

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    n_tokens: list[int]
    dense: DenseTargets | None
    dense_rows: list[int]
    sources: list[str]
    focus: list[torch.Tensor | None] | None = None
    prompt_lens: list[int] | None = None

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])


def padded_inputs(adapter: BackboneAdapter, sequences: list[tuple[torch.Tensor, torch.Tensor]],
                  images: list[ImageInputs]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Right-pad ``(input_ids, labels)`` pairs (each (L_i,)) with the pad token into stock-HF inputs over ``images``
    (all of them, in sequence order); padding is masked out and never supervised.

    Returns:
        ``(inputs, labels)``: ``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ``pixel_values`` and
        ``image_grid_thw``; labels (B, L) with -100 on padding.
    """
    length = max(ids.shape[0] for ids, _ in sequences)
    ids = torch.full((len(sequences), length), adapter.tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    for i, (seq, lab) in enumerate(sequences):
        n = seq.shape[0]
        ids[i, :n], labels[i, :n], mask[i, :n] = seq, lab, 1
    inputs = adapter.hf_inputs(ids, images)
    inputs["attention_mask"] = mask
    return inputs, labels


def collate(adapter: BackboneAdapter, encoded: list[EncodedExample], sources: list[str]) -> AnswerBatch:
    """Right-pad ``encoded`` with the pad token into one batch (padding is masked out and never supervised)."""
    inputs, labels = padded_inputs(adapter, [(e.input_ids, e.labels) for e in encoded], [e.image for e in encoded])
    rows = [i for i, e in enumerate(encoded) if e.dense is not None]
    dense = None
    if rows:
        dense = DenseTargets.cat([encoded[i].dense for i in rows])
    focus = [e.focus for e in encoded]
    return AnswerBatch(inputs, labels, [e.image.n_tokens for e in encoded], dense, rows, sources,
                       focus if any(f is not None for f in focus) else None, [e.prompt_len for e in encoded])


def make_batch(adapter: BackboneAdapter, cfg: AnswerDataConfig, alphabet: str, start: int, size: int) -> AnswerBatch:
    """Training examples ``start .. start + size - 1``, encoded and collated."""
    examples = [make_example(cfg, alphabet, start + i) for i in range(size)]
    return collate(adapter, [encode_example(adapter, ex) for ex in examples], [ex.source for ex in examples])
