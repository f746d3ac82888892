"""Saving and loading Q-Zoom heads: our small adapter format and the released (official) full-model checkpoints.

Adapter: ``qzoom_config.json`` (format, version, base_model, QZoomConfig) + ``qzoom_heads.safetensors`` (heads only).
Official: ``config.json`` (``twig_*``/``high_res_*`` keys at the top or in ``text_config``) + ``model.safetensors``
or shards with ``model.safetensors.index.json``, heads under ``model.`` (old) or ``model.language_model.``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .backbones.base import BackboneAdapter
from .config import QZoomConfig
from .heads import QZoomHeads

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "qzoom_config.json"
ADAPTER_WEIGHTS = "qzoom_heads.safetensors"
ADAPTER_FORMAT = "qzoom-adapter"
ADAPTER_VERSION = 1
OFFICIAL_CONFIG = "config.json"
OFFICIAL_WEIGHTS = "model.safetensors"
OFFICIAL_INDEX = "model.safetensors.index.json"
HEAD_MODULES = ("twig_layers", "high_res_layers", "high_res_head")
_PREFIXES = {"old": "model.", "language_model": "model.language_model."}
_META = {"format": "pt"}


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temp file beside ``path``, then move it over ``path``; never leaves half a file."""
    tmp = str(path.with_name(f".{path.name}.{os.getpid()}-{id(write):x}.tmp"))  # created with the usual mode
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(path: Path, data: dict[str, Any]) -> None:
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:  # a ValueError already; say which file
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def _savable(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies that share no memory (safetensors refuses shared or strided storage)."""
    return {key: value.detach().to("cpu", copy=True).contiguous() for key, value in state.items()}


def _load_into(heads: QZoomHeads, state: dict[str, torch.Tensor], source: Path) -> None:
    """``load_state_dict(strict=True)`` with messages that say what does not match and why."""
    expected = heads.state_dict()
    few = lambda keys: ", ".join(sorted(keys)[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or unexpected:
        parts = [f"missing keys: {few(missing)}"] if missing else []
        parts += [f"unexpected keys: {few(unexpected)}"] if unexpected else []
        raise ValueError(f"head weights in {source} do not match the heads: " + "; ".join(parts))
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"shape mismatch for {key} in {source}: checkpoint {tuple(value.shape)}, heads "
                             f"{tuple(expected[key].shape)}; the heads were trained for another backbone")
    heads.load_state_dict(state, strict=True)


def save_adapter(heads: QZoomHeads, config: QZoomConfig, out_dir: str | Path, *, base_model: str | None = None
                 ) -> Path:
    """Save heads and config as a Q-Zoom adapter directory; returns the directory.

    Each file goes to a temp file in ``out_dir`` and is then moved into place (weights first, config last), so an
    interrupted save leaves an earlier adapter there intact.

    Args:
        heads: the heads; only their own state dict is saved (no base weights).
        config: the Q-Zoom settings saved beside them.
        out_dir: the directory, created if needed.
        base_model: name or path of the base model, for the record.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = _savable(heads.state_dict())
    _atomic_write(out / ADAPTER_WEIGHTS, lambda tmp: save_file(state, tmp, metadata=_META))
    meta = {"format": ADAPTER_FORMAT, "version": ADAPTER_VERSION, "base_model": base_model}
    _write_json(out / ADAPTER_CONFIG, {**meta, "qzoom": config.model_dump()})
    logger.info("saved Q-Zoom adapter (%d tensors) to %s", len(state), out)
    return out


def is_adapter_dir(path: str | Path) -> bool:
    """True if ``path`` is a directory holding a Q-Zoom adapter config."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def load_adapter(path: str | Path, adapter: BackboneAdapter) -> tuple[QZoomHeads, QZoomConfig]:
    """Load heads saved by `save_adapter` onto a backbone (its dtype and device); returns ``(heads, config)``.

    Args:
        path: the adapter directory (or a file inside it).
        adapter: the backbone the heads attach to.

    Raises:
        FileNotFoundError: a file of the adapter is missing.
        ValueError: not an adapter, or its K/T, keys or shapes do not fit the backbone.
    """
    root = Path(path).parent if Path(path).is_file() else Path(path)
    meta = _read_json(root / ADAPTER_CONFIG, "Q-Zoom adapter config")
    if meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{root / ADAPTER_CONFIG} is not a Q-Zoom adapter config (format={meta.get('format')!r})")
    if int(meta.get("version", 0)) > ADAPTER_VERSION:
        raise ValueError(f"adapter version {meta['version']} is newer than this library reads ({ADAPTER_VERSION})")
    weights = root / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"Q-Zoom adapter weights not found: {weights}")
    config = QZoomConfig.model_validate(meta.get("qzoom", {}))
    config.check_backbone(adapter.num_layers, adapter.min_branch_layer)
    heads = QZoomHeads.from_base(adapter, config.twig_K, config.twig_T)
    _load_into(heads, load_file(str(weights), device="cpu"), weights)
    return heads.to(device=adapter.device, dtype=adapter.dtype), config


def _official_keys(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The dict holding the Q-Zoom keys: the top level, else ``text_config`` (Qwen3-VL); None if neither."""
    text = cfg.get("text_config")
    return cfg if "twig_K" in cfg else text if isinstance(text, dict) and "twig_K" in text else None


def _weight_files(root: Path) -> dict[str, Path]:
    """Every weight key of an official checkpoint and its file (from the index when sharded)."""
    if (root / OFFICIAL_INDEX).is_file():
        weight_map = _read_json(root / OFFICIAL_INDEX, "safetensors index").get("weight_map", {})
        return {key: root / name for key, name in weight_map.items()}
    single = root / OFFICIAL_WEIGHTS
    if not single.is_file():
        raise FileNotFoundError(f"no {OFFICIAL_WEIGHTS} or {OFFICIAL_INDEX} in {root}")
    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def _head_key(key: str) -> str | None:
    """``model[.language_model].twig_layers.0...`` -> ``twig_layers.0...``; None for other keys."""
    parts = key.split(".")
    return next((".".join(parts[i:]) for i, p in enumerate(parts) if p in HEAD_MODULES), None)


def is_official_checkpoint(path: str | Path) -> bool:
    """True if ``path`` is a full-model directory with Q-Zoom config keys or head weights."""
    root = Path(path)
    try:
        if _official_keys(_read_json(root / OFFICIAL_CONFIG, "model config")) is not None:
            return True
        return any(_head_key(k) is not None for k in _weight_files(root))
    except (OSError, ValueError):
        return False


def load_official(path: str | Path, adapter: BackboneAdapter) -> tuple[QZoomHeads, QZoomConfig]:
    """Load the heads of a released Q-Zoom checkpoint onto a backbone; returns ``(heads, config)``.

    Only the head tensors are read, from the shards that hold them. Config mapping: ``twig_K``/``twig_T``;
    ``gate_threshold = high_res_thresh`` (default 0.1); ``reuse_src_pos`` (default True); token budgets
    ``min/max_pixels // adapter.px_per_token**2`` (QZoomConfig defaults when absent, min clamped to max). Without
    a trained gate (``enable_high_res`` false or no gate weights) the gate keeps its `QZoomHeads.from_base`
    initialisation and a warning is logged: its zoom decisions are then meaningless.

    Args:
        path: the checkpoint directory.
        adapter: the backbone the heads attach to; they take its dtype and device.

    Raises:
        FileNotFoundError: config or weights missing.
        ValueError: no Q-Zoom keys, a gate branching elsewhere than the twig, or weights that do not fit.
    """
    root = Path(path)
    keys = _official_keys(_read_json(root / OFFICIAL_CONFIG, "model config"))
    if keys is None or not keys.get("enable_twig", True) or "twig_T" not in keys:
        raise ValueError(f"{root / OFFICIAL_CONFIG} has no Q-Zoom twig (twig_K, twig_T, enable_twig): not a Q-Zoom "
                         "checkpoint")
    K, T = int(keys["twig_K"]), int(keys["twig_T"])
    ppt2 = float(adapter.px_per_token) ** 2
    lo_px, hi_px, fields = keys.get("min_pixels"), keys.get("max_pixels"), QZoomConfig.model_fields
    lo = max(1, int(lo_px // ppt2)) if lo_px else fields["min_tokens"].default
    hi = max(1, int(hi_px // ppt2)) if hi_px else fields["max_tokens"].default
    config = QZoomConfig(twig_K=K, twig_T=T, gate_threshold=float(keys.get("high_res_thresh", 0.1)),
                         reuse_src_pos=bool(keys.get("reuse_src_pos", True)), min_tokens=min(lo, hi), max_tokens=hi)
    config.check_backbone(adapter.num_layers, adapter.min_branch_layer)
    found = {hk: (k, f) for k, f in _weight_files(root).items() if (hk := _head_key(k)) is not None}
    gate_weights = any(not hk.startswith("twig_layers.") for hk in found)
    enable_gate = bool(keys.get("enable_high_res", gate_weights))
    if enable_gate and (int(keys.get("high_res_K", K)), int(keys.get("high_res_T", T))) != (K, T):
        raise ValueError(f"the gate branches at high_res_K={keys.get('high_res_K', K)}, high_res_T="
                         f"{keys.get('high_res_T', T)} but the twig at twig_K={K}, twig_T={T}; these heads share one "
                         "branch point, so both must match")
    trained_gate = enable_gate and gate_weights
    if not trained_gate:
        logger.warning("%s has no trained gate (enable_high_res=%s, gate weights: %s); the gate keeps its untrained "
                       "initialisation from the base layers", root, enable_gate, gate_weights)
        found = {hk: v for hk, v in found.items() if hk.startswith("twig_layers.")}

    state: dict[str, torch.Tensor] = {}
    for file in {file for _, file in found.values()}:  # only the shards that hold head keys are opened
        if not file.is_file():
            raise FileNotFoundError(f"weight shard not found: {file}")
        with safe_open(str(file), framework="pt") as f:
            present = set(f.keys())  # a key the index maps here but the file lacks is reported as missing
            state.update({hk: f.get_tensor(key) for hk, (key, kf) in found.items() if kf == file and key in present})
    heads = QZoomHeads.from_base(adapter, K, T)
    if not trained_gate:
        state.update({k: v for k, v in heads.state_dict().items() if not k.startswith("twig_layers.")})
    _load_into(heads, state, root)
    return heads.to(device=adapter.device, dtype=adapter.dtype), config


def write_official_checkpoint(
    model: nn.Module, heads: QZoomHeads, config: QZoomConfig, out_dir: str | Path, *,
    layout: Literal["old", "language_model"] = "language_model", shards: int = 1, px_per_token: int = 28,
) -> Path:
    """Write a full-model checkpoint in the official Q-Zoom format; returns the directory.

    For tests (synthetic checkpoints from tiny models) and for converting our heads. ``config.json`` is
    ``model.config.to_dict()`` plus the official Q-Zoom keys. The weights are the model's own state dict
    (``model.language_model.*``, ``model.visual.*``, ``lm_head.*`` as transformers 5 names them; the old layout
    renames the first two to ``model.*`` and ``visual.*``) plus the heads under ``model.`` (old layout) or
    ``model.language_model.``.

    Args:
        model: the Hugging Face VLM the heads belong to.
        heads: the heads to write.
        config: their settings (K, T, gate threshold, position mode, token budgets).
        out_dir: the directory, created if needed.
        layout: ``"old"`` or ``"language_model"`` key layout.
        shards: number of weight files; above 1 an index is written and the head weights go in the last shard.
        px_per_token: resized pixels per visual token side, to turn token budgets into pixel budgets.
    """
    if layout not in _PREFIXES or shards < 1:
        raise ValueError(f"need layout 'old' or 'language_model' and shards >= 1, got {layout!r}, {shards}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    K, T, px2 = config.twig_K, config.twig_T, px_per_token**2
    cfg.update(enable_twig=True, twig_K=K, twig_T=T, roi_source="qk", roi_loss="bce", roi_multi_head=True,
               enable_high_res=True, high_res_K=K, high_res_T=T, high_res_thresh=config.gate_threshold,
               reuse_src_pos=config.reuse_src_pos, min_pixels=config.min_tokens * px2,
               max_pixels=config.max_tokens * px2)
    _write_json(out / OFFICIAL_CONFIG, cfg)
    base = _savable(model.state_dict())
    if layout == "old":
        rename = (("model.language_model.", "model."), ("model.visual.", "visual."))
        base = {next((new + k[len(old) :] for old, new in rename if k.startswith(old)), k): v for k, v in base.items()}
    head = {_PREFIXES[layout] + k: v for k, v in _savable(heads.state_dict()).items()}
    if shards == 1:
        _atomic_write(out / OFFICIAL_WEIGHTS, lambda tmp: save_file({**base, **head}, tmp, metadata=_META))
        return out
    keys, per = list(base), -(-len(base) // (shards - 1))
    groups = [{k: base[k] for k in keys[i * per : (i + 1) * per]} for i in range(shards - 1)] + [head]
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        _atomic_write(out / name, lambda tmp, g=group: save_file(g, tmp, metadata=_META))
        weight_map.update(dict.fromkeys(group, name))
    total = sum(t.numel() * t.element_size() for t in (*base.values(), *head.values()))
    _write_json(out / OFFICIAL_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return out


def load_heads(path: str | Path, adapter: BackboneAdapter) -> tuple[QZoomHeads, QZoomConfig]:
    """Load heads from a Q-Zoom adapter directory or an official Q-Zoom checkpoint, whichever ``path`` is.

    Raises FileNotFoundError if ``path`` does not exist, ValueError if it is neither format or does not fit.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"no Q-Zoom heads at {root}: the path does not exist")
    if is_adapter_dir(root) or (root.is_file() and root.name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)):
        return load_adapter(root, adapter)
    if is_official_checkpoint(root):
        return load_official(root, adapter)
    raise ValueError(f"{root} is neither a Q-Zoom adapter ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}) nor an official "
                     f"Q-Zoom checkpoint ({OFFICIAL_CONFIG} with twig_K, plus safetensors weights)")
