"""Golden traces: the per-round metrics of short deterministic runs, recorded as test assets.

A refactor that moves code but not behaviour reproduces them exactly (torchtitan's
``tests/assets/losses/``). Two runs are recorded:

- ``straight``: the e2e straight run (``tests/e2e/conftest.py``: ELBO, DPM2, PEPG, 4 rounds,
  checkpoints at 2 and 4, an evaluation at the end);
- ``trajectory``: the Flow-GRPO baseline (SDE rollouts, trajectory log-probs, GRPO with the
  standard advantage over the round), 2 rounds.

Only deterministic metrics are kept: timings, rates and wall-clock stamps are dropped.

Re-record (only when a change is *meant* to change the numbers, and say so in the commit)::

    python -m tests.e2e.golden --record
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.e2e.helpers import metrics, run_train, tiny_config

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "golden"
STRAIGHT_TRAIN = {"rounds": 4, "checkpoint_every": 2, "eval_every": 0, "sample_grid_every": 0}
TRAJECTORY = {
    "train": {"rounds": 2, "checkpoint_every": 0, "eval_every": 0, "sample_grid_every": 0},
    "rollout": {"sampling": {"sampler": "sde", "num_steps": 4}},
    "learner": {
        "estimator": "trajectory",
        "loss": "grpo",
        "advantage": "standard",
        "advantage_std": "round",
    },
}
_VOLATILE = ("timing/", "time", "seconds", "_per_s", "MBps")


def deterministic(record: dict[str, Any]) -> dict[str, Any]:
    """The keys of one metrics record that do not depend on wall-clock time."""
    return {k: v for k, v in record.items() if not any(s in k for s in _VOLATILE)}


def trace(run_dir: Path) -> list[dict[str, Any]]:
    """The deterministic per-round records of a finished run (round 0's evaluation included)."""
    return [deterministic(r) for r in metrics(run_dir, include_start=True)]


_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx_vnni", "amx_tile")


def cpu_model() -> str:
    """The CPU's model name and vector extensions.

    Float results are bit-exact only on the same kind of CPU: torch's kernels are chosen by
    the instruction set, and a model name like "AMD EPYC" covers several generations.
    """
    name, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in _ISA_FLAGS if f in flags]
    return f"{name} [{' '.join(isa)}]" if isa else name


def differences(
    expected: list[dict[str, Any]], got: list[dict[str, Any]], rel: float = 0.0
) -> list[str]:
    """Every (round, key) whose value differs; ``rel`` > 0 allows that relative float error."""
    out = []
    if len(expected) != len(got):
        out.append(f"{len(expected)} records expected, {len(got)} written")
    for want, have in zip(expected, got, strict=False):
        r = want.get("round")
        for key in sorted(set(want) | set(have)):
            if rel > 0 and key.endswith("checksum"):
                continue  # a hash of float bits: equal only where the floats are bit-equal
            a, b = want.get(key, "<missing>"), have.get(key, "<missing>")
            if not _same(a, b, rel):
                out.append(f"round {r} {key}: recorded {a!r}, now {b!r}")
    return out


def _same(a: Any, b: Any, rel: float) -> bool:
    if isinstance(a, float) and isinstance(b, float | int):
        if math.isnan(a):
            return math.isnan(b)
        return a == b or (rel > 0 and math.isclose(a, b, rel_tol=rel, abs_tol=rel))
    return bool(a == b)


def configs(tmp: Path) -> dict[str, Path]:
    """The run configs of the golden traces (written under ``tmp``)."""
    return {
        "straight": tiny_config(tmp, name="straight", train=STRAIGHT_TRAIN),
        "trajectory": tiny_config(tmp, name="trajectory", **TRAJECTORY),
    }


def record() -> None:
    ASSETS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name, cfg in configs(tmp).items():
            out = run_train(["--config", str(cfg)], local=True)
            if out.returncode != 0:
                sys.exit(f"{name}: elborl train failed:\n{out.stderr[-4000:]}")
            asset = {"cpu": cpu_model(), "records": trace(tmp / "runs" / name)}
            (ASSETS / f"{name}.json").write_text(json.dumps(asset, indent=1) + "\n")
            print(f"recorded {ASSETS / name}.json ({len(asset['records'])} records)")


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((ASSETS / f"{name}.json").read_text())
    return data


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--record", action="store_true", help="run and write the assets")
    if parser.parse_args().record:
        record()
    else:
        parser.print_help()
