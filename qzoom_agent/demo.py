"""`qzoom-agent demo`: a handful of ZoomWorld test questions, answered at low resolution and with Q-Zoom.

For each question it records the low-resolution answer, the answer from the oracle view (the ground-truth target
cropped and enlarged: what a perfect zoom would show), and, with heads, the gate score, the proposed box and the
gated answer. It draws one PNG panel per question: the image, the ground-truth target box, the proposed box and
the RoI heat map.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .bench.oracle import ORACLE_TOKENS, oracle_view
from .loading import resolve_model_path, trained_alphabet
from .model import QZoomModel
from .zoomworld import DEFAULT_ALPHABET
from .zoomworld import sample as zoomworld_sample

logger = logging.getLogger(__name__)


@dataclass
class DemoRow:
    """One demo question and what the model did with it."""

    index: int
    kind: str
    question: str
    truth: str
    lowres_answer: str
    oracle_answer: str
    gate_score: float | None
    box: list[int] | None
    qzoom_answer: str | None
    zoomed: bool
    target_box: list[int] | None


def load_demo_model(name: str) -> tuple[QZoomModel, bool, str]:
    """The requested model, or a tiny random stand-in when the bundled default is not installed.

    Returns:
        ``(model, trained, alphabet)``; ``trained`` is False for the random stand-in, whose answers are noise;
        ``alphabet`` is the tag alphabet the model was trained on (A-Z0-9 when not recorded).
    """
    try:
        path = resolve_model_path(name)
        return QZoomModel.from_pretrained(path), True, trained_alphabet(path) or DEFAULT_ALPHABET
    except FileNotFoundError:
        if name != "zoomworld-tiny":
            raise
    from .tiny import make_tiny

    logger.info("zoomworld-tiny is not bundled in this installation; using a tiny random model instead")
    path = make_tiny(Path(tempfile.mkdtemp(prefix="qzoom-demo-")) / "tiny", "qwen2_5_vl")
    return QZoomModel.from_pretrained(path), False, DEFAULT_ALPHABET


def run_demo(model: QZoomModel, n: int = 4, *, variant: str = "hr", start: int = 0,
             alphabet: str = DEFAULT_ALPHABET) -> tuple[list[DemoRow], list]:
    """Answer ``n`` ZoomWorld test questions (tags drawn from ``alphabet``) with ``model``.

    Returns:
        ``(rows, panels)``: one `DemoRow` per question, and ``(image, row, roi_probs)`` for plotting, where
        ``roi_probs`` is the (gh, gw) sigmoid RoI map or None.
    """
    rows, panels = [], []
    for i in range(start, start + n):
        s = zoomworld_sample(variant, "test", i, alphabet=alphabet)
        low = model.answer(s.image, s.question, mode="never", max_new_tokens=8)
        # the reference a perfect zoom would reach: the ground-truth target cropped with context, enlarged 3x
        oracle = model.answer(oracle_view(s.image, tuple(s.target_box)), s.question, mode="never",
                              budget=(4, ORACLE_TOKENS), max_new_tokens=8)
        gate = box = zoom_text = probs = None
        zoomed = False
        if model.heads is not None:
            p = model.perceive(s.image, s.question, roi="always")
            gate, probs = p.gate_score, torch.sigmoid(p.roi_logits)
            box = p.box.to_json() if p.box else None
            ans = model.answer(s.image, s.question, mode="auto", max_new_tokens=8, perception=p)
            zoom_text, zoomed = ans.text, ans.zoomed
        target = list(s.target_box) if s.target_box is not None else None
        row = DemoRow(i, s.kind, s.question, s.answer, low.text, oracle.text, gate, box, zoom_text, zoomed, target)
        rows.append(row)
        panels.append((s.image, row, probs))
    return rows, panels


def draw_panels(panels: list, out: str | Path) -> Path:
    """One subplot per question: image, ground-truth box (green), proposed box (red), RoI heat map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as mpatches
    import matplotlib.pyplot as plt

    cols = min(len(panels), 4)
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, row, probs) in zip(axes.flat, panels, strict=False):
        ax.imshow(image)
        if probs is not None:
            heat = Image.fromarray((probs.float().numpy() * 255).astype("uint8")).resize(image.size, Image.BILINEAR)
            ax.imshow(heat, cmap="inferno", alpha=0.45, vmin=0, vmax=255)
        for bbox, colour in ((row.target_box, "lime"), (row.box, "red")):
            if bbox:
                x1, y1, x2, y2 = bbox
                ax.add_patch(mpatches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec=colour, lw=2))
        gate = "off" if row.gate_score is None else f"{row.gate_score:.2f}"
        ax.set_title(
            f"{row.question.splitlines()[0][:48]}\ntruth {row.truth!r} | low-res {row.lowres_answer!r} | "
            f"oracle view {row.oracle_answer!r}\n"
            f"gate {gate} | Q-Zoom {row.qzoom_answer!r}",
            fontsize=8,
        )
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def agent_demo(policy: str, rows: list[DemoRow], *, variant: str = "hr", alphabet: str = DEFAULT_ALPHABET):
    """One demo question through the agent loop in tool mode: the first fine question among ``rows`` (else the
    first), answered by the tool-calling ``policy``. Returns ``(row, run)`` with the `AgentRun` and its trace."""
    from .agent.chat_model import ChatQZoom
    from .agent.graph import build_graph
    from .agent.run import ask_agent

    row = next((r for r in rows if r.kind == "fine"), rows[0])
    s = zoomworld_sample(variant, "test", row.index, alphabet=alphabet)
    graph = build_graph(ChatQZoom.from_pretrained(policy, max_new_tokens=64))
    return row, ask_agent(graph, s.image, s.question, "tool")
