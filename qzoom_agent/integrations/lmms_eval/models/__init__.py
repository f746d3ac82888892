"""lmms-eval's legacy plugin layout, for ``LMMS_EVAL_PLUGINS=qzoom_agent.integrations.lmms_eval``.

lmms-eval reads ``AVAILABLE_MODELS`` (model name -> class name) from ``<plugin>.models`` and imports the class from
``<plugin>.models.<model name>``. The entry point (:func:`qzoom_agent.integrations.lmms_eval.manifests`) registers
the same class without the environment variable, which lmms-eval 0.7 deprecates.
"""

from __future__ import annotations

AVAILABLE_MODELS: dict[str, str] = {"qzoom": "QZoomLMM"}
