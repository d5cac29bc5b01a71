"""Golden traces: the re-seamed code reproduces the metrics recorded before it, exactly.

The assets (``tests/assets/golden/``) were recorded by ``python -m tests.e2e.golden --record``.
Float results are bit-exact on the CPU model they were recorded on; on another CPU model
(other SIMD kernels, other summation orders) a relative difference of 1e-4 is allowed, far
below what any change of behaviour moves (a learning-rate step moves weights by ~1e-3 and
the rewards by whole clauses).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e import golden
from tests.e2e.helpers import run_train

pytestmark = pytest.mark.e2e


def _check(name: str, run_dir: Path) -> None:
    asset = golden.load(name)
    rel = 0.0 if asset["cpu"] == golden.cpu_model() else 1e-4
    diffs = golden.differences(asset["records"], golden.trace(run_dir), rel=rel)
    assert not diffs, f"{name}: {len(diffs)} differences from the golden trace:\n" + "\n".join(
        diffs[:30]
    )


def test_the_straight_run_reproduces_its_golden_trace(straight_run: Path) -> None:
    _check("straight", straight_run)


@pytest.mark.slow
def test_the_trajectory_baseline_reproduces_its_golden_trace(tmp_path: Path) -> None:
    cfg = golden.configs(tmp_path)["trajectory"]
    out = run_train(["--config", str(cfg)])
    assert out.returncode == 0, out.stderr[-4000:]
    _check("trajectory", tmp_path / "runs" / "trajectory")
