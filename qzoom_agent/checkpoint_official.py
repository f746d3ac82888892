"""Released checkpoints: Q-Zoom's (Qwen2.5-VL, Qwen3-VL) and SD-RPN's (LLaVA-1.5) full-model directories.

Layout: ``config.json`` with the Q-Zoom keys at the top or in ``text_config`` (Qwen3-VL), and ``model.safetensors``
or shards with ``model.safetensors.index.json``; the heads lie under ``model.`` (the old layout, and SD-RPN's) or
``model.language_model.``. Only the head tensors are read, from the shards that hold them.

Settings follow the released code, including its defaults when a key is absent:

* the box rule is the family's released one (``roi_mode: official``);
* gate threshold ``high_res_thresh``, else 0.1; RoI threshold ``roi_conf_thresh``, else 0.1 (0.15 for SD-RPN's
  LLaVA module); ``reuse_src_pos``, else False (LLaVA: always contiguous positions); ``roi_multi_head``, else
  False; SD-RPN's ``twig_norm`` when its weight is there (``roi_super_type: v1``), and no rotary embedding in the
  LLaVA twig's q/k;
* the view budget is the task's, not the training ``min_pixels``/``max_pixels`` (a stage-3 checkpoint was trained
  at exactly 576 tokens): QZoomConfig's 256-576 tokens (the document setting) unless a preset or override says
  otherwise (:mod:`qzoom_agent.presets`);
* a checkpoint without a trained gate (stages 1-2, SD-RPN) gets no gate: mode ``auto`` runs the twig on every
  question, as the released code does.

Any head tensor the heads do not use is reported, never skipped silently.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .backbones.base import BackboneAdapter
from .config import QZoomConfig
from .head_io import SAFETENSORS_META, atomic_write, load_into, read_json, savable, write_json
from .heads import QZoomHeads

logger = logging.getLogger(__name__)

OFFICIAL_CONFIG = "config.json"
OFFICIAL_WEIGHTS = "model.safetensors"
OFFICIAL_INDEX = "model.safetensors.index.json"
HEAD_MODULES = ("twig_layers", "high_res_layers", "high_res_head", "twig_norm")
GATE_MODULES = ("high_res_layers", "high_res_head")
_HEAD_LIKE = ("twig", "high_res", "roi_")  # names of released head modules start so: an unknown one is reported
_PREFIXES = {"old": "model.", "language_model": "model.language_model."}
QWEN_ROI_THRESHOLD, LLAVA_ROI_THRESHOLD = 0.1, 0.15  # the released modules' roi_conf_thresh


def official_keys(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The dict holding the Q-Zoom keys: the top level, else ``text_config`` (Qwen3-VL); None if neither."""
    text = cfg.get("text_config")
    return cfg if "twig_K" in cfg else text if isinstance(text, dict) and "twig_K" in text else None


def _weight_files(root: Path) -> dict[str, Path]:
    """Every weight key of an official checkpoint and its file (from the index when sharded)."""
    if (root / OFFICIAL_INDEX).is_file():
        weight_map = read_json(root / OFFICIAL_INDEX, "safetensors index").get("weight_map", {})
        return {key: root / name for key, name in weight_map.items()}
    single = root / OFFICIAL_WEIGHTS
    if not single.is_file():
        raise FileNotFoundError(f"no {OFFICIAL_WEIGHTS} or {OFFICIAL_INDEX} in {root}")
    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def head_key(key: str) -> str | None:
    """``model[.language_model].twig_layers.0...`` -> ``twig_layers.0...``; None for other keys."""
    parts = key.split(".")
    return next((".".join(parts[i:]) for i, p in enumerate(parts) if p in HEAD_MODULES), None)


def _head_like(key: str) -> bool:
    """A key of some head module this library does not know (``model.roi_proj.weight``, ...)."""
    return head_key(key) is None and any(p.startswith(_HEAD_LIKE) for p in key.split(".")[:-1])


def is_official_checkpoint(path: str | Path) -> bool:
    """True if ``path`` is a full-model directory with Q-Zoom config keys or head weights."""
    root = Path(path)
    try:
        if official_keys(read_json(root / OFFICIAL_CONFIG, "model config")) is not None:
            return True
        return any(head_key(k) is not None for k in _weight_files(root))
    except (OSError, ValueError):
        return False


