"""Fixtures shared by the end-to-end tests.

The ``elborl train`` runs of the e2e tests join one ``ray start --head`` started for the
session (token auth on, the job API on loopback), instead of each starting and stopping a
local cluster of its own; the tests of the default local mode ask for one (``local=True``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.e2e.golden import STRAIGHT_TRAIN
from tests.e2e.helpers import SHARED_HEAD_ENV, run_train, tiny_config

VENV_BIN = str(Path(sys.executable).parent)


@dataclass(frozen=True)
class Head:
    """A running ``ray start --head``: its GCS address and its job API (dashboard) URL."""

    address: str
    job_url: str
    temp_dir: str  # every process of this head names it on its command line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def venv_env() -> dict[str, str]:
    """The environment with this virtualenv's ``ray`` first on PATH."""
    return {**os.environ, "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", "")}


def processes_of(marker: str) -> list[psutil.Process]:
    """Processes whose command line mentions ``marker`` (the head's own temp directory)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def stop_head(marker: str, timeout: float = 30.0) -> None:
    """Stop the processes of the head started with temp dir ``marker``, and no other Ray.

    ``ray stop`` has no per-cluster form (``--force`` stops every Ray process of the user);
    the head's main processes (GCS, raylet, dashboard) name its ``--temp-dir`` on their
    command lines, and everything else it runs descends from them: SIGTERM first, SIGKILL
    for what is left.
    """
    procs = processes_of(marker)
    for root in list(procs):  # the workers and dashboard modules are their children
        with contextlib.suppress(psutil.NoSuchProcess):
            procs += root.children(recursive=True)
    procs = list({p.pid: p for p in procs}.values())
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


@pytest.fixture(scope="session")
def ray_head() -> Iterator[Head]:
    """One local ``ray start --head`` for the session, sized like the local mode, stopped
    (only it) at the end."""
    gcs, dash = free_port(), free_port()
    # Short: Ray's unix sockets live under it (a socket path has at most 107 characters).
    temp = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")
    start = [
        f"{VENV_BIN}/ray",
        "start",
        "--head",
        f"--port={gcs}",
        f"--num-cpus={os.cpu_count()}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        # Ray's fixed defaults (agent 52365, client server 10001) would collide between the
        # heads of two pytest-xdist workers: the second head's job agent then never registers
        # and `ray job submit` gets "No available agent to submit job".
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        f"--object-store-memory={200 * 2**20}",
        "--disable-usage-stats",
        f"--temp-dir={temp}",
    ]
    out = subprocess.run(start, capture_output=True, text=True, timeout=120, env=venv_env())
    assert out.returncode == 0, out.stderr[-3000:]
    try:
        yield Head(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", str(temp))
    finally:
        stop_head(str(temp))
        shutil.rmtree(temp, ignore_errors=True)


# The shared head's temp dir, for tests that look for its actor processes (pytest-xdist runs
# one head per worker process on the same machine: a test must find its own head's actors).
HEAD_TEMP_ENV = "ELBORL_TEST_HEAD_TEMP"


@pytest.fixture(scope="session", autouse=True)
def _join_the_shared_head(ray_head: Head) -> Iterator[None]:
    os.environ[SHARED_HEAD_ENV] = ray_head.address
    os.environ[HEAD_TEMP_ENV] = ray_head.temp_dir
    yield
    os.environ.pop(SHARED_HEAD_ENV, None)
    os.environ.pop(HEAD_TEMP_ENV, None)


def head_descendants(marker: str) -> set[int]:
    """Pids of the processes of the head with temp dir ``marker`` and all their children
    (the actors' workers descend from its raylet)."""
    pids: set[int] = set()
    for root in processes_of(marker):
        with contextlib.suppress(psutil.NoSuchProcess):
            pids.add(root.pid)
            pids.update(c.pid for c in root.children(recursive=True))
    return pids


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 4-round tiny run (checkpoints at rounds 2 and 4): the reference that
    interrupted-and-resumed runs of the same config must reproduce exactly."""
    tmp = tmp_path_factory.mktemp("straight")
    cfg = tiny_config(tmp, name="straight", train=STRAIGHT_TRAIN)
    out = run_train(["--config", str(cfg)])
    assert out.returncode == 0, out.stderr[-4000:]
    return tmp / "runs" / "straight"
