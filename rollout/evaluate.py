"""Held-out evaluation: the GenEval-style accuracy of a policy on its world's prompts.

Component layer (no Ray): ``elborl eval``, pretraining's progress checks and the training
driver's periodic evaluation all call ``evaluate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from policy.base import Policy
from rollout.config import EvalConfig
from rollout.generate import generate
from worlds.base import Verdict, World


@dataclass(frozen=True)
class EvalReport:
    """What ``evaluate`` measured: the summary dict plus the images and per-image results."""

    summary: dict[str, Any]
    prompts: list[str]
    images: np.ndarray
    results: list[Verdict]


def evaluate(
    policy: Policy, world: World, prompts: Sequence[str], cfg: EvalConfig, seed: int
) -> EvalReport:
    """Sample ``cfg.images_per_prompt`` images per prompt and judge each one with the world.

    The summary holds ``accuracy`` (fraction of images passing every clause), ``mean_reward``,
    ``clause_accuracy`` per clause, ``num_prompts`` and ``num_images``.
    """
    chosen = list(prompts)[: cfg.max_prompts] if cfg.max_prompts else list(prompts)
    if not chosen:
        raise ValueError("evaluate() got no prompts")
    texts = [p for p in chosen for _ in range(cfg.images_per_prompt)]
    was_training = policy.training
    policy.eval()
    try:
        out = generate(policy, texts, cfg.sampling, seed=seed, batch_size=cfg.batch_size)
    finally:
        policy.train(was_training)
    results = world.verify(out.images, texts)
    summary = world.summarize(results, texts)
    summary["num_prompts"] = len(chosen)
    summary["num_images"] = len(texts)
    return EvalReport(summary=summary, prompts=texts, images=out.images, results=results)
