"""Shared fixtures. Heavy stacks (torch, Ray) are imported only by the tests that need them."""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The tests' base model: a frozen copy of the 12,000-step `shapes` base (the shipped one until
# the six-category benchmark's base replaces it), so that the tests' numbers, the golden traces
# above all, do not move when the shipped `checkpoints/shapes-base` is retrained. The shipped
# base is exercised by the tests of the main job's command and `elborl eval`.
BASE_CHECKPOINT = REPO / "tests" / "assets" / "test-base"
SHIPPED_BASE = REPO / "checkpoints" / "shapes-base"  # what configs/shapes.yaml trains

# Ray 2.60 keeps token authentication on; the tests use their own token file rather than the
# user's ~/.ray/auth_token (set before anything imports ray; subprocesses inherit it).
_TOKEN_DIR = Path(tempfile.mkdtemp(prefix="elborl-ray-token-"))
(_TOKEN_DIR / "auth_token").write_text(secrets.token_hex(32))
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN_PATH"] = str(_TOKEN_DIR / "auth_token")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


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


def build_tiny(image_size: int, arch: dict[str, object]):  # type: ignore[no-untyped-def]
    """A freshly initialised tiny policy with ``arch`` and the `shapes` vocabulary."""
    from policy.config import ModelConfig
    from policy.io import build_policy
    from worlds.shapes.world import ShapesWorld

    model = ModelConfig(kind="tiny", checkpoint=None, arch=arch)
    return build_policy(model, image_size, ShapesWorld().vocabulary())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu`` tests run only where CUDA is present (skipped, with the reason, elsewhere)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (gpu marker)")
    for item in gpu_items:
        item.add_marker(skip)
