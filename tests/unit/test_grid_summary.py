"""The grid's headline ratio (``bench.grid.ratio``) on made-up runs with known answers:
every pairing's time-to-target ratio, and the lower bound when trajectory runs never reach
the target (right-censored at their last evaluation)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from bench.grid import ratio

pytestmark = pytest.mark.unit


def _run(seed: int, overall_by_second: list[tuple[float, float]], base: float = 0.3) -> Any:
    evals = [{"round": 0, "overall": base, "elapsed_s": 0.0, "images": 0}]
    evals += [
        {"round": 4 * (i + 1), "overall": o, "elapsed_s": t, "images": 2048 * (i + 1)}
        for i, (t, o) in enumerate(overall_by_second)
    ]
    return {"cell": "c", "seed": seed, "base": {"overall": base}, "evals": evals}


def test_every_pairing_when_every_run_reaches_the_target() -> None:
    traj = [_run(0, [(100, 0.4), (300, 0.55)]), _run(1, [(100, 0.4), (200, 0.6)])]
    ode = [_run(0, [(50, 0.5)]), _run(1, [(100, 0.51)])]
    r = ratio(traj, ode, 0.2, "elapsed_s")
    # traj 300, 200 over ode 50, 100: 6, 3, 4, 2
    assert (r["median"], r["min"], r["max"], r["pairings"]) == (3.5, 2.0, 6.0, 4)
    assert "lower_bound" not in r


def test_a_trajectory_run_that_misses_gives_a_lower_bound() -> None:
    traj = [_run(0, [(100, 0.4), (300, 0.55)]), _run(1, [(100, 0.4), (400, 0.45)])]
    ode = [_run(0, [(50, 0.5)]), _run(1, [(100, 0.51)])]
    r = ratio(traj, ode, 0.2, "elapsed_s")
    assert math.isnan(r["median"]) and "seed(s) 1" in r["why"]
    # seed 1 counted at its last evaluation (400 s): 6, 3, 8, 4 -> median 5, each >= 3
    assert (r["lower_bound"], r["lower_bound_min"]) == (5.0, 3.0)
    images = ratio(traj, ode, 0.2, "images")
    assert images["lower_bound"] == pytest.approx(4096 / 2048)


def test_no_bound_when_an_elbo_ode_run_misses() -> None:
    traj = [_run(0, [(100, 0.4), (300, 0.55)])]
    ode = [_run(0, [(50, 0.45)])]
    r = ratio(traj, ode, 0.2, "elapsed_s")
    assert math.isnan(r["median"]) and "lower_bound" not in r
