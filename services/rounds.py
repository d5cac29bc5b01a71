"""The pure bookkeeping of a round: chunks, the keep mask, advantages, learner shards,
reward metrics and the ledger. No Ray: every function here is unit-tested on plain data.

A round's images are dealt in ``lcm(rollout workers, learner ranks)`` equal chunks (one
rollout call each); chunk ``i`` goes to rollout worker ``i mod R`` and to learner rank
``i mod W``. A sample is *kept* (trained on) when its chunk was scored and every reward was
valid; advantages are computed over the kept samples of each prompt group only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from algo.advantages import AdvantageConfig, compute_advantages
from algo.seeds import round_seed
from rewards.diversity import mean_diversity
from services.prompts import RoundPrompts


@dataclass
class Chunk:
    """One rollout call: its worker, ids, seed and result refs (replaced if regenerated)."""

    index: int
    worker: int
    prompts: list[str]
    sample_ids: np.ndarray
    group_ids: np.ndarray
    seed: int
    receipt: Any = None  # ObjectRef of the RolloutReceipt
    images: Any = None  # ObjectRef of the RolloutImages (for rewards)
    samples: Any = None  # ObjectRef of the RolloutSamples (for the learner)


@dataclass
class PendingRound:
    """A round whose rollouts have been launched."""

    round: int
    prompts: RoundPrompts
    chunks: list[Chunk]
    started: float
    dealer_after: dict[str, int]  # the dealer's state once this round was dealt (checkpoints)


def plan_chunks(
    rp: RoundPrompts, num_rollouts: int, num_learners: int, seed: int, round_: int
) -> list[Chunk]:
    """The round's chunks (no refs yet): equal splits, workers round-robin, seeds per chunk."""
    num_chunks = math.lcm(num_rollouts, num_learners)
    out = []
    for i, idx in enumerate(np.array_split(np.arange(len(rp.prompts)), num_chunks)):
        out.append(
            Chunk(
                index=i,
                worker=i % num_rollouts,
                prompts=[rp.prompts[j] for j in idx],
                sample_ids=rp.sample_ids[idx],
                group_ids=rp.group_ids[idx],
                seed=round_seed(seed, round_, i),
            )
        )
    return out


@dataclass(frozen=True)
class Shard:
    """One learner rank's part of the update: its chunks, their advantages and keep mask."""

    chunks: list[int]
    advantages: np.ndarray
    keep: np.ndarray


@dataclass(frozen=True)
class UpdatePlan:
    """What the learner step needs, derived from the scored chunks.

    Attributes:
        keep: (N,) bool per sample in chunk order: scored and valid.
        advantages: (N,) float64, 0 where not kept.
        metrics: the advantage statistics (``reward/...``).
        shards: one per learner rank.
        total_kept: kept samples over all ranks (the loss normaliser).
        trainable: False when some rank has no kept sample (no rank steps then).
    """

    keep: np.ndarray
    advantages: np.ndarray
    metrics: dict[str, float]
    shards: list[Shard]
    total_kept: int
    trainable: bool


def valid_samples(
    chunks: list[Chunk], scored: list[Any | None]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sample in chunk order: kept (scored and valid), total reward, group id."""
    keep, rewards, groups = [], [], []
    for ch, s in zip(chunks, scored, strict=True):
        n = len(ch.sample_ids)
        keep.append(s.valid if s is not None else np.zeros(n, dtype=bool))
        rewards.append(s.total if s is not None else np.zeros(n))
        groups.append(ch.group_ids)
    return np.concatenate(keep), np.concatenate(rewards), np.concatenate(groups)


def plan_update(
    chunks: list[Chunk], scored: list[Any | None], adv_cfg: AdvantageConfig, num_learners: int
) -> UpdatePlan:
    """Keep mask, advantages per prompt group over the kept samples, and the ranks' shards."""
    keep, rewards, groups = valid_samples(chunks, scored)
    adv = np.zeros(len(keep))
    metrics: dict[str, float] = {}
    if keep.any():
        kept_adv, metrics = compute_advantages(
            torch.from_numpy(rewards[keep]), torch.from_numpy(groups[keep]), adv_cfg
        )
        adv[keep] = kept_adv.numpy()
    offsets = np.cumsum([0] + [len(ch.sample_ids) for ch in chunks])

    def part(x: np.ndarray, mine: list[int]) -> np.ndarray:
        return np.concatenate([x[offsets[i] : offsets[i + 1]] for i in mine])

    shards = []
    for rank in range(num_learners):
        mine = [ch.index for ch in chunks if ch.index % num_learners == rank]
        shards.append(Shard(mine, part(adv, mine), part(keep, mine)))
    trainable = all(s.keep.any() for s in shards)
    return UpdatePlan(keep, adv, metrics, shards, int(keep.sum()), trainable)


def reward_metrics(scored: list[Any]) -> dict[str, float]:
    """Reward means over the valid samples of the scored chunks (NaN when none)."""
    if not scored:
        return {"reward/mean": float("nan"), "reward/std": float("nan")}
    valid = np.concatenate([s.valid for s in scored])
    total = np.concatenate([s.total for s in scored])[valid]
    out = {
        "reward/mean": float(total.mean()) if total.size else float("nan"),
        "reward/std": float(total.std()) if total.size else float("nan"),
    }
    for name in scored[0].per_reward:
        vals = np.concatenate([s.per_reward[name] for s in scored])[valid]
        out[f"reward/{name}"] = float(vals.mean()) if vals.size else float("nan")
    if scored[0].passed is not None:
        out["reward/accuracy"] = float(np.concatenate([s.passed for s in scored])[valid].mean())
    parts = [s.diversity for s in scored if getattr(s, "diversity", None)]
    if parts:  # how different the K images of a prompt are (0: one image K times)
        out["reward/diversity"] = mean_diversity(parts)
    return out


def ledger(chunks: list[Chunk], scored: list[Any | None], keep: np.ndarray) -> dict[str, Any]:
    """Per sample of the round: id, group, reward (None if dropped), status, trained or not."""
    ids: list[int] = []
    groups: list[int] = []
    rewards: list[float | None] = []
    status: list[str] = []
    for ch, s in zip(chunks, scored, strict=True):
        ids += ch.sample_ids.tolist()
        groups += ch.group_ids.tolist()
        if s is None:
            rewards += [None] * len(ch.sample_ids)
            status += ["dropped"] * len(ch.sample_ids)
        else:
            rewards += [float(x) for x in s.total]
            status += ["ok" if v else "invalid" for v in s.valid]
    return {
        "sample_ids": ids,
        "group_ids": groups,
        "reward": rewards,
        "status": status,
        "trained": keep.tolist(),
    }


def rollout_metrics(
    chunks: list[Chunk], scored: list[Any | None], keep: np.ndarray, version: int
) -> dict[str, float]:
    """``rollout/``: images, the version that made them and its lag, invalid samples."""
    done = [s for s in scored if s is not None]
    images = float(sum(len(ch.sample_ids) for ch in chunks))
    busy = max((s.rollout_seconds for s in done), default=0.0)
    return {
        "rollout/images": images,
        "rollout/images_per_s": images / max(busy, 1e-9),
        "rollout/version": float(done[0].version) if done else float("nan"),
        "rollout/lag": float(version - 1 - done[0].version) if done else float("nan"),
        "rollout/invalid": float(len(keep) - keep.sum()),
        "rollout/invalid_fraction": float(1.0 - keep.mean()),
    }
