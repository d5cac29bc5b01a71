"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.helpers import run_train, tiny_config

STRAIGHT_TRAIN = {"rounds": 4, "checkpoint_every": 2, "eval_every": 0, "sample_grid_every": 0}


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 4-round tiny run (checkpoints at rounds 2 and 4): the reference that
    interrupted-and-resumed runs of the same config must reproduce exactly."""
    tmp = tmp_path_factory.mktemp("straight")
    cfg = tiny_config(tmp, name="straight", train=STRAIGHT_TRAIN)
    out = run_train(["--config", str(cfg)])
    assert out.returncode == 0, out.stderr[-4000:]
    return tmp / "runs" / "straight"
