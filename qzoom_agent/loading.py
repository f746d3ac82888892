"""Loading a base VLM, its tokenizer and image processor from a local directory, with no hub access."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

from .backbones import BackboneAdapter, adapter_class_for

logger = logging.getLogger(__name__)

BUNDLED_MODELS = {"zoomworld-tiny": Path(__file__).parent / "assets" / "zoomworld-tiny"}
# Written next to a model trained on ZoomWorld: {"alphabet": "..."}, the tag characters it was trained to read.
ZOOMWORLD_META = "zoomworld.json"


def trained_alphabet(path: Path) -> str | None:
    """The ZoomWorld alphabet a model directory was trained on (``zoomworld.json``), or None if not recorded."""
    meta = path / ZOOMWORLD_META
    if not meta.is_file():
        return None
    try:
        alphabet = json.loads(meta.read_text(encoding="utf-8"))["alphabet"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{meta} is unreadable; expected {{\"alphabet\": \"...\"}}") from None
    if not isinstance(alphabet, str) or not alphabet:
        raise ValueError(f"{meta}: 'alphabet' must be a non-empty string")
    return alphabet


def resolve_model_path(name: str | Path) -> Path:
    """A local model directory for ``name``: a bundled model name or a path.

    Raises:
        FileNotFoundError: with a one-line hint when the directory does not exist.
    """
    if str(name) in BUNDLED_MODELS:
        path = BUNDLED_MODELS[str(name)]
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"the bundled model {name!r} is not in this installation; pass --model DIR "
                "(`qzoom-agent make-tiny DIR --family qwen2_5_vl` makes a small random one)"
            )
        return path
    path = Path(name).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path} (models are loaded from local paths only)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; it is not a Hugging Face model directory")
    return path


def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[str, torch.dtype]:
    """The concrete ``(device, dtype)`` of a run: ``auto`` picks CUDA when it is available, else the CPU, and an
    ``auto`` dtype is fp32 on the CPU and bf16 on an accelerator.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ...
        dtype: ``"auto"`` or a torch dtype name such as ``"float32"`` or ``"bfloat16"``.

    Examples:
        >>> resolve_device("cpu")
        ('cpu', torch.float32)
        >>> resolve_device("cpu", "bfloat16")
        ('cpu', torch.bfloat16)
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        return device, torch.float32 if device == "cpu" else torch.bfloat16
    return device, getattr(torch, dtype)


def _image_processor(cls: type[BackboneAdapter], path: Path, config):
    default = cls.default_image_processor(config)
    if (path / "preprocessor_config.json").is_file():
        # The PIL processor class reads the saved settings; this avoids torchvision and AutoProcessor.
        return type(default).from_pretrained(path)
    logger.warning("%s has no preprocessor_config.json; using default image processor settings", path)
    return default


def load_backbone(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load the model, tokenizer and image processor in ``path`` and wrap them in the family's adapter.

    Returns:
        A `BackboneAdapter` around the model in eval mode with sdpa attention.
    """
    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    cls = adapter_class_for(config)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return cls(model, tokenizer, _image_processor(cls, path, config))
