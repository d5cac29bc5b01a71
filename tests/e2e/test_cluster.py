"""Cluster modes: ``ray job submit`` to a local head (token auth on) and a two-node cluster.

The head is the session's shared ``ray start --head`` (``tests/e2e/conftest.py``).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.e2e.conftest import VENV_BIN, Head, venv_env
from tests.e2e.helpers import metrics, run_train, tiny_config

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _submit(cfg: Path, env: dict[str, str], *extra: str) -> str:
    out = subprocess.run(
        ["bash", "deploy/submit.sh", str(cfg), *extra],
        capture_output=True,
        text=True,
        timeout=420,
        cwd=REPO,
        env=env,
    )
    logs = out.stdout + out.stderr
    assert out.returncode == 0, logs[-4000:]
    assert "succeeded" in logs.lower(), logs[-4000:]
    return logs


def test_ray_job_submit_keeps_the_run_at_its_root_and_resumes_it(
    tmp_path: Path, ray_head: Head
) -> None:
    # A relative runs_dir (the default) under a job: the run goes to $ELBORL_RUNS_DIR, not
    # into the job's temporary working directory (which Ray deletes).
    cfg = tiny_config(tmp_path, name="job", train={"rounds": 2, "eval_every": 0}, runs_dir="runs")
    root = tmp_path / "persistent-runs"
    env = {**venv_env(), "RAY_ADDRESS": ray_head.job_url, "ELBORL_RUNS_DIR": str(root)}
    logs = _submit(cfg, env)
    assert "round 2/2" in logs
    assert [r["round"] for r in metrics(root / "job")] == [1, 2]
    assert (root / "job" / "checkpoints" / "round_00002" / "COMPLETE").exists()
    # A second submission continues the first run from its checkpoint.
    logs = _submit(cfg, env, "--set", "train.rounds=3", "--resume")
    assert "resumed from" in logs and "round 3/3" in logs
    assert [r["round"] for r in metrics(root / "job")] == [1, 2, 3]
    listed = subprocess.run(
        [f"{VENV_BIN}/ray", "job", "list"], capture_output=True, text=True, timeout=60, env=env
    )
    assert listed.returncode == 0 and "SUCCEEDED" in listed.stdout


def test_without_the_token_the_cluster_refuses_jobs(ray_head: Head) -> None:
    env = {k: v for k, v in venv_env().items() if not k.startswith("RAY_AUTH")}
    env.update({"RAY_ADDRESS": ray_head.job_url, "HOME": "/nonexistent-home"})
    out = subprocess.run(
        [f"{VENV_BIN}/ray", "job", "list"], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode != 0
    assert "token" in (out.stdout + out.stderr).lower()


def test_two_node_cluster_places_roles_on_different_nodes(tmp_path: Path) -> None:
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "resources": {"node_a": 4},
            "object_store_memory": 150 * 2**20,
        },
    )
    cluster.add_node(num_cpus=1, resources={"node_b": 4}, object_store_memory=150 * 2**20)
    try:
        cfg = tiny_config(
            tmp_path,
            name="two",
            train={"rounds": 2, "eval_every": 0},
            rollout={"resources": {"num_cpus": 0.25, "custom": {"node_a": 1}}},
            rewards={"resources": {"num_cpus": 0.25, "custom": {"node_b": 1}}},
            learner={"resources": {"num_cpus": 0.5, "custom": {"node_b": 1}}},
        )
        out = run_train(["--config", str(cfg), "--address", cluster.address], timeout=420)
        assert out.returncode == 0, out.stderr[-4000:]
        status = json.loads((tmp_path / "runs" / "two" / "status.json").read_text())
        nodes = status["nodes"]
        assert nodes["rollout"][0] != nodes["learner"][0]
        assert nodes["reward"][0] == nodes["learner"][0]
        assert [r["round"] for r in metrics(tmp_path / "runs" / "two")] == [1, 2]
    finally:
        cluster.shutdown()
