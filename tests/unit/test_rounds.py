"""The pure bookkeeping of a round (``services/rounds.py``, ``services/metrics.py``), no Ray."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from algo.advantages import AdvantageConfig
from services import rounds
from services.config import ConfigError, RunConfig
from services.driver import check_runs_root
from services.metrics import RANK_RULES, merge_ranks
from services.prompts import PromptDealer

pytestmark = pytest.mark.unit


@dataclass
class Scored:
    """The fields of a ``rewards.pool.ScoredBatch`` the bookkeeping reads."""

    sample_ids: np.ndarray
    total: np.ndarray
    valid: np.ndarray
    version: int = 0
    seconds: float = 0.1
    rollout_seconds: float = 0.5
    passed: np.ndarray | None = None
    per_reward: dict[str, np.ndarray] = field(default_factory=dict)


def _round(rollouts: int = 4, learners: int = 2) -> list[rounds.Chunk]:
    rp = PromptDealer([f"p{i}" for i in range(10)], seed=0).deal(3, 4, 4)  # 16 images
    return rounds.plan_chunks(rp, rollouts, learners, seed=5, round_=3)


def _scored(chunks: list[rounds.Chunk], valid: list[bool] | None = None) -> list[Scored | None]:
    out: list[Scored | None] = []
    for ch in chunks:
        n = len(ch.sample_ids)
        total = (ch.sample_ids % 3).astype(float)
        ok = np.ones(n, dtype=bool) if valid is None else np.array(valid[:n])
        out.append(Scored(ch.sample_ids, total, ok, per_reward={"r": total}))
    return out


def test_chunks_cover_the_round_once_and_go_round_robin() -> None:
    chunks = _round(rollouts=2, learners=3)
    assert len(chunks) == 6  # lcm(2, 3)
    ids = np.concatenate([c.sample_ids for c in chunks])
    assert sorted(ids.tolist()) == list(range(48, 64))
    assert [c.worker for c in chunks] == [0, 1, 0, 1, 0, 1]
    assert len({c.seed for c in chunks}) == 6


def test_dropped_and_invalid_samples_are_not_kept_and_get_no_advantage() -> None:
    chunks = _round()
    scored = _scored(chunks)
    scored[1] = None  # chunk 1 was dropped
    first = scored[0]
    assert first is not None
    first.valid[0] = False
    plan = rounds.plan_update(chunks, scored, AdvantageConfig(), num_learners=2)
    assert plan.keep.sum() == 16 - 4 - 1 and plan.total_kept == 11
    assert np.all(plan.advantages[~plan.keep] == 0)
    # Rank r gets chunks r, r + 2, ...: its keep mask and advantages are those chunks' slices.
    assert [s.chunks for s in plan.shards] == [[0, 2], [1, 3]]
    assert plan.shards[1].keep[:4].sum() == 0 and plan.trainable
    # Advantages sum to zero within each prompt group, over the kept samples.
    groups = np.concatenate([c.group_ids for c in chunks])
    for g in np.unique(groups[plan.keep]):
        assert abs(plan.advantages[plan.keep & (groups == g)].sum()) < 1e-9


def test_a_rank_without_a_kept_sample_makes_the_round_untrainable() -> None:
    chunks = _round()
    scored = _scored(chunks)
    scored[1] = scored[3] = None  # everything of rank 1
    assert not rounds.plan_update(chunks, scored, AdvantageConfig(), 2).trainable


def test_ledger_and_reward_metrics() -> None:
    chunks = _round()
    scored = _scored(chunks)
    scored[2] = None
    plan = rounds.plan_update(chunks, scored, AdvantageConfig(), 2)
    led = rounds.ledger(chunks, scored, plan.keep)
    assert led["status"].count("dropped") == 4 and led["reward"].count(None) == 4
    m = rounds.reward_metrics([s for s in scored if s is not None])
    kept = np.concatenate([s.total for s in scored if s is not None])
    assert m["reward/mean"] == pytest.approx(kept.mean()) and "reward/r" in m


def test_one_rank_is_passed_through_unchanged() -> None:
    m = {"learner/ratio_min": 0.9, "learner/loss": 0.123456789, "timing/learner_step": 1.0}
    assert merge_ranks([m]) == m


def test_rank_merge_uses_each_key_s_rule() -> None:
    a = {
        "learner/ratio_min": 0.9,
        "learner/ratio_max": 1.1,
        "learner/ratio_mean": 1.0,
        "learner/ratio_std": 0.1,
        "learner/num_pairs": 30.0,
        "learner/samples": 10.0,
        "learner/loss": 0.2,
        "timing/learner_step": 2.0,
        "learner/lag_mean": 0.0,
    }
    b = {
        "learner/ratio_min": 0.8,
        "learner/ratio_max": 1.05,
        "learner/ratio_mean": 1.2,
        "learner/ratio_std": 0.0,
        "learner/num_pairs": 10.0,
        "learner/samples": 5.0,
        "learner/loss": 0.4,
        "timing/learner_step": 3.0,
        "learner/lag_mean": 1.0,
    }
    m = merge_ranks([a, b])
    assert m["learner/ratio_min"] == 0.8 and m["learner/ratio_max"] == 1.1
    assert m["learner/num_pairs"] == 40 and m["learner/samples"] == 15
    assert m["timing/learner_step"] == 3.0
    assert m["learner/loss"] == pytest.approx(0.3)  # each rank's loss is its share / (N / W)
    assert m["learner/ratio_mean"] == pytest.approx((30 * 1.0 + 10 * 1.2) / 40)
    assert m["learner/lag_mean"] == pytest.approx(5 / 15)
    # The pooled std over the 40 pairs: E[x^2] - E[x]^2.
    second = (30 * (0.01 + 1.0) + 10 * 1.44) / 40
    assert m["learner/ratio_std"] == pytest.approx(math.sqrt(second - 1.05**2))
    with pytest.raises(KeyError, match="no rank-reduction rule"):
        merge_ranks([{"learner/new_thing": 1.0}, {"learner/new_thing": 2.0}])


def test_every_metric_the_learner_emits_has_a_rank_rule() -> None:
    emitted = {
        "learner/ratio_mean", "learner/ratio_std", "learner/ratio_min", "learner/ratio_max",
        "learner/log_ratio_abs_mean", "learner/clip_frac", "learner/adv_mean",
        "learner/num_pairs", "learner/elbo_mean", "learner/elbo_old_mean",
        "learner/policy_loss", "learner/loss", "learner/kl_mean", "learner/improvement",
        "learner/old_decay", "learner/version", "learner/lag_mean", "learner/skipped_step",
        "learner/nonfinite_losses", "learner/samples", "timing/learner_step",
    }  # fmt: skip
    golden = Path(__file__).resolve().parents[1] / "assets" / "golden" / "straight.json"
    import json

    recorded = {k for r in json.loads(golden.read_text())["records"] for k in r}
    assert {k for k in recorded if k.startswith("learner/")} <= emitted
    assert emitted <= set(RANK_RULES)


def test_a_relative_run_root_is_refused_inside_a_ray_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ELBORL_RUNS_DIR", raising=False)
    check_runs_root(RunConfig())  # not a job: fine
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    with pytest.raises(ConfigError, match=r"runs_dir = 'runs' is relative.*ELBORL_RUNS_DIR"):
        check_runs_root(RunConfig())
    check_runs_root(RunConfig(runs_dir="/data/runs"))  # absolute: fine
    monkeypatch.setenv("ELBORL_RUNS_DIR", "/data/runs")
    check_runs_root(RunConfig())
    assert RunConfig().runs_root() == Path("/data/runs")  # replaces the relative default
    assert RunConfig(runs_dir="/mine").runs_root() == Path("/mine")  # an absolute one is kept
