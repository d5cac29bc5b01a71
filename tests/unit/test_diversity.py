"""Diversity within a prompt group (rewards/diversity.py) against known answers."""

from __future__ import annotations

import numpy as np
import pytest

from rewards.diversity import group_diversity, mean_diversity, pairwise_distance

pytestmark = pytest.mark.unit


def test_identical_images_have_zero_diversity_and_opposites_one() -> None:
    same = np.full((5, 8, 8, 3), 77, dtype=np.uint8)
    assert pairwise_distance(same) == (0.0, 10)
    opposite = np.stack([np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)])
    assert pairwise_distance(opposite) == (1.0, 1)
    d, pairs = pairwise_distance(same[:1])
    assert np.isnan(d) and pairs == 0


def test_the_mean_over_pairs_matches_a_direct_sum() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    x = images.reshape(6, -1) / 255.0
    direct = np.mean([np.abs(x[i] - x[j]).mean() for i in range(6) for j in range(i + 1, 6)])
    assert pairwise_distance(images)[0] == pytest.approx(direct, rel=1e-6)


def test_large_images_are_compared_box_filtered() -> None:
    big = np.zeros((2, 256, 256, 3), dtype=np.uint8)
    big[1, :128] = 255  # half the image white: distance 0.5 at any resolution
    assert pairwise_distance(big)[0] == pytest.approx(0.5, abs=1e-6)


def test_groups_split_over_chunks_pool_by_pairs() -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
    groups = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    whole = group_diversity(images, groups)
    assert set(whole) == {0, 1} and whole[0][1] == 6
    halves = [group_diversity(images[:2], groups[:2]), group_diversity(images[2:], groups[2:])]
    # Group 0 in two chunks: pairs within each part only (1 + 1 of the 6), pooled by count.
    d0a, d0b = halves[0][0][0], halves[1][0][0]
    expected = np.mean([(d0a + d0b) / 2, whole[1][0]])
    assert mean_diversity(halves) == pytest.approx(expected)
    assert np.isnan(mean_diversity([]))
