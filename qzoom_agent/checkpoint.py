"""Saving and loading Q-Zoom heads: this project's small adapter format, and :func:`load_heads` for either it or a
released checkpoint (:mod:`qzoom_agent.checkpoint_official`).

Adapter: ``qzoom_config.json`` (format, version, base_model, QZoomConfig) + ``qzoom_heads.safetensors`` (heads only).
"""

from __future__ import annotations

import logging
from pathlib import Path

from safetensors.torch import load_file, save_file

from .backbones.base import BackboneAdapter
from .config import QZoomConfig
from .head_io import SAFETENSORS_META, atomic_write, load_into, read_json, savable, write_json
from .heads import QZoomHeads

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "qzoom_config.json"
ADAPTER_WEIGHTS = "qzoom_heads.safetensors"
ADAPTER_FORMAT = "qzoom-adapter"
ADAPTER_VERSION = 1


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
    state = savable(heads.state_dict())
    atomic_write(out / ADAPTER_WEIGHTS, lambda tmp: save_file(state, tmp, metadata=SAFETENSORS_META))
    meta = {"format": ADAPTER_FORMAT, "version": ADAPTER_VERSION, "base_model": base_model}
    write_json(out / ADAPTER_CONFIG, {**meta, "qzoom": config.model_dump()})
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
    meta = read_json(root / ADAPTER_CONFIG, "Q-Zoom adapter config")
    if meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{root / ADAPTER_CONFIG} is not a Q-Zoom adapter config (format={meta.get('format')!r})")
    if int(meta.get("version", 0)) > ADAPTER_VERSION:
        raise ValueError(f"adapter version {meta['version']} is newer than this library reads ({ADAPTER_VERSION})")
    weights = root / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"Q-Zoom adapter weights not found: {weights}")
    config = QZoomConfig.model_validate(meta.get("qzoom", {}))
    config.check_backbone(adapter.num_layers, adapter.min_branch_layer)
    heads = QZoomHeads.from_base(adapter, config.twig_K, config.twig_T, gate=config.gate, twig_norm=config.twig_norm)
    load_into(heads, load_file(str(weights), device="cpu"), weights)
    return heads.to(device=adapter.device, dtype=adapter.dtype), config


def load_heads(path: str | Path, adapter: BackboneAdapter) -> tuple[QZoomHeads, QZoomConfig]:
    """Load heads from a Q-Zoom adapter directory or an official Q-Zoom checkpoint, whichever ``path`` is.

    Raises FileNotFoundError if ``path`` does not exist, ValueError if it is neither format or does not fit.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"no Q-Zoom heads at {root}: the path does not exist")
    if is_adapter_dir(root) or (root.is_file() and root.name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)):
        return load_adapter(root, adapter)
    from .checkpoint_official import is_official_checkpoint, load_official

    if is_official_checkpoint(root):
        return load_official(root, adapter)
    raise ValueError(f"{root} is neither a Q-Zoom adapter ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}) nor an official "
                     "Q-Zoom or SD-RPN checkpoint (config.json with twig_K, plus safetensors weights)")
