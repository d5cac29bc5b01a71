"""The rollout engine: the sampling ("old") policy generating K-image groups.

Component layer (no Ray): ``services.actors.RolloutWorker`` wraps one. It holds the sampling
policy, loads published weights (a dict of numpy arrays, read zero-copy from Ray's object
store), and generates images for a list of prompts, tagging every sample with the policy
version that made it. The records here are what crosses the process boundary.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from policy.base import Policy
from policy.state import StateDict, checksum, load_numpy_state, published_keys, to_numpy_state
from rollout.config import EvalConfig, SamplingConfig
from rollout.evaluate import evaluate
from rollout.generate import generate
from worlds.base import World


@dataclass(frozen=True)
class RolloutImages:
    """What reward actors need: images uint8 (B, H, W, 3), prompts, ids and the version."""

    sample_ids: np.ndarray
    group_ids: np.ndarray
    prompts: list[str]
    images: np.ndarray
    version: int
    seconds: float
    metadata: list[dict[str, Any] | None] | None = None  # per image, from the prompt file


@dataclass(frozen=True)
class RolloutSamples:
    """What the learner needs: model-space samples and, for SDE rollouts, the trajectory.

    ``x0`` (B, *sample_shape); ``trajectory`` (B, S+1, *sample_shape); ``log_probs`` (B, S);
    ``conditions``: the conditioning of each unique prompt (and the empty one) for kinds with
    frozen text encoders (``Policy.conditions``), so the learner never runs them.
    """

    sample_ids: np.ndarray
    group_ids: np.ndarray
    prompts: list[str]
    x0: Tensor
    version: int
    seconds: float
    trajectory: Tensor | None = None
    log_probs: Tensor | None = None
    conditions: dict[str, Any] | None = None


@dataclass(frozen=True)
class RolloutReceipt:
    """The small record of a finished ``generate`` call the driver reads (images stay put)."""

    count: int
    version: int
    seconds: float


@dataclass(frozen=True)
class WeightsLoaded:
    """A rollout worker's report after loading published weights."""

    version: int
    checksum: str
    bytes: int
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    """A held-out evaluation: the world's summary and the images with prompts and scores."""

    summary: dict[str, object]
    images: np.ndarray
    prompts: list[str]
    scores: list[float]


class RolloutEngine:
    """Holds the sampling policy and generates tagged rollouts with it."""

    def __init__(self, policy: Policy, sampling: SamplingConfig, batch_size: int = 128):
        self.policy = policy.eval().requires_grad_(False)
        self.sampling, self.batch_size = sampling, batch_size
        self.version = 0
        self.checksum = checksum(to_numpy_state(self.policy, published_keys(self.policy)))

    def load_weights(self, state: StateDict, version: int) -> WeightsLoaded:
        """Load published sampling weights; report the version, checksum and timing."""
        start = time.monotonic()
        load_numpy_state(self.policy, state)
        self.version, self.checksum = version, checksum(state)
        nbytes = sum(v.nbytes for v in state.values())
        return WeightsLoaded(version, self.checksum, nbytes, time.monotonic() - start)

    def generate(
        self, prompts: Sequence[str], sample_ids: np.ndarray, group_ids: np.ndarray, seed: int
    ) -> tuple[RolloutImages, RolloutSamples]:
        """One image per prompt entry (prompts repeat K times for a group)."""
        start = time.monotonic()
        keep = self.sampling.stochastic
        out = generate(
            self.policy,
            list(prompts),
            self.sampling,
            seed=seed,
            batch_size=self.batch_size,
            keep_trajectory=keep,
        )
        seconds = time.monotonic() - start
        images = RolloutImages(
            sample_ids, group_ids, list(prompts), out.images, self.version, seconds
        )
        samples = RolloutSamples(
            sample_ids,
            group_ids,
            list(prompts),
            out.x0,
            self.version,
            seconds,
            out.trajectory,
            out.log_probs,
            self.policy.conditions(list(prompts)),
        )
        return images, samples

    def evaluate(
        self, state: StateDict | None, world: World, prompts: list[str], cfg: EvalConfig, seed: int
    ) -> EvalResult:
        """Held-out evaluation of ``state`` (e.g. the current weights), then restore ours."""
        current = self.policy.state_dict()
        keys = list(state) if state is not None else []
        backup = {k: current[k].clone() for k in keys}  # only what the evaluation replaces
        try:
            if state is not None:
                load_numpy_state(self.policy, state)
            with torch.no_grad():
                report = evaluate(self.policy, world, prompts, cfg, seed)
        finally:
            self.policy.load_state_dict(backup, strict=False)
        scores = [r.score for r in report.results]
        return EvalResult(report.summary, report.images, report.prompts, scores)
