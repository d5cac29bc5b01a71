"""The math layer imports without the heavy stacks (STYLE.md principle 1).

Run in a fresh interpreter: other tests in the same session may already have imported Ray etc.,
which would hide an accidental import here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[2]
PURE_MODULES = (
    "algo.elbo",
    "algo.losses",
    "algo.advantages",
    "algo.old_policy",
    "algo.trajectory",
    "algo.microbatch",
    "algo.samplers",
    "algo.vp",
    "algo.seeds",
    "algo.registry",
)
FORBIDDEN = ("ray", "deepspeed", "fastapi", "diffusers", "pydantic")

_PROBE = """
import importlib, sys
for name in {modules!r}:
    importlib.import_module(name)
loaded = sorted(m for m in {forbidden!r} if m in sys.modules)
print("LOADED:" + ",".join(loaded))
"""


def test_math_modules_import_without_ray_deepspeed_or_fastapi() -> None:
    probe = _PROBE.format(modules=PURE_MODULES, forbidden=FORBIDDEN)
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "LOADED:", result.stdout
