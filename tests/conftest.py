"""Shared test setup: no test may touch the network, and the hub stays offline."""

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
