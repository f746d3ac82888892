"""Multi-turn chat over a Q-Zoom model with the conversation's KV cache continued across calls.

A `ChatSession` renders a message list (images in user and tool turns) with the backbone adapter, finds how much of
the new prompt the cache already holds (the longest common prefix of token ids), runs only the new tokens through
the decoder, and decodes. A call whose prompt extends the previous one (the usual tool loop: the policy's turn,
then a tool turn) pays only for its new tokens; an edited history falls back to the longest prefix that is still
the same, so the logits always equal a from-scratch forward on the whole conversation.

The first prefill of an image and question is also the Q-Zoom perception: the input of layer K of that prompt is
kept, so the gate and the twig can read it later (the zoom tool) without running the image again. Each image is
encoded once per session, whatever the number of calls.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from PIL import Image
from transformers import DynamicCache

from .backbones import ImageInputs, Prompt, VisualFeatures
from .engine import Sampling
from .images import load_image
from .perception import Located, PerceptionState, fork_cache
from .results import Perception

if TYPE_CHECKING:
    from .model import QZoomModel

ToolImageBudget = (4, 256)  # (min, max) visual tokens of an image in a tool turn
PerceptionSource = Literal["captured", "rebuilt"]


@dataclass
class CallStats:
    """What one `ChatSession.generate` call cost.

    Attributes:
        prompt_tokens: tokens in the rendered prompt.
        kv_reused: prompt tokens whose keys and values came from the session's cache.
        text_tokens: new text tokens prefilled.
        visual_tokens: new visual tokens prefilled.
        vision_encodes: images run through the vision tower in this call.
        forward_passes: one prefill plus the decode steps.
        generated_tokens: tokens produced (the stopping token included).
        layer_tokens: decoder layer-tokens run (tokens x layers), a hardware-free cost.
        latency_s: wall time of the call.
    """

    prompt_tokens: int = 0
    kv_reused: int = 0
    text_tokens: int = 0
    visual_tokens: int = 0
    vision_encodes: int = 0
    forward_passes: int = 0
    generated_tokens: int = 0
    layer_tokens: int = 0
    latency_s: float = 0.0

    def add(self, other: CallStats) -> CallStats:
        """The sum of two stats (for per-conversation totals)."""
        return CallStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)})

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "latency_s": round(self.latency_s, 4)}


@dataclass
class ChatTurn:
    """One generated turn: ``raw`` (special tokens kept, for tool-call parsing), ``text`` (without them), the ids,
    why decoding stopped, what the call cost, and the (1, V) logits after the prompt (for exactness checks)."""

    raw: str
    text: str
    tokens: list[int]
    reason: str
    stats: CallStats
    logits: torch.Tensor = field(repr=False, default=None)


@dataclass
class _Image:
    source: Image.Image
    inputs: ImageInputs
    key: str  # content fingerprint and budget: equal placeholders of different images must not share a cache
    features: VisualFeatures | None = None


@dataclass
class _Rendered:
    ids: list[int]
    images: list[_Image]
    spans: list[tuple[int, int]]  # per image, its token span in ids
    first_turn_only: bool = False  # the prompt is the first user turn (with an image) and its assistant header
    question: str = ""  # the first user turn's text: what the gate and the twig read


@dataclass
class ChatSession:
    """One conversation with a model: its KV cache, its encoded images and its perception.

    Args:
        model: the Q-Zoom model (heads are needed only for the zoom tool's perception).
        budget: (min, max) visual tokens of images in user turns; the model config's by default.
        tool_budget: (min, max) visual tokens of images in tool turns.
    """

    model: QZoomModel
    budget: tuple[int, int] | None = None
    tool_budget: tuple[int, int] = ToolImageBudget
    ids: list[int] = field(default_factory=list)  # the tokens the cache holds
    cached_images: dict[int, str] = field(default_factory=dict)  # start of each cached image span -> its image key
    cache: DynamicCache | None = None
    images: dict[str, _Image] = field(default_factory=dict)  # by content fingerprint and budget
    state: PerceptionState | None = None
    perception_source: PerceptionSource | None = None
    _perception: Perception | None = None
    _located: Located | None = None
    totals: CallStats = field(default_factory=CallStats)
    external_tool: Any = None  # an external-crop tool bound to this conversation's images, when one is used

    # ---- rendering ---------------------------------------------------------------------------------------------
    def _image(self, payload: Any, budget: tuple[int, int]) -> _Image:
        image = load_image(_payload(payload))
        key = hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest() + f"{image.size}{budget}"
        if key not in self.images:
            inputs = self.model.adapter.prepare_image(image, min_tokens=budget[0], max_tokens=budget[1])
            self.images[key] = _Image(image, inputs, key)
        return self.images[key]

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> _Rendered:
        """Token ids of the conversation (visual placeholders expanded) and its images in order."""
        a = self.model.adapter
        budget = self.budget or (self.model.config.min_tokens, self.model.config.max_tokens)
        images = []
        for m in messages:
            for part in m.get("content") if isinstance(m.get("content"), list) else []:
                if _is_image(part):
                    images.append(self._image(part, self.tool_budget if m.get("role") == "tool" else budget))
        text = a.render_chat(messages, tools)
        ids = a.expand_images(a.tokenizer(text, add_special_tokens=False)["input_ids"], [i.inputs for i in images])
        spans, at = [], 0
        for im in images:
            at = ids.index(a.image_token_id, at)
            spans.append((at, at + im.inputs.n_tokens))
            at += im.inputs.n_tokens
        first = _first_turn(messages)
        question = ""
        if first is not None:
            question = " ".join(p.get("text", "") for p in _parts(first[-1]) if isinstance(p, dict)
                                and not _is_image(p)).strip() or str(first[-1].get("content") or "")
        # the prompt is the first user turn's alone when that turn is the last message and shows an image
        first_turn_only = first is not None and len(first) == len(messages) and bool(images)
        return _Rendered(ids, images, spans, first_turn_only, question)

    # ---- prefill and decoding ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, messages: list[dict], *, tools: list[dict] | None = None, max_new_tokens: int = 128,
                 stop_strings: tuple[str, ...] = (), sampling: Sampling | None = None,
                 on_token: Callable[[int], None] | None = None) -> ChatTurn:
        """The assistant's next turn for ``messages``, continuing the cache where the prompt extends it.

        Args:
            messages: the whole conversation so far (system, user, assistant and tool turns).
            tools: function schemas the chat template lists, or None.
            max_new_tokens: decoding budget.
            stop_strings: texts that end the turn (e.g. ``"</tool_call>"``), besides the end-of-turn ids.
            sampling: sampled decoding, or None for greedy.
            on_token: called with each generated id as it is chosen (streaming).
        """
        t0 = time.perf_counter()
        m, a = self.model, self.model.adapter
        r = self.render(messages, tools)
        if not r.ids:
            raise ValueError("the conversation renders to no tokens; give at least one user message")
        reuse = self._reusable(r)
        stats = CallStats(prompt_tokens=len(r.ids), kv_reused=reuse)
        logits, next_pos = self._prefill(r, reuse, stats)
        out = m.runner.decode(logits, self.cache, next_pos, max_new_tokens, stop_strings=stop_strings,
                              sampling=sampling, on_token=on_token)
        self.ids = r.ids + out.tokens[:-1]  # every token but the last was fed back
        self.cached_images = {start: im.key for im, (start, _) in zip(r.images, r.spans, strict=True)}
        stats.forward_passes = 1 + out.steps
        stats.generated_tokens = len(out.tokens)
        stats.layer_tokens += out.steps * a.num_layers
        stats.latency_s = time.perf_counter() - t0
        self.totals = self.totals.add(stats)
        tok = a.tokenizer
        return ChatTurn(tok.decode(out.tokens, skip_special_tokens=False),
                        tok.decode(out.tokens, skip_special_tokens=True).strip(), out.tokens, out.reason, stats,
                        logits)

    def _reusable(self, r: _Rendered) -> int:
        """Prompt tokens the cache can keep: the common prefix, backed off to the start of any image it cuts, and
        short of the whole prompt (the last token must run to give logits)."""
        n = 0
        limit = min(len(self.ids), len(r.ids) - 1)
        while n < limit and self.ids[n] == r.ids[n]:
            n += 1
        for im, (start, end) in zip(r.images, r.spans, strict=True):
            # the same placeholder ids hold another image's keys and values: cut before it
            if start < n and (n < end or self.cached_images.get(start) != im.key):
                n = start
        return n if self.cache is not None else 0

    def _prefill(self, r: _Rendered, reuse: int, stats: CallStats) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the new tokens ``r.ids[reuse:]`` through every layer on the cache cut back to ``reuse`` tokens."""
        m, a = self.model, self.model.adapter
        k, n_layers = m.config.twig_K, a.num_layers
        if self.cache is None or reuse == 0:
            self.cache = m.runner.new_cache()
        elif reuse < self.cache.get_seq_length():
            self.cache.crop(reuse - self.cache.get_seq_length())
        ids = torch.tensor([r.ids], dtype=torch.long, device=a.device)
        new_images = [im for im, (start, _) in zip(r.images, r.spans, strict=True) if start >= reuse]
        for im in new_images:
            if im.features is None:
                im.features = a.encode_image([im.inputs])
                stats.vision_encodes += 1
        positions = a.positions(ids, [im.inputs for im in r.images])
        tail_ids = ids[:, reuse:]
        visual = VisualFeatures.cat([im.features for im in new_images]) if new_images else None
        hidden = a.embed(tail_ids, visual)
        rotary = a.rotary(hidden, positions)
        tail_rotary = (rotary[0][:, reuse:], rotary[1][:, reuse:])
        mask = m.runner.causal_mask(hidden, self.cache, layer_idx=0)
        vmask = a.image_mask(tail_ids)
        hidden_k = m.runner.run(0, k, hidden, tail_rotary, mask, self.cache, vmask, visual)
        if reuse == 0 and self.state is None and r.first_turn_only:
            self._capture(r, positions, rotary, hidden_k)
        hidden = m.runner.run(k, n_layers, hidden_k, tail_rotary, mask, self.cache, vmask, visual)
        n_new = len(r.ids) - reuse
        n_visual = sum(im.inputs.n_tokens for im in new_images)
        stats.visual_tokens, stats.text_tokens = n_visual, n_new - n_visual
        stats.layer_tokens += n_new * n_layers
        return m.runner.logits(hidden[:, -1:]), a.next_position(positions)

    # ---- perception --------------------------------------------------------------------------------------------
    def _capture(self, r: _Rendered, positions, rotary, hidden_k) -> None:
        """Keep the first prompt's layer-K input as the perception: it is exactly `QZoomModel.prefill`'s."""
        m, im = self.model, r.images[0]
        start, end = r.spans[0]
        ids = torch.tensor([r.ids], dtype=torch.long, device=m.adapter.device)
        prompt = Prompt(ids, start, end, im.inputs)
        below_k = fork_cache(self.cache, m.adapter.text_config, layers=m.config.twig_K)
        mask = m.runner.causal_mask(hidden_k, m.runner.new_cache())
        self.state = PerceptionState(im.source, r.question, None, prompt, im.features, positions, rotary, mask,
                                     below_k, hidden_k, self.budget or (m.config.min_tokens, m.config.max_tokens))
        self.perception_source = "captured"

    def perception(self, messages: list[dict] | None = None, tools: list[dict] | None = None) -> Perception:
        """The perception of the conversation's first image and question, gate score included.

        Captured for free by the first prefill; when the session has none (e.g. a thread resumed after a restart),
        it is rebuilt from ``messages``' first user turn with one prefill below layer K, and
        ``perception_source`` says ``"rebuilt"``.

        Raises:
            ValueError: no cached perception and no first user turn with an image in ``messages``.
        """
        if self._perception is not None:
            return self._perception
        m = self.model
        if self.state is None:
            first = _first_turn(messages or [])
            if first is None or not any(_is_image(p) for p in _parts(first[-1])):
                raise ValueError("no perception to zoom from: the conversation's first user turn has no image")
            self._rebuild(first, tools)
        with torch.inference_mode():
            gate = m._gate(self.state) if m.heads is not None else None
        img = self.state.prompt.image
        self._perception = Perception(gate, None, [], img.grid, img.resized_size, img.source_size, img.n_tokens, 0.0,
                                      state=self.state, canvas=img.canvas)
        return self._perception

    def locate(self, hint: str | None = None) -> Located:
        """The twig's box for the question (cached after the first call) or for ``hint``, on the perception."""
        p = self.perception()
        if hint:
            return self.model.locate(p, hint)
        if self._located is None:
            self._located = self.model.locate(p)
            return self._located
        return dataclasses.replace(self._located, layer_tokens=0)  # already paid for

    @torch.inference_mode()
    def _rebuild(self, first: list[dict], tools: list[dict] | None) -> None:
        m, a = self.model, self.model.adapter
        r = self.render(first, tools)
        im = r.images[0]
        if im.features is None:
            im.features = a.encode_image([im.inputs])
            self.totals.vision_encodes += 1
        ids = torch.tensor([r.ids], dtype=torch.long, device=a.device)
        positions = a.positions(ids, [im.inputs])
        hidden_k, rotary, mask, cache = m._below_k(ids, positions, im.features)
        self.totals.layer_tokens += len(r.ids) * m.config.twig_K
        start, end = r.spans[0]
        self.state = PerceptionState(im.source, r.question, None, Prompt(ids, start, end, im.inputs),
                                     im.features, positions, rotary, mask, cache, hidden_k,
                                     self.budget or (m.config.min_tokens, m.config.max_tokens),
                                     layer_tokens=len(r.ids) * m.config.twig_K)
        self.perception_source = "rebuilt"


def _payload(part: dict) -> Any:
    """The image inside a content part: a PIL image, a path, bytes, or a base64 / data-URL string."""
    value = part.get("image", part.get("image_url", part.get("base64", part.get("url"))))
    if isinstance(value, dict):  # OpenAI style {"image_url": {"url": ...}}
        value = value.get("url")
    if value is None:
        raise ValueError("an image part carries no image; give {'type': 'image', 'image': PIL image or path}")
    return decode_base64(value) if isinstance(value, str) else value


def decode_base64(value: str) -> bytes | str:
    """The bytes of a ``data:`` URL or a bare base64 string, or ``value`` itself (a path) when it is neither.

    Raises:
        ValueError: a ``data:`` URL that is not base64 or does not decode.
    """
    if value.startswith("data:"):
        head, _, body = value.partition(",")
        if ";base64" not in head:
            raise ValueError("a data: URL image must be base64-encoded (data:image/png;base64,...)")
        try:
            return base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError) as err:
            raise ValueError(f"the data: URL holds invalid base64: {err}") from err
    if len(value) > 256 and "/" not in value[:64] and not Path(value[:255]).suffix:
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            pass
    return value


def _is_image(part: Any) -> bool:
    return isinstance(part, dict) and (part.get("type") in ("image", "image_url") or "image" in part)


def _parts(message: dict) -> list:
    content = message.get("content")
    return content if isinstance(content, list) else []


def _first_turn(messages: list[dict]) -> list[dict] | None:
    """The messages up to and including the first user turn, or None without one."""
    for i, m in enumerate(messages):
        if m.get("role") == "user":
            return messages[: i + 1]
    return None
