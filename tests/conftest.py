"""Shared test setup: no test may touch the network, and the hub stays offline; one tiny phase-1 run for the
training tests."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


class _NetworkBlocked(RuntimeError):
    pass


def _blocked(*args, **kwargs):
    raise _NetworkBlocked("tests must not use the network")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Refuse outbound connections; loopback stays allowed for in-process servers."""
    real_connect = socket.socket.connect

    def guarded_connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1")):
            return real_connect(self, address)
        if self.family == socket.AF_UNIX:
            return real_connect(self, address)
        raise _NetworkBlocked(f"tests must not use the network (tried {address!r})")

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "create_connection", _blocked)
    yield


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The shared folder of real public images; tests that need it skip when it is absent."""
    if not REAL_DATA.is_dir():
        pytest.skip("../shared/data/real is absent")
    return REAL_DATA


@pytest.fixture(scope="session")
def tiny_phase1(tmp_path_factory) -> Path:
    """A run folder whose ``phase1/`` holds a 2-step warm-up of a tiny model (vision 32x2, LM 32x2, MLP 64; digits),
    shared read-only by the training tests: copy it before training into it."""
    from qzoom_agent.recipes.zoomworld_tiny.dense_crops import DenseCropConfig
    from qzoom_agent.recipes.zoomworld_tiny.model import ZoomWorldTinySizes
    from qzoom_agent.recipes.zoomworld_tiny.warmup import WarmupConfig, run_warmup

    out = tmp_path_factory.mktemp("phase1run")
    cfg = WarmupConfig(steps=2, batch_size=2, warmup_steps=1, checkpoint_every=2, eval_every=2, eval_images=2,
                       crops=DenseCropConfig(max_side_tokens=4, alphabet="0123456789"))
    run_warmup(cfg, out, sizes=ZoomWorldTinySizes(vision_hidden=32, vision_depth=2, hidden=32, layers=2,
                                                  intermediate=64))
    return out


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: on a shared 2-core machine, two threads that wait on a busy core ran model-heavy
    files 5-20x slower. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tool_model():
    """The bundled tool-calling policy (`zoomworld-tiny-tool`), loaded once per module (about a second)."""
    from qzoom_agent.model import QZoomModel

    return QZoomModel.from_pretrained("zoomworld-tiny-tool")
