"""The reward-hacking guard (services/watch.py): fires when the training reward rises while a
watched held-out metric falls at `patience` consecutive evaluations, and stays quiet on the
main job's own curve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.config import RunConfig
from services.watch import RewardHackingGuard

pytestmark = pytest.mark.unit

WATCH = "eval/reward_aesthetic"
GRID_RUNS = Path(__file__).resolve().parents[2] / "docs" / "results" / "grid_runs"


def _feed(guard: RewardHackingGuard, evals: list[tuple[float, float]], every: int = 2) -> list:
    """Rounds 1.. with the training reward; every ``every`` rounds an evaluation. ``evals``:
    (training reward over those rounds, watched value); the first is round 0's (base)."""
    alarms = [guard.observe(0, {WATCH: evals[0][1]})]
    r = 0
    for train, watched in evals[1:]:
        for _ in range(every - 1):
            r += 1
            alarms.append(guard.observe(r, {"reward/mean": train}))
        r += 1
        alarms.append(guard.observe(r, {"reward/mean": train, WATCH: watched}))
    return alarms


def test_fires_when_the_reward_rises_while_the_watched_metric_falls() -> None:
    guard = RewardHackingGuard([WATCH], "reward/mean", patience=2, min_change=0.0)
    alarms = _feed(guard, [(0.0, 5.0), (0.2, 5.1), (0.4, 4.9), (0.6, 4.7)])
    fired = [a for a in alarms if a]
    # Evaluations at rounds 2, 4, 6: rose+fell at 4 (streak 1) and at 6 (streak 2: fires).
    assert alarms[-1] is not None and len(fired) == 1
    assert "eval/reward_aesthetic 4.9 -> 4.7" in fired[0] and "round 6" in fired[0]
    assert guard.alarms == fired


def test_quiet_when_both_rise_and_a_streak_resets() -> None:
    guard = RewardHackingGuard([WATCH], "reward/mean", patience=2, min_change=0.0)
    # rise/fall, then rise/rise (reset), then rise/fall: never two in a row.
    assert not any(_feed(guard, [(0, 5.0), (0.2, 4.9), (0.4, 5.2), (0.6, 5.1)]))
    small = RewardHackingGuard([WATCH], "reward/mean", patience=1, min_change=0.05)
    assert not any(_feed(small, [(0, 5.0), (0.2, 4.97), (0.4, 4.95)]))  # within min_change


@pytest.mark.parametrize(
    "run", sorted(GRID_RUNS.glob("elbo-ode-pepg-s*.json")), ids=lambda p: p.stem
)
def test_quiet_on_the_main_job(run: Path) -> None:
    """The main job's recorded runs (configs/shapes.yaml is the grid's ELBO + ODE, PEPG cell;
    docs/results/grid_runs/ holds every round's training reward and every evaluation), fed
    round by round as the driver does, with the guard's default settings watching held-out
    overall: training reward and held-out overall rise together, so it never fires."""
    record = json.loads(run.read_text())
    evals = {e["round"]: e["overall"] for e in record["evals"]}
    cfg = RunConfig().guard
    guard = RewardHackingGuard(["eval/overall"], cfg.train_metric, cfg.patience, cfg.min_change)
    alarms = [guard.observe(0, {"eval/overall": evals[0]})]
    for round_, reward in zip(record["rounds"], record["reward"], strict=True):
        metrics = {cfg.train_metric: reward}
        if round_ in evals:
            metrics["eval/overall"] = evals[round_]
        alarms.append(guard.observe(round_, metrics))
    assert not any(alarms), [a for a in alarms if a]


def test_the_guard_watches_held_out_metrics_only() -> None:
    assert RunConfig.model_validate({"guard": {"watch": [WATCH]}}).guard.patience == 2
    with pytest.raises(ValueError, match=r"held-out metrics \(eval/\.\.\.\)"):
        RunConfig.model_validate({"guard": {"watch": ["reward/mean"]}})
