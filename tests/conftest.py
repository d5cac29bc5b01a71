"""Shared fixtures. Heavy stacks (torch, Ray) are imported only by the tests that need them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BASE_CHECKPOINT = REPO / "checkpoints" / "shapes-base"


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def elborl_cmd() -> list[str]:
    """The installed console script, run with the same interpreter as the tests."""
    return [sys.executable, "-m", "services.cli"]


@pytest.fixture(scope="session")
def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
