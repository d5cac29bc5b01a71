"""Every benchmark's ``--quick`` form runs and writes its JSON and markdown (a smoke test:
the figures of a quick run mean nothing, and no test asserts a timing)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SUMMARY_KEYS = {
    "rewards": "speedup_2_over_1",
    "broadcast": "fraction of memcpy, tiny full, 1 actors",
    "learner": "ratio_deepspeed_over_plain",
    "estimator": "trajectory / (ELBO, K = 2)",
    "pipeline": "ratio_pipeline_over_single",
    "reward_server": "32 px raw/msgpack images/s",
    "api_load": "round time ratio, loaded / idle",
}


@pytest.mark.parametrize("name", sorted(SUMMARY_KEYS))
def test_quick_benchmark_writes_its_results(tmp_path: Path, name: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    record = json.loads((tmp_path / f"{name}.json").read_text())
    assert record["quick"] is True and record["machine"]["cpu_count"] >= 1
    assert record["rows"], "no measurements"
    value = record["summary"][SUMMARY_KEYS[name]]
    assert math.isfinite(value) and value > 0
    md = (tmp_path / f"{name}.md").read_text()
    assert md.startswith(f"### `python -m bench.{name} --quick`") and "| summary | value |" in md


def _grid(out: Path, timeout: int) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.grid", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_quick_grid_runs_the_headline_pair_and_writes_table_and_plot(tmp_path: Path) -> None:
    _grid(tmp_path, timeout=900)
    record = json.loads((tmp_path / "grid.json").read_text())
    assert [r["cell"] for r in record["rows"]] == ["Trajectory + SDE, GRPO", "ELBO + ODE, PEPG"]
    for runs in record["runs"].values():
        run = runs[0]
        assert run["rounds"] == [1] and [e["round"] for e in run["evals"]] == [0, 1]
        assert run["base"]["overall"] == run["evals"][0]["overall"]  # round 0 is the base
        assert len(run["evals"][-1]["categories"]) == 6 and run["evals"][-1]["images"] == 8
    assert record["headline"]["s_per_round_trajectory_over_elbo_ode"] > 0
    assert record["headline"]["paper_wall_clock_ratio"] == 4.6
    saved = sorted((tmp_path / "grid_runs").glob("*.json"))
    assert [p.name for p in saved] == [
        "quick-elbo-ode-pepg-s0.json",
        "quick-trajectory-sde-grpo-s0.json",
    ]
    for png in ("grid_curves.png", "grid_categories.png"):
        assert (tmp_path / png).stat().st_size > 10_000
    md = (tmp_path / "grid.md").read_text()
    assert md.startswith("### `python -m bench.grid --quick --out ") and "| 4.6x |" in md

    # resumable: a rerun skips the saved cells and rebuilds the same summary from them
    stamps = [p.stat().st_mtime_ns for p in saved]
    again = _grid(tmp_path, timeout=300)
    assert "skip quick-trajectory-sde-grpo-s0" in again.stderr
    assert "skip quick-elbo-ode-pepg-s0" in again.stderr and "seed 0" not in again.stderr
    assert [p.stat().st_mtime_ns for p in saved] == stamps
    rerun = json.loads((tmp_path / "grid.json").read_text())
    assert json.dumps(rerun["rows"]) == json.dumps(record["rows"])  # NaN-safe comparison
