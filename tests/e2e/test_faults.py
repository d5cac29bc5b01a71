"""Faults on a real Ray cluster: dead and hung actors, bad numbers, crashes, signals, nodes.

Each test runs the real ``elborl train`` in a subprocess and either kills real actor processes
(found by the process title Ray gives a running actor task, ``ray::RewardWorker.score``) or
plugs in a misbehaving reward through the config (``tests/e2e/fault_rewards.py``). The
guarantee checked throughout is the ledger's: every dealt sample appears exactly once per
round, with one reward, and is trained on iff its reward was valid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.e2e.conftest import HEAD_TEMP_ENV, STRAIGHT_TRAIN, head_descendants
from tests.e2e.helpers import metrics, run_train, tiny_config, train_cmd, train_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
PLUGIN = "tests.e2e.fault_rewards"


def start_train(
    args: list[str], env: dict[str, str] | None = None, local: bool = False
) -> subprocess.Popen[str]:
    """``elborl train`` in the background (see ``helpers.train_cmd``)."""
    return subprocess.Popen(
        train_cmd(args, local),
        cwd=REPO,
        env=train_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def pids_titled(title: str, own_head: bool = True) -> list[int]:
    """Processes whose command line (Ray's process title for actors) holds ``title``; with
    ``own_head``, only those of this session's shared head (another pytest-xdist worker's
    head runs actors with the same titles)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    pids = [int(line.split(None, 1)[0]) for line in out.splitlines() if title in line]
    marker = os.environ.get(HEAD_TEMP_ENV)
    if own_head and marker:
        mine = head_descendants(marker)
        pids = [p for p in pids if p in mine]
    return pids


