"""Scoring a rollout with a weighted sum of rewards (component layer, no Ray).

``services.actors.RewardWorker`` wraps one ``RewardScorer``; the driver keeps a pool of them.
Each reward is also reported on its own so the metrics show what moved.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from rewards.base import build_reward
from rewards.config import RewardSpec, check_metric_names
from rewards.diversity import group_diversity


class RolloutImagesLike(Protocol):
    """The fields of ``rollout.engine.RolloutImages`` the scorer reads (read-only)."""

    @property
    def sample_ids(self) -> np.ndarray: ...
    @property
    def group_ids(self) -> np.ndarray: ...
    @property
    def prompts(self) -> list[str]: ...
    @property
    def images(self) -> np.ndarray: ...
    @property
    def version(self) -> int: ...
    @property
    def seconds(self) -> float: ...


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
    valid: np.ndarray  # (B,) bool: every reward finite and within its range
    diversity: dict[int, tuple[float, int]] = field(default_factory=dict)
    """Per prompt group of the batch: its images' mean pairwise distance and pair count."""


class RewardScorer:
    """A weighted sum of rewards; a score that is NaN/inf or out of range invalidates a sample."""

    def __init__(self, specs: list[RewardSpec]):
        self.rewards = []
        for s in specs:
            reward = build_reward(s.name, s.params)
            self.rewards.append((reward, s.weight, s.range or reward.range))
        check_metric_names([r.name for r, _, _ in self.rewards], "rewards")

    def score(self, batch: RolloutImagesLike) -> ScoredBatch:
        """Score every image of a rollout batch against its prompt."""
        start = time.monotonic()
        n = len(batch.prompts)
        total = np.zeros(n)
        valid = np.ones(n, dtype=bool)
        per_reward: dict[str, np.ndarray] = {}
        passed = None
        for reward, weight, bounds in self.rewards:
            metadata = getattr(batch, "metadata", None)
            out = (
                reward.score(batch.images, batch.prompts)
                if metadata is None
                else reward.score_with_metadata(batch.images, batch.prompts, metadata)
            )
            scores = np.asarray(out.scores, dtype=np.float64).reshape(-1)
            if scores.shape != (n,):
                raise ValueError(f"reward {reward.name!r} gave {scores.shape[0]} scores for {n}")
            ok = np.isfinite(scores)
            if bounds is not None:
                ok &= (scores >= bounds[0]) & (scores <= bounds[1])
            valid &= ok
            per_reward[reward.name] = scores
            total += weight * np.where(ok, scores, 0.0)
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
            valid,
            group_diversity(batch.images, np.asarray(batch.group_ids)),
        )
