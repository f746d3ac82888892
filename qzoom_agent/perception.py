"""The records the public perception steps pass along: a prefill below layer K, a located region, a ready prefill.

`QZoomModel.prefill` makes a `PerceptionState` (the low-resolution prompt run through layers < K); `locate` turns
it into a `Located` region; `zoom` or `look` finish the prefill into a `Prefilled` that `decode` continues. A state
is never consumed: every step that extends a cache works on a fork of it (:meth:`PerceptionState.fork`), so one
perception can be answered, zoomed and re-zoomed any number of times with the same logits each time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import DynamicCache

from .backbones import Prompt, VisualFeatures
from .boxes import Box, Cells


def fork_cache(cache: DynamicCache, config, upto: int | None = None, layers: int | None = None) -> DynamicCache:
    """A new cache holding the first ``upto`` tokens (default: all) of the first ``layers`` filled layers (default:
    all) of ``cache``.

    DynamicCache layers grow by concatenation and shrink by slicing, so the fork may share the source tensors:
    extending or cropping either cache never writes into the other's.
    """
    out = DynamicCache(config=config)
    for i, layer in enumerate(cache.layers[:layers]):
        if not layer.is_initialized or layer.keys is None or layer.keys.numel() == 0:
            break
        keys, values = layer.keys, layer.values
        if upto is not None:
            keys, values = keys[..., :upto, :], values[..., :upto, :]
        out.update(keys, values, i)
    return out


@dataclass
class PerceptionState:
    """The low-resolution prompt of one image and question, run through decoder layers 0..K-1.

    Attributes:
        image: the original image (loaded).
        question: the question the prompt holds (the gate reads its last token).
        system: the system prompt, or None.
        prompt: the tokenised prompt, (1, S) ids with the image span.
        visual: the global view's visual features.
        positions: position ids of the prompt (family layout).
        rotary: (cos, sin), each (1, S, head_dim).
        mask: the causal mask of the prompt, or None.
        cache: keys and values of layers < K over the S prompt tokens.
        hidden_k: (1, S, D) the input of layer K.
        budget: (min, max) visual tokens of the global view.
        layer_tokens: decoder layer-tokens spent so far (tokens x layers; heads included).
    """

    image: Image.Image
    question: str
    system: str | None
    prompt: Prompt
    visual: VisualFeatures
    positions: torch.Tensor
    rotary: tuple[torch.Tensor, torch.Tensor]
    mask: torch.Tensor | None
    cache: DynamicCache
    hidden_k: torch.Tensor
    budget: tuple[int, int]
    layer_tokens: int = 0

    @property
    def length(self) -> int:
        """S: tokens in the prompt."""
        return int(self.prompt.input_ids.shape[1])

    def fork(self, config) -> PerceptionState:
        """A copy whose cache can be extended or cropped without touching this one (``config``: the text config
        the cache is built for)."""
        out = PerceptionState(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        out.cache = fork_cache(self.cache, config)
        return out


@dataclass
class Located:
    """Where the twig looks for one text.

    Attributes:
        logits: (gh, gw) raw twig scores over the global view's tokens.
        boxes: the zoom boxes in source pixels (empty: nothing stood out; LLaVA's rule may give two).
        cells: per box, the token cells ``(r0, c0, r1, c1)`` it came from (they place source-aligned positions).
        query: the text scored, or None for the question itself.
        layer_tokens: decoder layer-tokens this call spent (a query's own tokens below K, the twig).
    """

    logits: torch.Tensor
    boxes: list[Box]
    cells: list[Cells]
    query: str | None = None
    layer_tokens: int = 0

    @property
    def box(self) -> Box | None:
        return self.boxes[0] if self.boxes else None


@dataclass
class Prefilled:
    """A finished prefill, ready to decode: the whole prompt (spliced or not) through every layer.

    Attributes:
        logits: (1, V) next-token logits after the prompt.
        cache: keys and values of every layer over the prompt.
        next_position: position ids of the first generated token (family layout, length 1).
        boxes: the RoIs spliced in (empty for a direct prefill).
        cells: per box, the source token cells that placed its positions.
        roi_tokens: visual tokens of the spliced RoIs.
        prefills: forward passes so far (the first pass, plus the partial re-prefill when zoomed).
        layer_tokens: decoder layer-tokens so far, the perception's included.
        length: tokens in the (spliced) prompt.
    """

    logits: torch.Tensor
    cache: DynamicCache
    next_position: torch.Tensor
    boxes: list[Box] = field(default_factory=list)
    cells: list[Cells] = field(default_factory=list)
    roi_tokens: int = 0
    prefills: int = 1
    layer_tokens: int = 0
    length: int = 0
