"""The standalone reward server file runs without elborl: it imports only the standard library
and its declared packages (checked on its source), runs as a plain script from a directory of
its own with a backend file beside it, and (slow) in a fresh venv that holds only fastapi,
uvicorn, numpy, pillow, msgpack and their dependencies: neither elborl, torch nor Ray. The tests
run without network, so that venv is filled by copying those distributions' files from this
environment; with network, ``pip install fastapi uvicorn numpy pillow msgpack`` is the same."""

from __future__ import annotations

import ast
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from rewards.remote import RemoteReward
from tests.conftest import REPO

pytestmark = pytest.mark.e2e

SERVER = REPO / "rewards" / "server" / "elborl_reward_server.py"
DECLARED = {"fastapi", "uvicorn", "numpy", "PIL", "msgpack"}
TOKEN = "standalone-token-0123456789abcdef"

BACKEND = """
class Darkness:
    name = "darkness"
    range = (0.0, 1.0)
    max_batch = 8

    def load(self, directory):
        self.offset = float(open(directory + "/offset.txt").read())

    def score(self, images, prompts, metadata):
        return [1.0 - float(img.mean()) / 255.0 - self.offset for img in images]
"""


def test_the_server_file_imports_nothing_but_the_stdlib_and_its_packages() -> None:
    tree = ast.parse(SERVER.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            roots.add(node.module.split(".")[0])
    third_party = roots - set(sys.stdlib_module_names) - {"__future__"}
    assert third_party <= DECLARED, third_party


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(
    python: str, workdir: Path, backend: str, extra: list[str]
) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    proc = subprocess.Popen(
        [
            python,
            "-I",
            str(workdir / SERVER.name),
            "--backend",
            backend,
            "--port",
            str(port),
            *extra,
        ],
        cwd=workdir,
        env={"PATH": os.environ.get("PATH", ""), "ELBORL_REWARD_TOKEN": TOKEN},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"the server did not come up: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]


def _check(python: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "server"
    work.mkdir()
    shutil.copy(SERVER, work)
    (work / "darkness.py").write_text(BACKEND)
    (work / "weights").mkdir()
    (work / "weights" / "offset.txt").write_text("0.25")
    monkeypatch.setenv("STANDALONE_TOKEN", TOKEN)
    images = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    proc, url = _serve(python, work, "darkness.py:Darkness", ["--weights", str(work / "weights")])
    try:
        remote = RemoteReward(url, token_env="STANDALONE_TOKEN", encoding="png", format="msgpack")
        out = remote.score(images, ["p"] * 10)  # two requests: the backend's max_batch is 8
    finally:
        proc.kill()
        proc.wait(timeout=30)
    expected = 1.0 - images.reshape(10, -1).mean(1) / 255.0 - 0.25
    np.testing.assert_allclose(out.scores, expected, rtol=1e-12)
    assert remote.max_batch == 8 and remote.range == (0.0, 1.0)


def test_the_server_file_runs_as_a_script_with_a_backend_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _check(sys.executable, tmp_path, monkeypatch)


def _install_offline(venv: Path, names: list[str]) -> None:
    """Install ``names`` and their dependencies into ``venv`` by copying their files from this
    interpreter's environment (the tests run without network, so pip cannot fetch them)."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    site = next((venv / "lib").glob("python3*/site-packages"))
    seen: set[str] = set()
    todo = list(names)
    while todo:
        req = Requirement(todo.pop())
        key = canonicalize_name(req.name)
        if key in seen:
            continue
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            continue  # an optional dependency this environment does not have either
        seen.add(key)
        for dep in dist.requires or []:
            dep_req = Requirement(dep)
            if dep_req.marker is None or dep_req.marker.evaluate({"extra": ""}):
                todo.append(dep)
        root = Path(str(dist.locate_file("")))
        for rel in dist.files or []:
            src = root / rel
            if src.is_file() and ".." not in rel.parts:
                dst = site / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)


@pytest.mark.slow
def test_the_server_file_runs_in_a_fresh_venv_with_only_its_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    _install_offline(venv, ["fastapi", "uvicorn", "numpy", "pillow", "msgpack"])
    python = str(venv / "bin" / "python")
    for module in ("rewards", "services", "torch", "ray"):  # neither elborl nor its stack
        probe = subprocess.run([python, "-I", "-c", f"import {module}"], capture_output=True)
        assert probe.returncode != 0, module
    _check(python, tmp_path, monkeypatch)
