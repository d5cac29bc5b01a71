"""Rewards watched on held-out images (``eval.rewards``): what the driver scores besides the
world's verifier, so that a training reward can be checked against rewards it does not train
on. Service layer, no Ray: the images come back from the rollout worker's evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rewards.pool import RewardScorer
from rollout.engine import RolloutImages


@dataclass(frozen=True)
class Watched:
    """``eval/reward_<name>`` means (over valid scores) and the weighted total per image (NaN
    where invalid)."""

    metrics: dict[str, float]
    total: np.ndarray


def score_held_out(
    scorer: RewardScorer,
    images: np.ndarray,
    prompts: Sequence[str],
    metadata: Sequence[dict[str, Any] | None] | None = None,
) -> Watched:
    """Score held-out ``images`` (uint8 (B, H, W, 3)) against ``prompts`` (and their prompt
    file's ``metadata``, when known) with ``scorer``."""
    ids = np.arange(len(prompts))
    meta = list(metadata) if metadata is not None and any(metadata) else None
    scored = scorer.score(RolloutImages(ids, ids, list(prompts), images, 0, 0.0, meta))
    metrics: dict[str, float] = {}
    for name, scores in scored.per_reward.items():
        ok = np.isfinite(scores)
        metrics[f"eval/reward_{name}"] = float(scores[ok].mean()) if ok.any() else float("nan")
    metrics["eval/reward_valid_fraction"] = float(scored.valid.mean()) if len(ids) else 0.0
    return Watched(metrics, np.where(scored.valid, scored.total, np.nan))


class RewardHackingGuard:
    """Fires when the training metric rose and a watched held-out metric fell at ``patience``
    consecutive evaluations (DESIGN: a reward that is being hacked climbs while what it stands
    for does not). ``observe`` takes every round's metrics; state is not checkpointed (a resumed
    run starts watching afresh)."""

    def __init__(self, watch: Sequence[str], train_metric: str, patience: int, min_change: float):
        self.watch, self.train_metric = list(watch), train_metric
        self.patience, self.min_change = patience, min_change
        self.streak = dict.fromkeys(self.watch, 0)
        self._train: list[float] = []
        self._last: dict[str, float] | None = None
        self.alarms: list[str] = []

    def observe(self, round_: int, metrics: dict[str, float]) -> str | None:
        """The alarm's message when it fires at this round, else None."""
        value = metrics.get(self.train_metric)
        if value is not None and np.isfinite(value):
            self._train.append(float(value))
        if not any(k in metrics for k in self.watch):
            return None  # not an evaluation round
        point = {k: float(metrics.get(k, np.nan)) for k in self.watch}
        point[self.train_metric] = float(np.mean(self._train)) if self._train else np.nan
        self._train = []
        last, self._last = self._last, point
        if last is None:
            return None
        rose = point[self.train_metric] - last[self.train_metric] > self.min_change
        fired = []
        for k in self.watch:
            fell = last[k] - point[k] > self.min_change
            self.streak[k] = self.streak[k] + 1 if rose and fell else 0
            if self.streak[k] >= self.patience:
                fired.append(f"{k} {last[k]:.4g} -> {point[k]:.4g}")
        if not fired:
            return None
        message = (
            f"reward hacking? round {round_}: {self.train_metric} rose for {self.patience} "
            f"evaluations while {', '.join(fired)} fell"
        )
        self.alarms.append(message)
        return message
