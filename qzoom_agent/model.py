"""QZoomModel: gated two-pass answering with prefix-cache reuse.

Pass 1 prefills the low-resolution prompt up to layer K and keeps the KV cache of layers < K. The gate reads
the layer-K state of the last prompt token. If it says the low-resolution view suffices, layers K..L-1 continue
on the same state and decoding starts: the only extra cost was the gate. If it fires, the twig scores the
visual tokens, one box is cropped from the original image and encoded, and the RoI block is spliced in behind
the source image. The cache of the unchanged prefix (system + source image) below K is reused; only the new
tail runs through layers < K, then layers K..L-1 run on the whole spliced sequence, and one answer is decoded.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Literal

import torch

from . import boxes as box_lib
from .backbones import BackboneAdapter
from .boxes import Cells
from .config import QZoomConfig
from .engine import DecoderRunner, Sampling
from .heads import QZoomHeads
from .images import load_image
from .loading import load_backbone, resolve_model_path
from .locating import twig_regions
from .perception import Located, PerceptionState, Prefilled
from .policy import PolicyConfig
from .query import question_stem
from .results import Answer, Perception

logger = logging.getLogger(__name__)

Mode = Literal["auto", "never", "always"]
RoiWhen = Literal["auto", "always", "never"]


class QZoomModel:
    """A Hugging Face VLM with Q-Zoom heads.

    Args:
        adapter: the backbone adapter wrapping the loaded HF model.
        heads: trained or freshly initialised Q-Zoom heads, or None for a plain model (``mode="never"`` only).
        config: where the heads branch, thresholds and token budgets.
    """

    def __init__(self, adapter: BackboneAdapter, heads: QZoomHeads | None, config: QZoomConfig) -> None:
        config.check_backbone(adapter.num_layers, adapter.min_branch_layer)
        if heads is not None and (heads.branch_layer != config.twig_K or heads.T != config.twig_T):
            raise ValueError(
                f"heads branch at K={heads.branch_layer} with T={heads.T}, config says K={config.twig_K}, "
                f"T={config.twig_T}"
            )
        self.adapter = adapter
        self.heads = heads.eval() if heads is not None else None
        self.config = config
        self.runner = DecoderRunner(adapter)
        self.policy: PolicyConfig | None = None  # set when a tool-calling policy delta was applied (`policy.py`)
        self.path: Path | None = None  # the base model's directory, when loaded from one

    # ---- loading -----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        base: str | Path = "zoomworld-tiny",
        qzoom: str | Path | bool | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        preset: str | None = None,
        **overrides,
    ) -> QZoomModel:
        """Load a base VLM and, optionally, Q-Zoom heads.

        Args:
            base: a local model directory, ``"zoomworld-tiny"`` for the bundled default, or a tool-calling policy
                (a directory with ``policy.json``, or ``"zoomworld-tiny-tool"``): its base with the policy's delta.
            qzoom: a Q-Zoom adapter directory or an official Q-Zoom checkpoint. None looks for ``qzoom/`` inside
                ``base``, then for heads inside ``base`` itself (an official checkpoint); False loads no heads.
            device: torch device.
            dtype: weight dtype (fp32 on CPU; bf16 on GPU nodes).
            preset: a task's released settings (RoI and gate thresholds, view budget), e.g. ``"hr"`` or
                ``"docvqa"`` (:mod:`qzoom_agent.presets`); applied before ``overrides``.
            **overrides: QZoomConfig fields to override (e.g. ``gate_threshold=0.3``).
        """
        from .checkpoint import load_heads
        from .checkpoint_official import is_official_checkpoint
        from .policy import apply_policy, is_policy, read_policy, resolve_policy_path
        from .presets import get_preset

        policy, delta, policy_path = None, None, None
        if is_policy(base):
            policy_path = resolve_policy_path(base)
            policy, delta = read_policy(policy_path)
            base = policy.base
        path = resolve_model_path(base)
        adapter = load_backbone(path, device=device, dtype=dtype)
        if delta is not None:
            apply_policy(adapter.model, delta, policy_path)
        heads, config = None, None
        if qzoom is None and (path / "qzoom").is_dir():
            qzoom = path / "qzoom"
        elif qzoom is None and is_official_checkpoint(path):  # a released Q-Zoom model carries its heads
            qzoom = path
        if qzoom:
            heads, config = load_heads(qzoom, adapter)
        if config is None:
            config = QZoomConfig.for_backbone(adapter.num_layers, adapter.min_branch_layer)
        if preset is not None:
            overrides = {**get_preset(preset, adapter.family).overrides(), **overrides}
        if overrides:
            config = QZoomConfig.model_validate({**config.model_dump(), **overrides})
        if policy is not None and heads is not None and policy.frozen_below < config.twig_K:
            logger.warning("the policy trained layers below K=%d: the Q-Zoom heads read shifted states",
                           config.twig_K)
        out = cls(adapter, heads, config)
        out.policy, out.path = policy, path
        return out

    def init_heads(self) -> QZoomHeads:
        """Attach heads initialised as copies of base layers K..K+T-1 (the start of stage 1 training)."""
        cfg = self.config
        self.heads = QZoomHeads.from_base(self.adapter, cfg.twig_K, cfg.twig_T, gate=cfg.gate,
                                          twig_norm=cfg.twig_norm).eval()
        return self.heads

    @property
    def reuse_src_pos(self) -> bool:
        """Whether RoI positions are source-aligned: the config's setting, else the family's default."""
        rsp = self.config.reuse_src_pos
        return self.adapter.default_reuse_src_pos if rsp is None else rsp

    # ---- pass 1 ------------------------------------------------------------------------------------------------
    def prefill(self, image, question: str, *, budget: tuple[int, int] | None = None,
                system: str | None = None) -> PerceptionState:
        """Layers 0..K-1 over the low-resolution prompt of ``image`` and ``question``: the shared first step.

        Runs in the caller's grad mode (training code calls it under ``torch.no_grad``; :meth:`perceive` under
        inference mode).

        Args:
            image: a path, bytes or PIL image (loaded safely).
            question: the question.
            budget: (min, max) visual tokens of the global view; defaults to the config's.
            system: a system prompt, or None.
        """
        a = self.adapter
        image = load_image(image)
        budget = budget or (self.config.min_tokens, self.config.max_tokens)
        img_in = a.prepare_image(image, min_tokens=budget[0], max_tokens=budget[1])
        prompt = a.build_prompt(img_in, question, system=system)
        visual = a.encode_image([img_in])
        positions = a.positions(prompt.input_ids, [img_in])
        hidden_k, rotary, mask, cache = self._below_k(prompt.input_ids, positions, visual)
        return PerceptionState(image, question, system, prompt, visual, positions, rotary, mask, cache, hidden_k,
                               budget, layer_tokens=prompt.input_ids.shape[1] * self.config.twig_K)

    def _below_k(self, ids: torch.Tensor, positions: torch.Tensor, visual) -> tuple:
        """Layers 0..K-1 over a whole prompt on a new cache.

        Args:
            ids: (1, S) prompt ids; positions: their position ids (family layout); visual: the image's features.

        Returns:
            ``(hidden_k, rotary, mask, cache)``: (1, S, D) input of layer K, the rotary pair, the causal mask and
            the cache holding layers < K.
        """
        a = self.adapter
        hidden = a.embed(ids, visual)
        rotary = a.rotary(hidden, positions)
        cache = self.runner.new_cache()
        mask = self.runner.causal_mask(hidden, cache)
        hidden_k = self.runner.run(0, self.config.twig_K, hidden, rotary, mask, cache, a.image_mask(ids), visual)
        return hidden_k, rotary, mask, cache

    def _gate(self, fp: PerceptionState) -> float | None:
        """The gate's score, or None for heads without a gate (the twig then runs on every question)."""
        if not self.heads.has_gate:
            return None
        fp.layer_tokens += fp.length * self.heads.T
        return float(torch.sigmoid(self.heads.gate_logit(fp.hidden_k, fp.rotary, fp.mask))[0])

    def _wants_zoom(self, gate: float | None) -> bool:
        """Mode ``auto``: zoom when the gate fires, and always when there is no gate (as the released code)."""
        return gate is None or gate >= self.config.gate_threshold

    def _query_text(self, question: str, roi_query: str | None) -> str | None:
        """The RoI query when it differs from ``question`` (an explicit one, or the stem), else None."""
        if roi_query is not None:
            if not isinstance(roi_query, str) or not roi_query.strip():
                raise ValueError(f"roi_query must be a non-empty string, got {roi_query!r}")
            query = roi_query
        elif self.config.roi_query == "stem":
            query = question_stem(question)
        else:
            return None
        return None if query == question else query

    def _require_heads(self, what: str) -> QZoomHeads:
        if self.heads is None:
            raise ValueError(f"{what} needs Q-Zoom heads; load an adapter (qzoom=...) or use mode='never'")
        return self.heads


    @staticmethod
    def _state(p: Perception | PerceptionState) -> PerceptionState:
        state = p.state if isinstance(p, Perception) else p
        if not isinstance(state, PerceptionState):
            raise ValueError("this Perception holds no prefill (it was copied without its tensors); run perceive "
                             "again")
        return state

    @torch.inference_mode()
    def perceive(
        self,
        image,
        question: str,
        *,
        roi: RoiWhen = "auto",
        budget: tuple[int, int] | None = None,
        roi_query: str | None = None,
        system: str | None = None,
    ) -> Perception:
        """One low-resolution prefill to layer K: the gate score, the RoI logits and the box. No decoding.

        Args:
            image: a path, bytes or PIL image (loaded safely).
            question: the user's question.
            roi: ``"auto"`` runs the twig only when the gate fires (always, for heads without a gate);
                ``"always"`` runs it regardless (a zoom tool that was explicitly called); ``"never"`` skips it.
            budget: (min, max) visual tokens of the global view; defaults to the config's.
            roi_query: the text the twig scores the image for (e.g. a zoom tool's argument); default: the
                question, or its stem when ``config.roi_query == "stem"``. The gate always reads the question.
            system: a system prompt, or None.

        Returns:
            A Perception. Its state is never consumed: `answer(..., perception=p)`, `locate`, `zoom` and `look`
            each work on a fork of it, any number of times.
        """
        self._require_heads("perceive")
        t0 = time.perf_counter()
        query = self._query_text(question, roi_query)
        fp = self.prefill(image, question, budget=budget, system=system)
        gate = self._gate(fp)
        located = None
        if roi == "always" or (roi == "auto" and self._wants_zoom(gate)):
            located = self._locate(fp, query)
        img = fp.prompt.image
        return Perception(
            gate, located.logits if located else None, located.boxes if located else [], img.grid,
            img.resized_size, img.source_size, img.n_tokens, time.perf_counter() - t0, state=fp,
            cells=located.cells if located else [], canvas=img.canvas, roi_query=query,
        )

    @torch.inference_mode()
    def locate(self, p: Perception | PerceptionState, query: str | None = None) -> Located:
        """Where the twig looks in a perceived image: for the question (default), or for any text ``query``.

        A query's own tokens run below layer K on a fork of the cached image prefix (the image is not encoded
        again); the perception is left as it was.

        Args:
            p: a `perceive` result or a `prefill` state.
            query: the text to look for (e.g. ``"the green tag"``), or None for the question.

        Returns:
            The twig's (gh, gw) logits and the boxes (source pixels) and cells they give.
        """
        self._require_heads("locate")
        if query is not None and (not isinstance(query, str) or not query.strip()):
            raise ValueError(f"query must be a non-empty string or None, got {query!r}")
        state = self._state(p)
        if query is None and isinstance(p, Perception) and p.roi_logits is not None and p.roi_query is None:
            return Located(p.roi_logits, list(p.boxes), list(p.cells))
        scratch = dataclasses.replace(state, layer_tokens=0)  # the query pass builds its own cache; count apart
        located = self._locate(scratch, None if query == state.question else query)
        located.layer_tokens = scratch.layer_tokens
        return located

    def _locate(self, fp: PerceptionState, query: str | None) -> Located:
        logits, boxes, cells = twig_regions(self, fp, query)
        return Located(logits, boxes, cells, query)

    @torch.inference_mode()
    def zoom(self, p: Perception | PerceptionState, boxes: box_lib.Box | list[box_lib.Box] | Located | None = None
             ) -> Prefilled:
        """Splice RoI crops behind the source image and finish the prefill, reusing the cached prefix below K.

        Args:
            p: a `perceive` result or a `prefill` state (not modified: the splice works on a fork).
            boxes: the box(es) in source pixels, a `Located`, or None for the twig's box for the question. Boxes
                not from the twig take the token cells they overlap for their positions.

        Returns:
            The prefill of the spliced sequence; a direct one (as :meth:`look`) when there is no box.
        """
        state = self._state(p)
        if boxes is None:
            boxes = self.locate(p)
        if isinstance(boxes, Located):
            boxes, cells = boxes.boxes, boxes.cells
        else:
            boxes = [boxes] if isinstance(boxes, box_lib.Box) else list(boxes)
            img = state.prompt.image
            cells = [box_lib.box_to_cells(b, img.grid, img.resized_size, img.source_size, canvas=img.canvas)
                     for b in boxes]
        if not boxes:
            return self.look(state)
        return self._zoom_prefill(state.fork(self.adapter.text_config), boxes, cells)

    @torch.inference_mode()
    def look(self, p: Perception | PerceptionState) -> Prefilled:
        """Finish the prefill without a zoom: layers K..L-1 continue on the perception's state (a fork)."""
        fp = self._state(p).fork(self.adapter.text_config)
        k, n = self.config.twig_K, self.adapter.num_layers
        hidden = self.runner.run(k, n, fp.hidden_k, fp.rotary, fp.mask, fp.cache)
        return Prefilled(self.runner.logits(hidden[:, -1:]), fp.cache, self.adapter.next_position(fp.positions),
                         layer_tokens=fp.layer_tokens + fp.length * (n - k), length=fp.length)

    @torch.inference_mode()
    def decode(self, pre: Prefilled, max_new_tokens: int = 32, *, stop_strings: tuple[str, ...] = (),
               sampling: Sampling | None = None) -> tuple[str, list[int], int]:
        """Decode an answer from a finished prefill (its cache is extended: decode a `Prefilled` once).

        Returns:
            ``(text, tokens, decode_steps)``; the text without special tokens.
        """
        out = self.runner.decode(pre.logits, pre.cache, pre.next_position, max_new_tokens,
                                 stop_strings=stop_strings, sampling=sampling)
        text = self.adapter.tokenizer.decode(out.tokens, skip_special_tokens=True).strip()
        return text, out.tokens, out.steps

    # ---- answering ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def answer(
        self,
        image,
        question: str,
        *,
        mode: Mode = "auto",
        max_new_tokens: int = 32,
        budget: tuple[int, int] | None = None,
        perception: Perception | None = None,
        roi_query: str | None = None,
        system: str | None = None,
        sampling: Sampling | None = None,
    ) -> Answer:
        """Answer one question about one image, zooming when the gate says so: `prefill`, the gate, `locate`,
        `zoom` or `look`, and `decode`.

        Args:
            image: a path, bytes or PIL image (unused when ``perception`` is given).
            question: the question.
            mode: ``"auto"`` follows the gate (heads without a gate zoom whenever the twig proposes a box, as the
                released code does); ``"never"`` answers from the low-resolution view (the gate does not run);
                ``"always"`` zooms whenever the twig proposes a box.
            max_new_tokens: decoding budget.
            budget: (min, max) visual tokens of the global view; defaults to the config's.
            perception: a `perceive` result for the same question to answer from (reusable: it is not consumed).
            roi_query: as in :meth:`perceive` (unused when ``perception`` already holds the box).
            system: a system prompt, or None (ignored with ``perception``, which holds its own).
            sampling: sampled decoding, or None for greedy.
        """
        if mode not in ("auto", "never", "always"):
            raise ValueError(f"mode must be 'auto', 'never' or 'always', got {mode!r}")
        query = self._query_text(question, roi_query)
        if mode != "never":
            self._require_heads(f"mode={mode!r}")
        t0 = time.perf_counter()
        located = None
        if perception is not None:
            fp, gate = self._state(perception), perception.gate_score
            if fp.question != question:
                raise ValueError(f"the perception was made for {fp.question!r}, not for {question!r}; perceive "
                                 "this question first")
            fp = fp.fork(self.adapter.text_config)  # its own bookkeeping too: the perception's counts stay
            if perception.roi_logits is not None:
                located = Located(perception.roi_logits, list(perception.boxes), list(perception.cells))
        else:
            fp = self.prefill(image, question, budget=budget, system=system)
            gate = None if mode == "never" else self._gate(fp)
        if located is None and (mode == "always" or (mode == "auto" and self._wants_zoom(gate))):
            located = self._locate(fp, query)
        zoom = located is not None and bool(located.boxes) and mode != "never"
        pre = self._zoom_prefill(fp, located.boxes, located.cells) if zoom else self.look(fp)
        text, tokens, steps = self.decode(pre, max_new_tokens, sampling=sampling)
        img = fp.prompt.image
        return Answer(
            text=text,
            zoomed=zoom,
            gate_score=gate,
            bbox=pre.boxes[0] if pre.boxes else None,
            visual_tokens=img.n_tokens + pre.roi_tokens,
            roi_tokens=pre.roi_tokens,
            forward_passes=pre.prefills + steps,
            generated_tokens=len(tokens),
            latency_s=time.perf_counter() - t0,
            image_size=img.source_size,
            grid=img.grid,
            roi_logits=located.logits if located is not None else None,
            boxes=list(pre.boxes),
            cells=list(pre.cells),
            layer_tokens=pre.layer_tokens + steps * self.adapter.num_layers,
        )

    def _zoom_prefill(self, fp: PerceptionState, boxes: list[box_lib.Box], cells: list[Cells]) -> Prefilled:
        """Splice the RoI crops in and re-prefill with prefix-cache reuse.

        Args:
            fp: the first pass; its cache is cut back to the prefix in place (callers pass a fork).
            boxes: the crops, in source pixels (one on Qwen, up to two on LLaVA).
            cells: per box, the token cells it came from (they place source-aligned positions).

        Returns:
            The prefill of the spliced sequence (next-token logits, cache, the first generated token's position
            and the RoIs' visual token count).
        """
        a, cfg, k = self.adapter, self.config, self.config.twig_K
        # The caps apply per image: without its own RoI budget a crop obeys the call's global-view budget.
        explicit = cfg.roi_min_tokens is not None or cfg.roi_max_tokens is not None
        lo, hi = cfg.roi_budget if explicit else fp.budget
        rois = [a.prepare_roi(box_lib.crop(fp.image, box), min_tokens=lo, max_tokens=hi) for box in boxes]
        roi_visual = a.encode_image(rois)
        splice = a.splice_roi(fp.prompt, fp.positions, rois, cells, self.reuse_src_pos)
        p = splice.prefix_len
        length = fp.prompt.input_ids.shape[1]
        for i in range(k):  # keep the prefix (system + source image) below K; drop the old tail
            fp.cache.layers[i].crop(-(length - p))
        tail_ids = splice.input_ids[:, p:]
        tail = a.embed(tail_ids, roi_visual)
        rotary = a.rotary(tail, splice.positions)
        tail_rotary = (rotary[0][:, p:], rotary[1][:, p:])
        tail_mask = self.runner.causal_mask(tail, fp.cache, layer_idx=0)
        tail = self.runner.run(0, k, tail, tail_rotary, tail_mask, fp.cache, a.image_mask(tail_ids), roi_visual)
        hidden = torch.cat([fp.hidden_k[:, :p], tail], 1)
        mask = self.runner.causal_mask(hidden, fp.cache, layer_idx=k)
        hidden = self.runner.run(k, a.num_layers, hidden, rotary, mask, fp.cache)
        n2 = splice.input_ids.shape[1]
        return Prefilled(self.runner.logits(hidden[:, -1:]), fp.cache, a.next_position(splice.positions),
                         list(boxes), list(cells), sum(r.n_tokens for r in rois), prefills=2,
                         layer_tokens=fp.layer_tokens + (n2 - p) * k + n2 * (a.num_layers - k), length=n2)
