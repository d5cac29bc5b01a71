"""The record the learner trains on: one rank's share of a round."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor


@dataclass(frozen=True)
class TrainBatch:
    """One rank's share of a round: samples, their prompts, advantages and provenance.

    Every random draw of the update (ELBO timesteps, noise) derives from ``(seed, sample_id)``
    alone (``algo.seeds.sample_seed``), so the update does not depend on how samples are
    split over ranks or microbatches.

    ``x0`` (B, *sample_shape) final samples; ``advantages`` (B,); ``versions`` (B,) the
    sampling-policy version that generated each sample; ``trajectory`` (B, S+1, ...) and
    ``log_probs`` (B, S) only for the trajectory estimator.
    """

    sample_ids: np.ndarray
    group_ids: np.ndarray
    x0: Tensor
    prompts: list[str]
    advantages: Tensor
    versions: np.ndarray
    seed: int
    trajectory: Tensor | None = None
    log_probs: Tensor | None = None
    keep: np.ndarray | None = None  # (B,) bool: samples in the loss (None: all)
    total_kept: int | None = None  # kept samples over all ranks (None: B x world size)