def kill_when_busy(
    proc: subprocess.Popen[str], title: str, deadline_s: float = 240, after: Any = None
) -> int:
    """SIGKILL the first process titled ``title`` (once ``after()`` holds); returns its pid."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end and proc.poll() is None:
        if after is None or after():
            pids = pids_titled(title)
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                return pids[0]
        time.sleep(0.02)
    _, err = proc.communicate(timeout=60)
    raise AssertionError(f"never saw {title!r} running; rc={proc.returncode}\n{err[-3000:]}")


def finish(proc: subprocess.Popen[str], timeout: float = 400) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"run did not finish within {timeout} s\n{err[-3000:]}") from None
    return proc.returncode, err


def ledger(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "ledger.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def check_exactly_once(run_dir: Path, rounds: int, per_round: int, k: int) -> list[dict[str, Any]]:
    """Every round once; each dealt sample once with one reward; whole groups trained."""
    rows = ledger(run_dir)
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    seen: set[int] = set()
    for r in rows:
        ids = r["sample_ids"]
        assert len(ids) == per_round and len(set(ids)) == per_round, r["round"]
        assert not seen & set(ids), "a sample id was dealt twice"
        seen |= set(ids)
        for reward, status, trained in zip(r["reward"], r["status"], r["trained"], strict=True):
            assert (reward is None) == (status == "dropped")
            assert trained == (status == "ok")
        trained_groups: dict[int, int] = {}
        for g, t in zip(r["group_ids"], r["trained"], strict=True):
            trained_groups[g] = trained_groups.get(g, 0) + int(t)
        if all(s != "invalid" for s in r["status"]):  # no group trained half-filled
            assert set(trained_groups.values()) <= {0, k}, trained_groups
    return rows


# ---------------------------------------------------------------------- dead actors
def test_a_reward_actor_killed_mid_round_is_replaced_and_its_batch_rescored(
    tmp_path: Path,
) -> None:
    cfg = tiny_config(
        tmp_path,
        name="rk",
        rewards={"functions": [{"name": f"{PLUGIN}:SlowShapes", "params": {"delay_s": 1.5}}]},
        train={"rounds": 2, "eval_every": 0, "sample_grid_every": 0},
    )
    proc = start_train(["--config", str(cfg)])
    kill_when_busy(proc, "ray::RewardWorker.score")
    rc, err = finish(proc)
    assert rc == 0, err[-4000:]
    run = tmp_path / "runs" / "rk"
    last = metrics(run)[-1]
    assert last["faults/reward_actor_deaths"] == 1 and last["faults/reward_restarts"] == 1
    assert last.get("faults/samples_dropped", 0) == 0
    assert last["perf/samples_scored_total"] == last["perf/samples_trained_total"] == 2 * 16
    check_exactly_once(run, rounds=2, per_round=16, k=4)


def test_a_rollout_worker_killed_mid_round_is_replaced_and_its_prompts_regenerated(
    tmp_path: Path,
) -> None:
    cfg = tiny_config(
        tmp_path,
        name="ro",
        rollout={
            "num_workers": 2,
            "prompts_per_round": 8,
            "images_per_prompt": 4,
            "sampling": {"num_steps": 24},
        },
        learner={"num_timesteps": 2},
        train={"rounds": 2, "eval_every": 0, "sample_grid_every": 0},
    )
    proc = start_train(["--config", str(cfg)])
    kill_when_busy(proc, "ray::RolloutWorker.generate")
    rc, err = finish(proc)
    assert rc == 0, err[-4000:]
    run = tmp_path / "runs" / "ro"
    last = metrics(run)[-1]
    assert last["faults/rollout_restarts"] == 1
    assert last["faults/chunks_regenerated"] >= 1
    assert last["perf/samples_trained_total"] == 2 * 32
    check_exactly_once(run, rounds=2, per_round=32, k=4)


def test_a_dead_learner_fails_the_run_resumably_and_resume_matches(
    tmp_path: Path, straight_run: Path
) -> None:
    cfg = tiny_config(tmp_path, name="lk", train=STRAIGHT_TRAIN)
    run = tmp_path / "runs" / "lk"
    proc = start_train(["--config", str(cfg)])
    past_checkpoint = lambda: (run / "checkpoints" / "round_00002").exists()  # noqa: E731
    kill_when_busy(proc, "ray::LearnerWorker.train_step", after=past_checkpoint)
    rc, err = finish(proc)
    assert rc == 1, err[-4000:]
    assert "learner rank died" in err and "round_00002" in err and "--resume" in err
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and "learner" in status["error"]
    again = run_train(["--config", str(cfg), "--resume"])
    assert again.returncode == 0, again.stderr[-4000:]
    a, b = metrics(straight_run), metrics(run)
    assert [r["round"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        for key in ("reward/mean", "learner/loss", "weights/checksum"):
            assert ra[key] == rb[key], (ra["round"], key, ra[key], rb[key])
    check_exactly_once(run, rounds=4, per_round=16, k=4)


# ---------------------------------------------------------------------- hung rewards
def test_a_hung_reward_is_timed_out_retried_then_dropped_and_counted(tmp_path: Path) -> None:
    # Calls 0 and 1 hang: round 1's batch times out twice (reward_retries = 1) and is dropped.
    # Call 3 hangs: round 3's batch times out once and succeeds on the retry.
    params = {"counter_dir": str(tmp_path / "calls"), "hang_calls": [0, 1, 3]}
    cfg = tiny_config(
        tmp_path,
        name="hung",
        rewards={"functions": [{"name": f"{PLUGIN}:Hanging", "params": params}], "timeout_s": 3},
        faults={"reward_retries": 1},
        train={"rounds": 3, "eval_every": 0, "sample_grid_every": 0},
    )
    out = run_train(["--config", str(cfg)], timeout=400)
    assert out.returncode == 0, out.stderr[-4000:]
    run = tmp_path / "runs" / "hung"
    m = metrics(run)
    assert m[0]["faults/samples_dropped"] == 16 and m[0]["learner/skipped_step"] == 1
    assert m[-1]["faults/reward_timeouts"] == 3 and m[-1]["faults/reward_restarts"] == 3
    assert m[-1]["faults/samples_dropped"] == 16
    rows = check_exactly_once(run, rounds=3, per_round=16, k=4)
    assert set(rows[0]["status"]) == {"dropped"}
    assert set(rows[1]["status"]) == set(rows[2]["status"]) == {"ok"}
    assert m[-1]["perf/samples_trained_total"] == 32


# ---------------------------------------------------------------------- bad numbers
def test_nan_inf_and_out_of_range_rewards_are_skipped_and_counted(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        name="bad",
        rewards={"functions": [{"name": f"{PLUGIN}:BadNumbers", "params": {"every": 8}}]},
        train={"rounds": 2, "eval_every": 0, "sample_grid_every": 0},
    )
    out = run_train(["--config", str(cfg)])
    assert out.returncode == 0, out.stderr[-4000:]
    run = tmp_path / "runs" / "bad"
    m = metrics(run)
    assert [r["rollout/invalid"] for r in m] == [6, 6]  # 3 of every 8 of 16 images
    assert all(r["learner/samples"] == 10 for r in m)
    rows = check_exactly_once(run, rounds=2, per_round=16, k=4)
    assert all(r["status"].count("invalid") == 6 for r in rows)
    assert all(r["reward"][r["status"].index("invalid")] is not None for r in rows)


def test_a_run_of_only_bad_rewards_stops_with_an_error_and_untouched_weights(
    tmp_path: Path,
) -> None:
    cfg = tiny_config(
        tmp_path,
        name="allbad",
        rewards={"functions": [{"name": f"{PLUGIN}:BadNumbers", "params": {"every": 1}}]},
        faults={"max_bad_rounds": 2},
        train={"rounds": 5, "eval_every": 0, "sample_grid_every": 0},
    )
    out = run_train(["--config", str(cfg)])
    assert out.returncode == 1, out.stderr[-4000:]
    assert "2 bad rounds in a row" in out.stderr and "--resume" in out.stderr
    run = tmp_path / "runs" / "allbad"
    m = metrics(run)
    assert [r["round"] for r in m] == [1, 2]
    assert all(r["weights/version"] == 0 for r in m)  # no update was ever applied
    assert all(r["weights/checksum"] == m[0]["weights/checksum"] for r in m)
    driver = json.loads((run / "checkpoints" / "round_00002" / "driver.json").read_text())
    assert driver["round"] == 2 and driver["version"] == 0


def test_a_nan_loss_skips_the_step_without_touching_the_weights(tmp_path: Path) -> None:
    # NaN losses at learner steps 2, 4 and 5: step 2 is skipped and the run goes on; steps 4
    # and 5 are two bad rounds in a row, which (max_bad_rounds = 2) stops the run.
    cfg = tiny_config(
        tmp_path,
        name="nan",
        faults={"max_bad_rounds": 2},
        train={"rounds": 8, "eval_every": 0, "sample_grid_every": 0},
    )
    # A test-only learner subclass makes the losses NaN (tests/e2e/faulty.py).
    out = run_train(["--config", str(cfg)], faults=["--nan-loss-steps", "2,4,5"])
    assert out.returncode == 1 and "learner step skipped: True" in out.stderr, out.stderr[-3000:]
    m = metrics(tmp_path / "runs" / "nan")
    assert [r["learner/skipped_step"] for r in m] == [0, 1, 0, 1, 1]
    assert [r["weights/version"] for r in m] == [1, 1, 2, 2, 2]
    assert m[1]["weights/checksum"] == m[0]["weights/checksum"]  # step 2 changed nothing
    assert m[4]["weights/checksum"] == m[2]["weights/checksum"]  # nor did steps 4 and 5
    assert m[-1]["faults/steps_skipped"] == 3


def test_a_learner_whose_passes_disagree_with_the_rollouts_stops_before_updating(
    tmp_path: Path,
) -> None:
    # Rollouts guided at G = 3 on the SDE, a learner (test-only subclass) that re-scores them
    # unguided: the first step's ratios are off, so the run stops with the likely causes.
    cfg = tiny_config(
        tmp_path,
        name="unguided",
        rollout={"sampling": {"sampler": "sde", "num_steps": 4, "guidance": 3.0}},
        learner={"estimator": "trajectory", "loss": "grpo", "advantage": "standard"},
        train={"rounds": 2, "eval_every": 0, "sample_grid_every": 0},
    )
    out = run_train(["--config", str(cfg)], faults=["--unguided-learner"])
    assert out.returncode == 1, out.stderr[-3000:]
    assert "importance ratios are up to" in out.stderr and "train_guidance" in out.stderr
    status = json.loads((tmp_path / "runs" / "unguided" / "status.json").read_text())
    assert status["state"] == "failed" and "importance ratios" in status["error"]
    assert not (tmp_path / "runs" / "unguided" / "metrics.jsonl").exists()  # no round finished


# ---------------------------------------------------------------------- crashes, signals
def test_a_crash_while_writing_a_checkpoint_resumes_from_the_previous_one(
    tmp_path: Path,
) -> None:
    cfg = tiny_config(
        tmp_path,
        name="crash",
        train={"rounds": 3, "checkpoint_every": 1, "eval_every": 0, "sample_grid_every": 0},
    )
    out = run_train(["--config", str(cfg)], faults=["--crash-in-checkpoint", "2"])
    assert out.returncode == 137, out.stderr[-3000:]
    ckpts = tmp_path / "runs" / "crash" / "checkpoints"
    assert (ckpts / ".tmp-round_00002" / "driver.json").exists()  # written, never committed
    assert not (ckpts / "round_00002").exists()
    again = run_train(["--config", str(cfg), "--resume"])
    assert again.returncode == 0, again.stderr[-4000:]
    assert "round_00001 (round 1)" in again.stderr
    assert [r["round"] for r in metrics(tmp_path / "runs" / "crash")] == [1, 2, 3]
    assert (ckpts / "round_00003").exists()


def test_sigterm_checkpoints_the_round_in_flight_and_exits_resumably(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path, name="term", train={"rounds": 50, "eval_every": 0, "sample_grid_every": 0}
    )
    run = tmp_path / "runs" / "term"
    proc = start_train(["--config", str(cfg)], local=True)  # the default mode's signal handling
    end = time.monotonic() + 240
    while not (run / "metrics.jsonl").exists() or len(metrics(run)) < 1:
        assert proc.poll() is None and time.monotonic() < end, "the run never got to round 1"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    rc, err = finish(proc, timeout=120)
    assert rc == 128 + signal.SIGTERM, err[-3000:]
    assert "interrupted by SIGTERM" in err and "--resume" in err
    last = metrics(run)[-1]["round"]
    assert last < 50
    assert (run / "checkpoints" / f"round_{last:05d}").exists()
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped" and "SIGTERM" in status["error"]
    again = run_train(["--config", str(cfg), "--set", f"train.rounds={last + 1}", "--resume"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert metrics(run)[-1]["round"] == last + 1


def test_sigterm_when_the_cluster_is_gone_exits_within_seconds_with_a_message(
    tmp_path: Path,
) -> None:
    # As seen when `timeout` signalled a whole process tree: the driver gets SIGTERM while
    # its local cluster's raylet and GCS die with it, so the round in flight can never finish.
    cfg = tiny_config(
        tmp_path, name="gone", train={"rounds": 50, "eval_every": 0, "sample_grid_every": 0}
    )
    run = tmp_path / "runs" / "gone"
    proc = start_train(["--config", str(cfg)], local=True)
    end = time.monotonic() + 240
    while not (run / "metrics.jsonl").exists() or len(metrics(run)) < 1:
        assert proc.poll() is None and time.monotonic() < end, "the run never got to round 1"
        time.sleep(0.1)
    import psutil

    cluster = [
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if p.name() in ("raylet", "gcs_server")
    ]
    assert len(cluster) == 2, [p.name() for p in cluster]
    proc.send_signal(signal.SIGTERM)
    for p in cluster:
        p.kill()
    start = time.monotonic()
    rc, err = finish(proc, timeout=60)
    assert time.monotonic() - start < 30, "the driver waited on the dead cluster"
    assert rc == 128 + signal.SIGTERM, err[-3000:]
    assert "cluster" in err and "gone" in err and "--resume" in err, err[-3000:]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and "gone" in status["error"]


# ---------------------------------------------------------------------- dead nodes
@pytest.fixture
def three_nodes() -> Any:
    """A head (learner, rewards) and two worker nodes that may hold the rollout worker.

    Node death is detected within ~2 s (faster health checks than Ray's defaults).
    """
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "resources": {"head": 4},
            "object_store_memory": 120 * 2**20,
            "_system_config": {
                "health_check_initial_delay_ms": 0,
                "health_check_period_ms": 500,
                "health_check_failure_threshold": 3,
            },
        },
    )
    yield cluster
    cluster.shutdown()


def _rollout_node(run: Path, proc: subprocess.Popen[str]) -> str:
    """The node id of the run's rollout worker, once the run is going."""
    end = time.monotonic() + 240
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            status = json.loads((run / "status.json").read_text())
            if status.get("round", 0) >= 1:
                return str(status["nodes"]["rollout"][0])
        except (OSError, ValueError, KeyError, IndexError):
            pass
        time.sleep(0.2)
    raise AssertionError("the run never finished round 1")


def _node_death_run(tmp_path: Path, cluster: Any, name: str) -> tuple[Path, int, str]:
    cfg = tiny_config(
        tmp_path,
        name=name,
        rollout={
            "resources": {"num_cpus": 0.25, "custom": {"roll": 1}},
            "sampling": {"num_steps": 24},
        },
        rewards={"resources": {"num_cpus": 0.25, "custom": {"head": 1}}},
        learner={"resources": {"num_cpus": 0.5, "custom": {"head": 1}}},
        train={"rounds": 4, "eval_every": 0, "sample_grid_every": 0, "checkpoint_every": 0},
    )
    run = tmp_path / "runs" / name
    proc = start_train(["--config", str(cfg), "--address", cluster.address])
    node_id = _rollout_node(run, proc)
    victim = next(n for n in cluster.worker_nodes if n.node_id == node_id)
    end = time.monotonic() + 60
    # This cluster is not the shared head; the wait only times the removal, so any
    # generating rollout worker will do.
    while not pids_titled("ray::RolloutWorker.generate", own_head=False) and (
        time.monotonic() < end
    ):
        time.sleep(0.02)  # remove the node while it is generating
    cluster.remove_node(victim, allow_graceful=False)
    rc, err = finish(proc)
    return run, rc, err


def test_a_dead_node_s_rollout_worker_is_replaced_on_another_node(
    tmp_path: Path, three_nodes: Any
) -> None:
    for _ in range(2):
        three_nodes.add_node(num_cpus=1, resources={"roll": 1}, object_store_memory=80 * 2**20)
    three_nodes.wait_for_nodes()
    run, rc, err = _node_death_run(tmp_path, three_nodes, "node")
    assert rc == 0, err[-4000:]
    last = metrics(run)[-1]
    assert last["faults/rollout_restarts"] == 1
    nodes = json.loads((run / "status.json").read_text())["nodes"]["rollout"]
    assert len(set(nodes)) == 2  # the first worker's node, then the replacement's
    check_exactly_once(run, rounds=4, per_round=16, k=4)


def test_a_dead_node_whose_resources_are_gone_stops_cleanly_with_a_checkpoint(
    tmp_path: Path, three_nodes: Any
) -> None:
    three_nodes.add_node(num_cpus=1, resources={"roll": 1}, object_store_memory=80 * 2**20)
    three_nodes.wait_for_nodes()
    run, rc, err = _node_death_run(tmp_path, three_nodes, "gone")
    assert rc == 1, err[-4000:]
    assert "no live node can hold a replacement rollout actor" in err and "'roll': 1" in err
    done = metrics(run)[-1]["round"]
    assert (run / "checkpoints" / f"round_{done:05d}" / "COMPLETE").exists()
    assert json.loads((run / "status.json").read_text())["state"] == "failed"
