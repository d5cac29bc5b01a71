"""How per-rank learner metrics combine into the round's: an explicit rule per key.

Each learner rank reports metrics over its own shard (``LearnerEngine.train_step``); the
round's value of each key follows the rule named here, and a key without a rule is an error
(``tests/unit/test_metrics.py`` checks that every key the engine emits has one). Within a
rank, per-(microbatch, timestep) values are combined by ``algo.microbatch.merge_metrics``.

Rules:
- ``sum``: counts over the round (pairs, samples, non-finite losses);
- ``min`` / ``max``: extremes (``ratio_min`` / ``ratio_max``; the slowest rank's step time;
  ``skipped_step``, which every rank agrees on);
- ``same``: values every rank holds identically (the version, the old-policy decay);
- ``mean``: plain mean over ranks: the losses (each rank's is its share of the global mean
  over pairs, normalised by total / W) and the improvement check;
- ``pair_mean``: mean weighted by each rank's ``learner/num_pairs`` (per-pair statistics);
- ``pair_std``: the pooled std of ``learner/ratio_mean``'s pairs;
- ``sample_mean``: mean weighted by each rank's ``learner/samples``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

RANK_RULES: dict[str, str] = {
    "learner/num_pairs": "sum",
    "learner/samples": "sum",
    "learner/nonfinite_losses": "sum",
    "learner/ratio_min": "min",
    "learner/ratio_max": "max",
    "learner/skipped_step": "max",
    "timing/learner_step": "max",
    "learner/version": "same",
    "learner/old_decay": "same",
    "learner/loss": "mean",
    "learner/policy_loss": "mean",
    "learner/improvement": "mean",
    "learner/ratio_mean": "pair_mean",
    "learner/log_ratio_abs_mean": "pair_mean",
    "learner/clip_frac": "pair_mean",
    "learner/adv_mean": "pair_mean",
    "learner/elbo_mean": "pair_mean",
    "learner/elbo_old_mean": "pair_mean",
    "learner/kl_mean": "pair_mean",
    "learner/ratio_std": "pair_std",
    "learner/lag_mean": "sample_mean",
}


def merge_ranks(per_rank: Sequence[dict[str, float]]) -> dict[str, float]:
    """The round's learner metrics from each rank's (one rank: its own, unchanged)."""
    if len(per_rank) == 1:
        return {k: float(v) for k, v in per_rank[0].items()}
    keys = list(dict.fromkeys(k for m in per_rank for k in m))
    return {key: _reduce(key, [m for m in per_rank if key in m]) for key in keys}


def _reduce(key: str, ranks: list[dict[str, float]]) -> float:
    if key not in RANK_RULES:
        raise KeyError(f"no rank-reduction rule for metric {key!r}; add one to RANK_RULES")
    rule = RANK_RULES[key]
    values = [float(m[key]) for m in ranks]
    if rule == "sum":
        return sum(values)
    if rule in ("min", "max"):
        return min(values) if rule == "min" else max(values)
    if rule == "same":
        return values[0]
    if rule == "mean":
        finite = [v for v in values if not math.isnan(v)]
        return sum(finite) / len(finite) if finite else float("nan")
    weight_key = "learner/samples" if rule == "sample_mean" else "learner/num_pairs"
    weights = [float(m.get(weight_key, 0.0)) for m in ranks]
    if rule == "pair_std":
        return _pooled_std(ranks, weights)
    return _weighted(values, weights)


def _weighted(values: list[float], weights: list[float]) -> float:
    total = sum(weights)
    if total <= 0:
        return sum(values) / len(values)
    return sum(v * w for v, w in zip(values, weights, strict=True)) / total


def _pooled_std(ranks: list[dict[str, float]], weights: list[float]) -> float:
    """std over all pairs from each rank's (mean, std, count): E[x^2] - E[x]^2, pooled."""
    means = [float(m.get("learner/ratio_mean", float("nan"))) for m in ranks]
    stds = [float(m["learner/ratio_std"]) for m in ranks]
    mean = _weighted(means, weights)
    second = _weighted([s * s + u * u for s, u in zip(stds, means, strict=True)], weights)
    return math.sqrt(max(second - mean * mean, 0.0))
