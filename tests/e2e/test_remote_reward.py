"""``elborl train`` with its reward served by ``elborl reward-serve`` on 127.0.0.1: the same
metrics as the same reward in-process for the same seed, and a run whose reward server is
killed mid-run and restarted completes with every sample scored exactly once (the ledger)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO
from tests.e2e.helpers import metrics, run_train, tiny_config

pytestmark = pytest.mark.e2e

TOKEN = "e2e-reward-token-abcdef0123456789"
COMPARED = ("reward/", "learner/loss", "learner/ratio", "eval/", "rollout/invalid_fraction")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_server(port: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "services.cli", "reward-serve", "--reward", "shapes_strict"]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), "--token-env", "E2E_REWARD_TOKEN"],
        cwd=REPO,
        env={**os.environ, "E2E_REWARD_TOKEN": TOKEN},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("elborl reward-serve did not come up within 60 s")


@contextmanager
def reward_server(port: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [_start_server(port)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=30)


def _config(tmp: Path, name: str, reward: dict[str, object], rounds: int = 2) -> Path:
    return tiny_config(
        tmp,
        name=name,
        rewards={"functions": [{"weight": 1.0, **reward}]},
        train={"rounds": rounds, "eval_every": 2},
    )


def _remote(tmp: Path, port: int, **params: object) -> dict[str, object]:
    token = tmp / "reward-token"
    token.write_text(TOKEN)  # a file: Ray's workers do not see this test's environment
    url = f"http://127.0.0.1:{port}"
    return {"name": "remote", "params": {"url": url, "token_file": str(token), **params}}


def test_a_served_reward_trains_exactly_as_the_in_process_one(tmp_path: Path) -> None:
    port = _free_port()
    with reward_server(port):
        served = _config(tmp_path, "remote", _remote(tmp_path, port))
        remote = run_train(["--config", str(served)])
    assert remote.returncode == 0, remote.stderr[-3000:]
    in_process = _config(tmp_path, "local", {"name": "shapes_strict"})
    local = run_train(["--config", str(in_process)])
    assert local.returncode == 0, local.stderr[-3000:]
    a, b = metrics(tmp_path / "runs" / "remote"), metrics(tmp_path / "runs" / "local")
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b, strict=True):
        keys = [k for k in rb if k.startswith(COMPARED)]
        assert "reward/mean" in keys and "learner/loss" in keys
        assert {k: ra[k] for k in keys} == {k: rb[k] for k in keys}


def test_a_reward_server_killed_mid_run_and_restarted(tmp_path: Path) -> None:
    port = _free_port()
    run = tmp_path / "runs" / "restart"
    cfg = _config(tmp_path, "restart", _remote(tmp_path, port, retries=8, backoff_s=0.5), rounds=3)
    with reward_server(port) as procs:

        def kill_after_round_one() -> None:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                if (run / "metrics.jsonl").exists() and metrics(run):
                    break
                time.sleep(0.2)
            procs[0].kill()
            procs[0].wait(timeout=30)
            time.sleep(2.0)  # the client meets refused connections meanwhile
            procs.append(_start_server(port))

        killer = threading.Thread(target=kill_after_round_one, daemon=True)
        killer.start()
        out = run_train(["--config", str(cfg)])
        killer.join(timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(procs) == 2  # the server was restarted
    # ... during the run: a reward actor met the dead server and retried.
    assert "remote reward shapes_strict: unreachable; retrying" in out.stderr
    rounds = metrics(run)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    ledger = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]
    ids = [i for rec in ledger for i in rec["sample_ids"]]
    assert len(ids) == len(set(ids)) == 3 * 16  # every sample once
    assert all(s == "ok" for rec in ledger for s in rec["status"])


TAGGED = """
class Tagged:
    name = "tagged"
    range = (0.0, 1.0)
    max_batch = 64
    needs_metadata = True

    def load(self, directory):
        pass

    def score(self, images, prompts, metadata):
        scores = [1.0 if m.get("tag") == "counting" else 0.0 for m in metadata]
        return scores, [{"tag": m.get("tag")} for m in metadata]
"""


def test_prompt_metadata_reaches_a_served_reward_and_the_ledger(tmp_path: Path) -> None:
    """A JSONL prompt file (GenEval's shape) in the `text` world: each image's metadata goes
    to a standalone server whose backend needs it, and into the ledger."""
    import shutil

    work = tmp_path / "server"
    work.mkdir()
    shutil.copy(REPO / "rewards" / "server" / "elborl_reward_server.py", work)
    (work / "tagged.py").write_text(TAGGED)
    records = [
        {"prompt": "two circles", "tag": "counting", "include": [{"class": "circle", "count": 2}]},
        {"prompt": "a red square", "tag": "colors", "include": [{"class": "square", "count": 1}]},
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    port = _free_port()
    script = [sys.executable, "-I", str(work / "elborl_reward_server.py")]
    proc = subprocess.Popen(
        [*script, "--backend", str(work / "tagged.py") + ":Tagged", "--port", str(port)],
        env={**os.environ, "ELBORL_REWARD_TOKEN": TOKEN},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        cfg = tiny_config(
            tmp_path,
            name="meta",
            world={"name": "text", "train_prompts": str(prompts), "eval_prompts": str(prompts)},
            rewards={"functions": [_remote(tmp_path, port)]},
            rollout={"prompts_per_round": 2},
            eval={"rewards": [_remote(tmp_path, port)]},
            train={"rounds": 2, "eval_every": 2},
        )
        out = run_train(["--config", str(cfg)])
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "runs" / "meta"
    rounds = metrics(run)
    # Both prompts every round, 4 images each: half the images are the counting prompt's.
    assert [r["reward/tagged"] for r in rounds] == [0.5, 0.5]
    assert rounds[-1]["eval/reward_tagged"] == 0.5
    ledger = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]
    for rec in ledger:
        tags = {g: m["tag"] for g, m in rec["metadata"].items()}
        assert sorted(tags.values()) == ["colors", "counting"]
        for g, reward in zip(rec["group_ids"], rec["reward"], strict=True):
            assert reward == (1.0 if tags[str(g)] == "counting" else 0.0)
