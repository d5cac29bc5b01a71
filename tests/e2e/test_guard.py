"""The reward-hacking guard end to end: a run trained on JPEG compressibility while watching
JPEG incompressibility on held-out prompts (a reward rising exactly where the watched one
falls) raises the alarm, reports it (log, status API warnings, Prometheus) and, with
``guard.action: stop``, stops gracefully with a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.api.app import create_app
from tests.e2e.helpers import metrics, run_train, tiny_config

pytestmark = pytest.mark.e2e

TOKEN = "guard-test-token-0123456789abcdef"


def test_the_guard_fires_reports_and_stops(tmp_path: Path) -> None:
    watched = "eval/reward_jpeg_incompressibility"
    cfg = tiny_config(
        tmp_path,
        rewards={"functions": [{"name": "jpeg_compressibility"}]},
        eval={"rewards": [{"name": "jpeg_incompressibility"}], "max_prompts": 8},
        learner={"lr": 1e-3},
        guard={"watch": [watched], "patience": 1, "action": "stop"},
        train={"rounds": 8, "eval_every": 1, "eval_at_start": True, "checkpoint_every": 0},
    )
    out = run_train(["--config", str(cfg)], timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    run = tmp_path / "runs" / "t"
    recs = metrics(run)
    alarms = [r["round"] for r in recs if r.get("guard/alarm") == 1.0]
    assert alarms, [(r["round"], r["reward/mean"], r.get(watched)) for r in recs]
    first = alarms[0]
    assert "reward hacking? round" in out.stderr and "guard.action = stop" in out.stderr
    # The stop takes effect after the round in flight: the run ends early, checkpointed.
    assert recs[-1]["round"] <= min(first + 1, 8)
    status = json.loads((run / "status.json").read_text())
    assert status["warnings"] and status["warnings"][0].startswith("reward hacking?")
    if recs[-1]["round"] < 8:
        assert status["state"] == "stopped"
        assert (run / "checkpoints" / f"round_{recs[-1]['round']:05d}" / "COMPLETE").exists()
    client = TestClient(create_app(tmp_path / "runs", TOKEN))
    detail = client.get("/api/v1/runs/t", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert detail["warnings"] == status["warnings"]
    text = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    assert f'elborl_warnings{{run="t"}} {float(len(status["warnings"]))}' in text
