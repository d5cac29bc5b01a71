"""Fixtures shared by the end-to-end tests.

The ``elborl train`` runs of the e2e tests join one ``ray start --head`` started for the
session (token auth on, the job API on loopback), instead of each starting and stopping a
local cluster of its own; the tests of the default local mode ask for one (``local=True``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.golden import STRAIGHT_TRAIN
from tests.e2e.helpers import SHARED_HEAD_ENV, run_train, tiny_config

VENV_BIN = str(Path(sys.executable).parent)


@dataclass(frozen=True)
class Head:
    """A running ``ray start --head``: its GCS address and its job API (dashboard) URL."""

    address: str
    job_url: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def venv_env() -> dict[str, str]:
    """The environment with this virtualenv's ``ray`` first on PATH."""
    return {**os.environ, "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", "")}


@pytest.fixture(scope="session")
def ray_head() -> Iterator[Head]:
    """One local ``ray start --head`` for the session, sized like the local mode."""
    gcs, dash = free_port(), free_port()
    start = [
        f"{VENV_BIN}/ray",
        "start",
        "--head",
        f"--port={gcs}",
        f"--num-cpus={os.cpu_count()}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--object-store-memory={200 * 2**20}",
        "--disable-usage-stats",
    ]
    out = subprocess.run(start, capture_output=True, text=True, timeout=120, env=venv_env())
    assert out.returncode == 0, out.stderr[-3000:]
    try:
        yield Head(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}")
    finally:
        stop = [f"{VENV_BIN}/ray", "stop", "--force"]
        subprocess.run(stop, capture_output=True, timeout=120, env=venv_env())


@pytest.fixture(scope="session", autouse=True)
def _join_the_shared_head(ray_head: Head) -> Iterator[None]:
    os.environ[SHARED_HEAD_ENV] = ray_head.address
    yield
    os.environ.pop(SHARED_HEAD_ENV, None)


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 4-round tiny run (checkpoints at rounds 2 and 4): the reference that
    interrupted-and-resumed runs of the same config must reproduce exactly."""
    tmp = tmp_path_factory.mktemp("straight")
    cfg = tiny_config(tmp, name="straight", train=STRAIGHT_TRAIN)
    out = run_train(["--config", str(cfg)])
    assert out.returncode == 0, out.stderr[-4000:]
    return tmp / "runs" / "straight"
