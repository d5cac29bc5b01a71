"""The real ``elborl train`` on a local Ray cluster: a short run, resume, async, resources."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.e2e.conftest import STRAIGHT_TRAIN
from tests.e2e.helpers import metrics, run_train, tiny_config, train_env

pytestmark = pytest.mark.e2e


def test_short_run_trains_every_sample_once_and_loads_every_version(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, train={"eval_at_start": True})
    out = run_train(["--config", str(cfg)], local=True)  # the default mode
    assert out.returncode == 0, out.stderr[-4000:]
    # A new local cluster, although the session's `ray start --head` runs on this machine.
    assert "Started a local Ray instance" in out.stderr
    run = tmp_path / "runs" / "t"
    rounds = metrics(run)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    # Round 0: the initial (base) weights' evaluation, where the held-out curves start.
    first = metrics(run, include_start=True)[0]
    assert first["round"] == 0 and 0 <= first["eval/accuracy"] <= 1
    assert "reward/mean" not in first
    per_round = 16
    for i, r in enumerate(rounds, start=1):
        # Exactly-once accounting: every generated sample scored and trained once.
        assert r["rollout/images"] == per_round
        assert r["perf/samples_scored_total"] == per_round * i
        assert r["perf/samples_trained_total"] == per_round * i
        # Rollouts of round i used the weights published after round i-1, and the learner
        # published version i, which every rollout worker loaded (checksums verified).
        assert r["rollout/version"] == i - 1 and r["weights/version"] == i
        assert r["weights/bytes"] > 1e6 and r["weights/MBps"] > 0
    # The policy-improvement check ran on every round. (Its sign on 16 samples at lr 1e-4 is
    # noise; tests/integration/test_learner_improvement.py measures it where it is not.)
    assert all(math.isfinite(r["learner/improvement"]) for r in rounds)
    assert "eval/accuracy" in rounds[-1]
    for name in (
        "curves.png",
        "samples/round_00003.png",
        "samples/eval_round_00003.png",
        "samples/eval_round_00000.png",
        "config.yaml",
        "status.json",
        "checkpoints/round_00003/COMPLETE",
    ):
        assert (run / name).exists(), name
    assert list((run / "tensorboard").iterdir())
    assert "round 3/3" in out.stderr


def test_existing_run_dir_is_not_overwritten(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    run = tmp_path / "runs" / "t"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("precious\n")
    out = run_train(["--config", str(cfg)], timeout=60)
    assert out.returncode == 2 and "already exists" in out.stderr
    assert (run / "metrics.jsonl").read_text() == "precious\n"


def test_unsatisfiable_resources_fail_fast(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, learner={"resources": {"num_cpus": 64}})
    out = run_train(["--config", str(cfg)], timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "cannot place a learner actor" in out.stderr and "num_cpus" in out.stderr


@pytest.mark.slow
def test_stop_and_resume_reproduces_the_uninterrupted_run(
    tmp_path: Path, straight_run: Path
) -> None:
    part = tiny_config(tmp_path, name="part", train={**STRAIGHT_TRAIN, "rounds": 3})
    assert run_train(["--config", str(part)]).returncode == 0
    # As if killed during round 3: only the mid-run checkpoint of round 2 survives, written
    # while round 3's prompts were already dealt and its rollouts running.
    shutil.rmtree(tmp_path / "runs" / "part" / "checkpoints" / "round_00003")
    again = run_train(["--config", str(part), "--set", "train.rounds=4", "--resume"])
    assert again.returncode == 0, again.stderr[-4000:]
    a, b = metrics(straight_run), metrics(tmp_path / "runs" / "part")
    assert [r["round"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        for key in ("reward/mean", "learner/loss", "weights/checksum", "rollout/version"):
            assert ra[key] == rb[key], (ra["round"], key, ra[key], rb[key])


@pytest.mark.slow
def test_async_rollouts_lag_one_version_and_are_accounted_for(tmp_path: Path) -> None:
    # Two learner ranks (one DeepSpeed group over gloo) through the whole driver as well.
    cfg = tiny_config(
        tmp_path,
        train={"rounds": 3, "async_rollout": True, "eval_every": 0},
        learner={"num_workers": 2, "resources": {"num_cpus": 0.5}},
    )
    out = run_train(["--config", str(cfg)])
    assert out.returncode == 0, out.stderr[-4000:]
    rounds = metrics(tmp_path / "runs" / "t")
    assert rounds[0]["rollout/lag"] == 0
    for r in rounds[1:]:
        # Generated with the weights one update behind; the learner used that version's
        # old policy for the importance ratio (it refuses versions it does not hold).
        assert r["rollout/lag"] == 1 and r["learner/lag_mean"] == 1
    assert all(r["timing/async_saved"] >= 0 for r in rounds)


@pytest.mark.slow
def test_the_main_job_script_runs_the_shipped_config(tmp_path: Path) -> None:
    """README's second command, ``bash scripts/train.sh``, shrunk by ``--set`` overrides."""
    small = {
        "runs_dir": str(tmp_path / "runs"),
        "train.rounds": 1,
        "train.eval_every": 1,
        "train.checkpoint_every": 1,
        "rollout.prompts_per_round": 2,
        "rollout.images_per_prompt": 4,
        "learner.microbatch_size": 8,
        "eval.images_per_category": 2,
        "eval.sampling.num_steps": 4,
    }
    sets = [a for k, v in small.items() for a in ("--set", f"{k}={v}")]
    out = subprocess.run(
        ["bash", "scripts/train.sh", *sets],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=train_env(),
    )
    assert out.returncode == 0, out.stderr[-4000:]
    run = tmp_path / "runs" / "shapes"  # the shipped config's name
    records = metrics(run, include_start=True)
    assert [r["round"] for r in records] == [0, 1]  # the base model, then one round
    assert all(0.0 <= r["eval/overall"] <= 1.0 for r in records)
    assert (run / "checkpoints" / "round_00001" / "COMPLETE").exists()


