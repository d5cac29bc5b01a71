"""Diversity within a prompt group: how different the K images of one prompt are.

Component layer (numpy + Pillow). A policy that collapses onto one image per prompt (a common
way of hacking a reward) drives it towards 0; a guard can watch it on held-out prompts.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIDE = 32
"""Images are compared at most SIDE x SIDE pixels (box-filtered), so the measure is cheap and
about the same for 32 px and 1024 px images."""


def pairwise_distance(images: np.ndarray, side: int = SIDE) -> tuple[float, int]:
    """Mean absolute pixel difference over all pairs of uint8 images (B, H, W, 3), in [0, 1],
    and the number of pairs (0 for fewer than two images: the mean is then NaN)."""
    n = len(images)
    if n < 2:
        return float("nan"), 0
    if images.shape[1] > side or images.shape[2] > side:
        images = np.stack(
            [
                np.asarray(Image.fromarray(im).resize((side, side), Image.Resampling.BOX))
                for im in images
            ]
        )
    x = images.reshape(n, -1).astype(np.float32) / 255.0
    total = 0.0
    for i in range(n - 1):
        total += float(np.abs(x[i + 1 :] - x[i]).mean(axis=1).sum())
    pairs = n * (n - 1) // 2
    return total / pairs, pairs


def group_diversity(images: np.ndarray, groups: np.ndarray) -> dict[int, tuple[float, int]]:
    """Per group id with two images or more: (mean pairwise distance, pairs)."""
    out = {}
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        if len(members) >= 2:
            out[int(g)] = pairwise_distance(images[members])
    return out


def mean_diversity(parts: list[dict[int, tuple[float, int]]]) -> float:
    """The mean over groups of their pairwise distance; parts of one group (chunks holding
    some of its images each) are pooled by pair count. NaN without any pair."""
    pooled: dict[int, list[float]] = {}
    for part in parts:
        for g, (d, pairs) in part.items():
            acc = pooled.setdefault(g, [0.0, 0.0])
            acc[0] += d * pairs
            acc[1] += pairs
    means = [s / p for s, p in pooled.values() if p > 0]
    return float(np.mean(means)) if means else float("nan")
