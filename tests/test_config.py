"""QZoomConfig validation: clear errors that say how to fix the problem."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from qzoom_agent.config import QZoomConfig


def test_budgets_are_checked():
    with pytest.raises(ValidationError, match="lower min_tokens"):
        QZoomConfig(twig_K=2, twig_T=2, min_tokens=600, max_tokens=576)
    with pytest.raises(ValidationError, match="roi_min_tokens"):
        QZoomConfig(twig_K=2, twig_T=2, roi_min_tokens=900, roi_max_tokens=300)
    cfg = QZoomConfig(twig_K=2, twig_T=2, min_tokens=64, max_tokens=256)
    assert cfg.roi_budget == (64, 256)


def test_unknown_fields_and_bad_values_are_refused():
    with pytest.raises(ValidationError):
        QZoomConfig(twig_K=2, twig_T=2, gate_thresh=0.3)  # a typo must not be silently ignored
    with pytest.raises(ValidationError):
        QZoomConfig(twig_K=2, twig_T=2, roi_threshold=1.5)
    with pytest.raises(ValidationError):
        QZoomConfig(twig_K=0, twig_T=2)


def test_branch_must_fit_the_backbone():
    QZoomConfig(twig_K=18, twig_T=3).check_backbone(28, 1)  # Qwen2.5-VL-7B
    with pytest.raises(ValueError, match="exceeds the 28 decoder layers"):
        QZoomConfig(twig_K=26, twig_T=3).check_backbone(28, 1)
    with pytest.raises(ValueError, match="deepstack"):
        QZoomConfig(twig_K=2, twig_T=3).check_backbone(36, 3)


@pytest.mark.parametrize(("layers", "floor", "expected"), [(4, 1, (2, 2)), (5, 2, (2, 3)), (28, 1, (14, 3))])
def test_default_branch_for_a_backbone(layers, floor, expected):
    cfg = QZoomConfig.for_backbone(layers, floor)
    assert (cfg.twig_K, cfg.twig_T) == expected
    cfg.check_backbone(layers, floor)
