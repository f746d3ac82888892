"""Shipping a trained ``zoomworld-tiny``: the last phase's model as fp16 safetensors, with its tokenizer, image
processor and the ZoomWorld alphabet it reads, into a folder `QZoomModel.from_pretrained` loads.

Usage::

    qzoom-agent train base --phase export --config configs/recipes/zoomworld_tiny/base.yaml --out runs/zw [--to DIR]

``DIR`` defaults to the bundled ``qzoom_agent/assets/zoomworld-tiny``. The folder is written next to ``DIR`` and
swapped in at the end, so an interrupted export keeps the previous model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ...loading import ZOOMWORLD_META, load_backbone

# The latest base phase that wrote a model is shipped. Phase 4 (grounding) is exported only when asked for: its
# DeepEyes policy has not yet earned its place as the bundled model (docs/zoomworld-tiny.md).
PHASE_ORDER = ("phase3", "phase2", "phase1")


def latest_model(run_dir: str | Path, phase: int | None = None) -> Path:
    """``RUN/phaseN/model`` of ``phase``, or of the latest base phase (3, 2, 1) that has one.

    Raises:
        FileNotFoundError: that phase (or no base phase) of ``run_dir`` has written its model yet.
    """
    order = PHASE_ORDER if phase is None else (f"phase{phase}",)
    for name in order:
        path = Path(run_dir) / name / "model"
        if (path / "config.json").is_file():
            return path
    raise FileNotFoundError(f"{run_dir} holds no trained model in {', '.join(order)}; train that phase first")


def export_model(src: str | Path, dst: str | Path, *, alphabet: str, dtype: torch.dtype = torch.float16) -> Path:
    """Write the model in ``src`` to ``dst`` in ``dtype`` with tokenizer, image processor and ``zoomworld.json``.

    Args:
        src: an HF model folder (a phase's ``model/``).
        dst: the destination folder; replaced atomically (a rename) once complete.
        alphabet: the tag characters the model was trained to read.
        dtype: weight dtype on disk (fp16 halves the size; loading upcasts to the requested dtype).

    Returns:
        ``dst``.
    """
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    adapter = load_backbone(src)
    adapter.model.to(dtype).save_pretrained(tmp)
    adapter.tokenizer.save_pretrained(tmp)
    adapter.image_processor.save_pretrained(tmp)
    (tmp / ZOOMWORLD_META).write_text(json.dumps({"alphabet": alphabet, "source": Path(src).parent.name}) + "\n")
    old = dst.with_name(dst.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)
    return dst
