"""Tiny training configs and a runner for the real ``elborl train`` entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import BASE_CHECKPOINT, REPO


def tiny_config(tmp: Path, name: str = "t", **sections: dict[str, Any]) -> Path:
    """A run config small enough for CI: 4 prompts x 4 images, 3 ELBO timesteps."""
    cfg: dict[str, Any] = {
        "name": name,
        "runs_dir": str(tmp / "runs"),
        "model": {"checkpoint": str(BASE_CHECKPOINT)},
        "eval": {"max_prompts": 8, "sampling": {"sampler": "euler", "num_steps": 4}},
        "rollout": {
            "prompts_per_round": 4,
            "images_per_prompt": 4,
            "resources": {"num_cpus": 0.25},
            "sampling": {"sampler": "dpm2", "num_steps": 4},
        },
        "rewards": {"resources": {"num_cpus": 0.25}},
        "learner": {
            "microbatch_size": 8,
            "num_timesteps": 3,
            "lr": 1e-4,
            "resources": {"num_cpus": 0.5},
        },
        "train": {
            "rounds": 3,
            "eval_every": 3,
            "checkpoint_every": 0,
            "sample_grid_every": 3,
            "step_timeout_s": 240,
        },
    }
    for section, values in sections.items():
        cfg.setdefault(section, {})
        _merge(cfg[section], values) if isinstance(values, dict) else cfg.update({section: values})
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


SHARED_HEAD_ENV = "ELBORL_TEST_RAY_ADDRESS"


def train_cmd(args: list[str], local: bool = False, faults: list[str] | None = None) -> list[str]:
    """The ``elborl train ARGS`` command line for a test run.

    Runs join the session's shared ``ray start --head`` (``tests/e2e/conftest.py``), which
    saves each run the start and stop of a cluster, unless ``local`` asks for the default
    mode (a new local cluster) or the arguments name an address already.
    """
    shared = os.environ.get(SHARED_HEAD_ENV)
    join = ["--address", shared] if shared and not local and "--address" not in args else []
    if faults:  # the same command through the test-only fault injector (tests/e2e/faulty.py)
        return [sys.executable, "-m", "tests.e2e.faulty", *faults, "train", *args, *join]
    return [sys.executable, "-m", "services.cli", "train", *args, *join]


def train_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a test run: a small object store for local clusters, plus ``env``."""
    return {**os.environ, "ELBORL_OBJECT_STORE_BYTES": str(200 * 2**20), **(env or {})}


def run_train(
    args: list[str],
    timeout: float = 300,
    env: dict[str, str] | None = None,
    local: bool = False,
    faults: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``elborl train ARGS`` as a subprocess from the repo root (see ``train_cmd``); ``faults``
    are ``tests.e2e.faulty`` options (e.g. ``["--crash-in-checkpoint", "2"]``)."""
    return subprocess.run(
        train_cmd(args, local, faults),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=train_env(env),
    )


def metrics(run_dir: Path, include_start: bool = False) -> list[dict[str, Any]]:
    """Round records of a run (one per round), and the round-0 evaluation if asked for."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines if line.strip()]
    return [r for r in recs if include_start or r["round"] >= 1]
