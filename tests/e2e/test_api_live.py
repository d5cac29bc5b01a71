"""The status service inside a live ``elborl train``: status while training, real worker health
from Ray, then a stop request that ends the run cleanly with a checkpoint ``--resume`` uses."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO
from tests.e2e.helpers import metrics, run_train, tiny_config, train_cmd, train_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(420)]

TOKEN = "live-test-token-" + "Qm7v" * 8


def _wait_for(what: str, check: Any, proc: subprocess.Popen[str], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"exit {proc.returncode} before {what}: {err[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _status(run: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((run / "status.json").read_text())
        return data
    except (OSError, json.JSONDecodeError):
        return {}


def test_live_status_then_stop_then_resume(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        train={"rounds": 6, "eval_every": 2, "sample_grid_every": 1, "checkpoint_every": 0},
        service={"enabled": True, "port": 0},
    )
    run = tmp_path / "runs" / "t"
    env = train_env({"ELBORL_TOKEN": TOKEN})
    proc = subprocess.Popen(
        train_cmd(["--config", str(cfg)]),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = _wait_for("the service URL", lambda: _status(run).get("service_url"), proc, 60)
        assert url.startswith("http://127.0.0.1:")
        auth = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=url, timeout=10) as http:
            assert http.get("/healthz").status_code == 200
            assert http.get("/api/v1/runs").status_code == 401
            detail = _wait_for(
                "round 1 in the status",
                lambda: (
                    (d := http.get("/api/v1/runs/t", headers=auth).json())["state"] == "running"
                    and d
                ),
                proc,
                180,
            )
            assert detail["round"] >= 1 and detail["total_rounds"] == 6
            assert detail["images_per_s"] > 0 and detail["eta_s"] > 0
            assert detail["policy_version"] >= 1 and detail["service_url"] == url
            workers = {w["role"]: w for w in detail["workers"]}
            assert set(workers) == {"rollout", "reward", "learner"}
            for w in workers.values():  # from Ray's actor table
                assert w["alive"] == w["num_workers"] >= 1 and w["restarts"] == 0
            history = http.get("/api/v1/runs/t/metrics?keys=reward/mean", headers=auth).json()
            assert history["records"] and "reward/mean" in history["records"][0]["values"]
            grid = http.get("/api/v1/runs/t/samples/latest", headers=auth).json()
            assert len(grid["prompts"]) == len(grid["rewards"]) == 16
            assert http.get(grid["image_url"], headers=auth).content.startswith(b"\x89PNG")
            assert 'elborl_round{run="t"}' in http.get("/metrics", headers=auth).text

            stop = http.post("/api/v1/runs/t/stop", headers=auth)
            assert stop.status_code == 202, stop.text
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-4000:]
    assert TOKEN not in out and TOKEN not in err
    status = _status(run)
    stopped_at = status["round"]
    assert status["state"] == "stopped" and 1 <= stopped_at < 6, status
    assert (run / "checkpoints" / f"round_{stopped_at:05d}" / "COMPLETE").exists()
    assert [r["round"] for r in metrics(run)] == list(range(1, stopped_at + 1))
    assert "stopped on request" in err

    again = run_train(["--config", str(cfg), "--resume", "--set", "service.enabled=false"])
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"(round {stopped_at})" in again.stderr  # "resumed from .../round_0000N (round N)"
    assert [r["round"] for r in metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert _status(run)["state"] == "finished" and not (run / "STOP").exists()
