"""Held-out evaluation: the GenEval-style accuracy of a policy on its world's prompts.

Component layer (no Ray): ``elborl eval``, pretraining's progress checks and the training
driver's periodic evaluation all call ``evaluate``.
"""

from __future__ import annotations

import math
from collections import Counter
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
    """Sample images per prompt (``images_per_prompt``, balanced by ``images_per_category``,
    at least 2K for ``pass_k``) and judge each one with the world.

    The summary holds the world's metrics (``accuracy``: fraction of images passing every
    clause, ``mean_reward``, ``clause_accuracy``, and for `shapes` ``category_accuracy`` and
    ``overall``), ``num_prompts``, ``num_images``, and with ``pass_k`` a ``pass_at_k`` table.
    """
    chosen = list(prompts)[: cfg.max_prompts] if cfg.max_prompts else list(prompts)
    if not chosen:
        raise ValueError("evaluate() got no prompts")
    counts = images_per_prompt(world, chosen, cfg)
    texts = [p for p, n in zip(chosen, counts, strict=True) for _ in range(n)]
    was_training = policy.training
    policy.eval()
    try:
        out = generate(policy, texts, cfg.sampling, seed=seed, batch_size=cfg.batch_size)
    finally:
        policy.train(was_training)
    if not world.verifies:  # scored by the eval rewards (services) alone
        if cfg.pass_k:
            raise ValueError(f"pass@k needs a verifier; the {world.name!r} world has none")
        summary: dict[str, Any] = {"num_prompts": len(chosen), "num_images": len(texts)}
        return EvalReport(summary=summary, prompts=texts, images=out.images, results=[])
    results = world.verify(out.images, texts)
    summary = world.summarize(results, texts)
    summary["num_prompts"] = len(chosen)
    summary["num_images"] = len(texts)
    if cfg.pass_k:
        summary["pass_at_k"] = pass_at_k_table(world, chosen, counts, results, cfg.pass_k)
    return EvalReport(summary=summary, prompts=texts, images=out.images, results=results)


def images_per_prompt(world: World, prompts: list[str], cfg: EvalConfig) -> list[int]:
    """Images to sample for each prompt (see ``EvalConfig``)."""
    base = cfg.images_per_prompt
    if cfg.pass_k:
        base = max(base, 2 * cfg.pass_k)
    if not cfg.images_per_category:
        return [base] * len(prompts)
    sizes = Counter(world.category(p) for p in prompts)
    budget = cfg.images_per_category
    return [max(base, math.ceil(budget / sizes[world.category(p)])) for p in prompts]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt from n samples of which c passed (Chen et al. 2021):
    ``1 - C(n - c, k) / C(n, k)``."""
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_at_k_table(
    world: World, prompts: list[str], counts: list[int], results: Sequence[Verdict], k: int
) -> dict[str, Any]:
    """pass@1 and pass@k per category (mean over its prompts) and overall (mean over
    categories, as GenEval averages)."""
    per_cat: dict[str, list[tuple[float, float]]] = {}
    start = 0
    for prompt, n in zip(prompts, counts, strict=True):
        c = sum(r.passed for r in results[start : start + n])
        start += n
        cat = world.category(prompt) or "all"
        per_cat.setdefault(cat, []).append((c / n, pass_at_k(n, c, k)))
    table = {
        cat: {
            "pass@1": sum(a for a, _ in v) / len(v),
            f"pass@{k}": sum(b for _, b in v) / len(v),
            "prompts": len(v),
        }
        for cat, v in per_cat.items()
    }
    overall = {
        "pass@1": sum(t["pass@1"] for t in table.values()) / len(table),
        f"pass@{k}": sum(t[f"pass@{k}"] for t in table.values()) / len(table),
    }
    return {"k": k, "categories": table, "overall": overall}
