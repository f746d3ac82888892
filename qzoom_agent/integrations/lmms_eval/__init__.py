"""The ``qzoom`` model of lmms-eval: ``lmms-eval --model qzoom --model_args pretrained=DIR,preset=auto ...``.

lmms-eval finds it in two ways, both resolving to
:class:`qzoom_agent.integrations.lmms_eval.models.qzoom.QZoomLMM`:

* the Python entry point ``qzoom`` of the group ``lmms_eval.models`` (declared in qzoom-agent's ``pyproject.toml``),
  which points at :func:`manifests`; lmms-eval 0.7 loads every such entry point when ``lmms_eval.models`` is
  imported;
* the deprecated ``LMMS_EVAL_PLUGINS=qzoom_agent.integrations.lmms_eval`` environment variable, which reads
  :mod:`qzoom_agent.integrations.lmms_eval.models`.

This module is imported by every lmms-eval run (through the entry point), whatever model it evaluates, so it stays
light: it imports neither torch nor the model class. :func:`preset_for_task` maps lmms-eval task names to
:mod:`qzoom_agent.presets` for ``preset=auto``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmms_eval.models.registry_v2 import ModelManifest

MODEL_ID = "qzoom"
CLASS_PATH = "qzoom_agent.integrations.lmms_eval.models.qzoom.QZoomLMM"

# lmms-eval task-name prefix -> preset; the released evaluation's tasks (textvqa_val, docvqa_val, infovqa_val,
# chartqa, ocrbench, vstar_bench, mmerealworld_lite, hrbench4k/8k) and their variants (_lite, _test, ...)
TASK_PRESETS: tuple[tuple[str, str], ...] = (
    ("textvqa", "textvqa"),
    ("docvqa", "docvqa"),
    ("infovqa", "infovqa"),
    ("chartqa", "chartqa"),
    ("ocrbench", "ocrbench"),
    ("vstar_bench", "vstar"),
    ("mmerealworld", "mme-realworld"),
    ("mme_realworld", "mme-realworld"),
    ("hrbench", "hrbench"),
)


def preset_for_task(task: str) -> str | None:
    """The :mod:`qzoom_agent.presets` name for an lmms-eval task, or None for a task without one.

    Examples:
        >>> preset_for_task("docvqa_val"), preset_for_task("hrbench8k"), preset_for_task("mmerealworld_lite")
        ('docvqa', 'hrbench', 'mme-realworld')
        >>> preset_for_task("mme") is None
        True
    """
    for prefix, preset in TASK_PRESETS:
        if task.startswith(prefix):
            return preset
    return None


def manifests() -> list[ModelManifest]:
    """The entry point's payload: the ``qzoom`` model as a simple (``doc_to_visual``) lmms-eval model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)]
