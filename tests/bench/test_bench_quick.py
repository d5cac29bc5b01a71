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


def test_quick_grid_runs_the_headline_pair_and_writes_table_and_plot(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.grid", "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    record = json.loads((tmp_path / "grid.json").read_text())
    assert [r["cell"] for r in record["rows"]] == ["Trajectory + SDE, GRPO", "ELBO + ODE, PEPG"]
    for runs in record["runs"].values():
        assert runs[0]["rounds"] == [1] and runs[0]["evals"][-1]["round"] == 1
    assert record["headline"]["s_per_round_trajectory_over_elbo_ode"] > 0
    assert (tmp_path / "grid_curves.png").stat().st_size > 10_000
    assert "| headline | value |" in (tmp_path / "grid.md").read_text()
