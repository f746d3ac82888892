"""Command-line pieces the model diagnostics in this folder share: which model, how many questions, threads,
JSON output; and loading the model head-less with the alphabet it was trained on."""

from __future__ import annotations

import argparse

import torch

from qzoom_agent.loading import resolve_model_path, trained_alphabet
from qzoom_agent.model import QZoomModel

DEFAULT_ALPHABET = "0123456789"  # a model folder without zoomworld.json: the bundled model's digits


def parser(description: str, n: int, n_help: str) -> argparse.ArgumentParser:
    """A parser with ``--model``, ``--n`` (default ``n``), ``--threads`` and ``--json``; add your own on top."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="zoomworld-tiny", help="bundled name or model folder")
    p.add_argument("--n", type=int, default=n, help=n_help)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def load(args: argparse.Namespace, qzoom: str | bool | None = False) -> tuple[QZoomModel, str]:
    """Set the thread count and load ``args.model`` (without heads unless ``qzoom`` names an adapter; None: the
    heads in the model folder's ``qzoom/``); returns it and its training alphabet."""
    torch.set_num_threads(args.threads)
    qz = QZoomModel.from_pretrained(args.model, qzoom=qzoom)
    return qz, trained_alphabet(resolve_model_path(args.model)) or DEFAULT_ALPHABET
