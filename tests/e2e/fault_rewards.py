"""Rewards that misbehave on purpose, plugged in through ``rewards.functions[].name`` as
``tests.e2e.fault_rewards:ClassName`` (the same import-path mechanism users plug theirs in by).

They wrap the real ``shapes`` verifier so that the runs they are used in still train on a real
signal; only the failure is staged.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rewards.base import Reward, RewardOutput, build_reward


class SlowShapes(Reward):
    """``shapes``, but each call takes at least ``delay_s`` (a window to kill the actor in)."""

    name = "slow_shapes"
    range = (0.0, 1.0)

    def __init__(self, delay_s: float = 1.0):
        self.delay_s = delay_s
        self.inner = build_reward("shapes")

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        time.sleep(self.delay_s)
        return self.inner.score(images, prompts)


class Hanging(Reward):
    """``shapes`` that never answers on the calls numbered in ``hang_calls`` (0-based, counted
    over every actor of the run through files in ``counter_dir``), like a stuck reward server."""

    name = "hanging"
    range = (0.0, 1.0)

    def __init__(self, counter_dir: str, hang_calls: list[int]):
        self.dir, self.hang = Path(counter_dir), set(hang_calls)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.inner = build_reward("shapes")

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        n = len(list(self.dir.iterdir()))
        (self.dir / f"call_{n}_pid_{os.getpid()}").touch()
        if n in self.hang:
            time.sleep(3600)
        return self.inner.score(images, prompts)


class BadNumbers(Reward):
    """``shapes`` whose scores are NaN, +inf and 5.0 (outside [0, 1]) for the first three of
    every ``every`` images of a batch; ``every = 1`` makes every score NaN."""

    name = "bad_numbers"
    range = (0.0, 1.0)

    def __init__(self, every: int = 8):
        self.every = every
        self.inner = build_reward("shapes")

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        out = self.inner.score(images, prompts)
        scores = out.scores.copy()
        if self.every == 1:
            scores[:] = np.nan
        else:
            scores[0 :: self.every] = np.nan
            scores[1 :: self.every] = np.inf
            scores[2 :: self.every] = 5.0
        return RewardOutput(scores=scores, details=out.details)