def test_export_writes_the_trained_policy_as_a_saved_policy(
    tmp_path: Path, straight_run: Path
) -> None:
    import torch

    from learner.engine import read_trained_weights
    from policy.io import load_policy

    out = tmp_path / "exported"
    cmd = [sys.executable, "-m", "services.cli", "export", str(straight_run), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    policy = load_policy(out)  # usable as model.checkpoint
    trained = read_trained_weights(straight_run / "checkpoints" / "round_00004" / "learner")
    state = policy.state_dict()
    assert trained and all(torch.equal(state[k], v) for k, v in trained.items())
    assert "round 4" in (out / "README.md").read_text()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert again.returncode == 2 and "not empty" in again.stderr


@pytest.mark.parametrize("model", ["tiny", "sd35-lora"])
def test_zero3_with_two_learner_ranks_trains_publishes_evaluates_and_checkpoints(
    tmp_path: Path, model: str
) -> None:
    """ZeRO-3 partitions the parameters over the ranks: every gather of them (publishing,
    evaluation, checkpoints) must be joined by every rank, or the run hangs."""
    sections: dict[str, Any] = {
        "learner": {"num_workers": 2, "zero_stage": 3, "resources": {"num_cpus": 0.25}},
        "train": {"rounds": 2, "eval_every": 2, "checkpoint_every": 2},
    }
    if model == "sd35-lora":
        from tests.fixtures.tiny_models import save_tiny_sd3

        path = save_tiny_sd3(tmp_path / "tiny-sd35", variant="sd35")
        sections["model"] = {"kind": "sd3", "path": str(path), "checkpoint": None}
        sections["model"]["lora"] = {"rank": 4}
        sections["rewards"] = {"functions": [{"name": "jpeg_compressibility"}]}
    out = run_train(["--config", str(tiny_config(tmp_path, **sections))], timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    run = tmp_path / "runs" / "t"
    rounds = metrics(run)
    assert [r["round"] for r in rounds] == [1, 2] and "eval/accuracy" in rounds[-1]
    assert rounds[-1]["weights/version"] == 2 and rounds[-1]["weights/bytes"] > 0
    assert (run / "checkpoints" / "round_00002" / "COMPLETE").exists()