def official_config(keys: dict[str, Any], family: str, *, twig_norm: bool, gate: bool) -> QZoomConfig:
    """The QZoomConfig a released checkpoint's keys mean, with the released defaults for absent keys."""
    llava = family == "llava"
    default_roi = LLAVA_ROI_THRESHOLD if llava else QWEN_ROI_THRESHOLD
    return QZoomConfig(
        twig_K=int(keys["twig_K"]), twig_T=int(keys["twig_T"]), roi_mode="official", gate=gate,
        gate_threshold=float(keys.get("high_res_thresh", 0.1)),
        roi_threshold=float(keys.get("roi_conf_thresh", default_roi)),
        reuse_src_pos=False if llava else bool(keys.get("reuse_src_pos", False)),
        roi_multi_head=bool(keys.get("roi_multi_head", False)), twig_norm=twig_norm, twig_rope=not llava,
    )


def _gate_settings(root: Path, keys: dict[str, Any], found: dict[str, Any]) -> bool:
    """Whether the checkpoint holds a trained gate; raises when it branches elsewhere than the twig."""
    weights = any(hk.startswith(GATE_MODULES) for hk in found)
    enabled = bool(keys.get("enable_high_res", weights))
    K, T = int(keys["twig_K"]), int(keys["twig_T"])
    if enabled and (int(keys.get("high_res_K", K)), int(keys.get("high_res_T", T))) != (K, T):
        raise ValueError(f"the gate branches at high_res_K={keys.get('high_res_K', K)}, high_res_T="
                         f"{keys.get('high_res_T', T)} but the twig at twig_K={K}, twig_T={T}; these heads share one "
                         "branch point, so both must match")
    if enabled and not weights:
        logger.warning("%s says enable_high_res but holds no gate weights; it runs without a gate", root)
    return enabled and weights


def _report_unused(root: Path, found: dict[str, Any], files: dict[str, Path], gate: bool,
                   twig_norm: bool) -> dict[str, Any]:
    """Drop the head tensors the heads will not use, and say which; returns the ones kept."""
    unused = sorted(k for k in files if _head_like(k))
    keep = {}
    for hk, where in found.items():
        if (hk.startswith(GATE_MODULES) and not gate) or (hk.startswith("twig_norm.") and not twig_norm):
            unused.append(where[0])
        else:
            keep[hk] = where
    if unused:
        logger.warning("%s: %d head tensor(s) not used: %s%s", root, len(unused), ", ".join(unused[:4]),
                       ", ..." if len(unused) > 4 else "")
    return keep


def load_official(path: str | Path, adapter: BackboneAdapter) -> tuple[QZoomHeads, QZoomConfig]:
    """Load the heads of a released Q-Zoom or SD-RPN checkpoint onto a backbone; returns ``(heads, config)``.

    Args:
        path: the checkpoint directory.
        adapter: the backbone the heads attach to; they take its dtype and device.

    Raises:
        FileNotFoundError: config or weights missing.
        ValueError: no Q-Zoom keys, a gate branching elsewhere than the twig, or weights that do not fit.
    """
    root = Path(path)
    keys = official_keys(read_json(root / OFFICIAL_CONFIG, "model config"))
    if keys is None or not keys.get("enable_twig", True) or "twig_T" not in keys:
        raise ValueError(f"{root / OFFICIAL_CONFIG} has no Q-Zoom twig (twig_K, twig_T, enable_twig): not a Q-Zoom "
                         "checkpoint")
    files = _weight_files(root)
    found = {hk: (k, f) for k, f in files.items() if (hk := head_key(k)) is not None}
    gate = _gate_settings(root, keys, found)
    norm = any(hk.startswith("twig_norm.") for hk in found) and keys.get("roi_super_type", "v1") == "v1"
    config = official_config(keys, adapter.family, twig_norm=norm, gate=gate)
    config.check_backbone(adapter.num_layers, adapter.min_branch_layer)
    if not gate:
        logger.info("%s has no trained gate: mode 'auto' runs the twig on every question", root)
    found = _report_unused(root, found, files, gate, norm)

    state: dict[str, torch.Tensor] = {}
    for file in {file for _, file in found.values()}:  # only the shards that hold head keys are opened
        if not file.is_file():
            raise FileNotFoundError(f"weight shard not found: {file}")
        with safe_open(str(file), framework="pt") as f:
            present = set(f.keys())  # a key the index maps here but the file lacks is reported as missing
            state.update({hk: f.get_tensor(key) for hk, (key, kf) in found.items() if kf == file and key in present})
    heads = QZoomHeads.from_base(adapter, config.twig_K, config.twig_T, gate=gate, twig_norm=norm)
    load_into(heads, state, root)
    return heads.to(device=adapter.device, dtype=adapter.dtype), config


