"""Scoring a rollout with a weighted sum of rewards (component layer, no Ray).

``services.actors.RewardWorker`` wraps one ``RewardScorer``; the driver keeps a pool of them.
Each reward is also reported on its own so the metrics show what moved.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from rewards.base import build_reward
from services.config import RewardSpec


class RolloutImagesLike(Protocol):
    """The fields of ``rollout.worker.RolloutImages`` the scorer reads."""

    sample_ids: np.ndarray
    group_ids: np.ndarray
    prompts: list[str]
    images: np.ndarray
    version: int
    seconds: float


@dataclass(frozen=True)
class ScoredBatch:
    """Rewards of one rollout batch: ``total`` (B,) is the weighted sum of ``per_reward``."""

    sample_ids: np.ndarray
    group_ids: np.ndarray
    total: np.ndarray
    per_reward: dict[str, np.ndarray]
    passed: np.ndarray | None
    version: int
    seconds: float
    rollout_seconds: float


class RewardScorer:
    """A weighted sum of registered rewards."""

    def __init__(self, specs: list[RewardSpec]):
        self.rewards = [(build_reward(s.name), s.weight) for s in specs]

    def score(self, batch: RolloutImagesLike) -> ScoredBatch:
        """Score every image of a rollout batch against its prompt."""
        start = time.monotonic()
        total = np.zeros(len(batch.prompts))
        per_reward: dict[str, np.ndarray] = {}
        passed = None
        for reward, weight in self.rewards:
            out = reward.score(batch.images, batch.prompts)
            per_reward[reward.name] = out.scores
            total += weight * out.scores
            if out.details and "passed" in out.details[0]:
                passed = np.array([d["passed"] for d in out.details])
        return ScoredBatch(
            batch.sample_ids,
            batch.group_ids,
            total,
            per_reward,
            passed,
            batch.version,
            time.monotonic() - start,
            batch.seconds,
        )