def write_official_checkpoint(
    model: nn.Module, heads: QZoomHeads, config: QZoomConfig, out_dir: str | Path, *,
    layout: Literal["old", "language_model"] = "language_model", shards: int = 1, px_per_token: int = 28,
    extra_keys: dict[str, Any] | None = None,
) -> Path:
    """Write a full-model checkpoint in the released format; returns the directory.

    For tests (synthetic checkpoints from tiny models) and for converting our heads. ``config.json`` is
    ``model.config.to_dict()`` plus the Q-Zoom keys the released training script writes (gate keys only when the
    heads have a gate); ``extra_keys`` are added last (``None`` values remove a key). The weights are the model's
    own state dict (``model.language_model.*``, ``model.visual.*``, ``lm_head.*`` as transformers 5 names them;
    the old layout renames the first two to ``model.*`` and ``visual.*``) plus the heads under ``model.`` (old
    layout) or ``model.language_model.``.

    Args:
        model: the Hugging Face VLM the heads belong to.
        heads: the heads to write.
        config: their settings (K, T, gate threshold, position mode, token budgets).
        out_dir: the directory, created if needed.
        layout: ``"old"`` or ``"language_model"`` key layout.
        shards: number of weight files; above 1 an index is written and the head weights go in the last shard.
        px_per_token: resized pixels per visual token side, to turn token budgets into pixel budgets.
        extra_keys: config keys to add or (``None``) remove, e.g. SD-RPN's ``roi_super_type``.
    """
    if layout not in _PREFIXES or shards < 1:
        raise ValueError(f"need layout 'old' or 'language_model' and shards >= 1, got {layout!r}, {shards}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    K, T, px2 = config.twig_K, config.twig_T, px_per_token**2
    cfg.update(enable_twig=True, twig_K=K, twig_T=T, roi_source="qk", roi_loss="bce",
               roi_multi_head=config.roi_multi_head, reuse_src_pos=bool(config.reuse_src_pos),
               min_pixels=config.min_tokens * px2, max_pixels=config.max_tokens * px2)
    if heads.has_gate:
        cfg.update(enable_high_res=True, high_res_K=K, high_res_T=T, high_res_thresh=config.gate_threshold)
    for key, value in (extra_keys or {}).items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    write_json(out / OFFICIAL_CONFIG, cfg)
    base = savable(model.state_dict())
    if layout == "old":
        rename = (("model.language_model.", "model."), ("model.visual.", "visual."))
        base = {next((new + k[len(old) :] for old, new in rename if k.startswith(old)), k): v for k, v in base.items()}
    head = {_PREFIXES[layout] + k: v for k, v in savable(heads.state_dict()).items()}
    if shards == 1:
        atomic_write(out / OFFICIAL_WEIGHTS, lambda tmp: save_file({**base, **head}, tmp, metadata=SAFETENSORS_META))
        return out
    keys, per = list(base), -(-len(base) // (shards - 1))
    groups = [{k: base[k] for k in keys[i * per : (i + 1) * per]} for i in range(shards - 1)] + [head]
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        atomic_write(out / name, lambda tmp, g=group: save_file(g, tmp, metadata=SAFETENSORS_META))
        weight_map.update(dict.fromkeys(group, name))
    total = sum(t.numel() * t.element_size() for t in (*base.values(), *head.values()))
    write_json(out / OFFICIAL_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return out
