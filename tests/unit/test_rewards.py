"""Built-in rewards behind the one reward interface."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from rewards.base import Reward, RewardOutput, build_reward
from rewards.config import RewardSpec
from rewards.pool import RewardScorer
from worlds.shapes.grammar import heldout_prompts
from worlds.shapes.render import render_batch

pytestmark = pytest.mark.unit


def test_shapes_reward_scores_ground_truth_high_and_mismatch_low() -> None:
    prompts = [p.text for p in heldout_prompts()[:32]]
    images = render_batch(prompts, np.random.default_rng(0))
    reward = build_reward("shapes")
    right = reward.score(images, prompts)
    wrong = reward.score(images, prompts[1:] + prompts[:1])
    assert right.scores.shape == (32,) and right.scores.min() == 1.0
    assert all(d["passed"] for d in right.details)
    assert wrong.scores.mean() < 0.8 and sum(d["passed"] for d in wrong.details) <= 2


def test_jpeg_rewards_prefer_flat_or_detailed_images() -> None:
    rng = np.random.default_rng(0)
    flat = np.full((1, 32, 32, 3), 128, dtype=np.uint8)
    noisy = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    both = np.concatenate([flat, noisy])
    comp = build_reward("jpeg_compressibility").score(both, ["", ""]).scores
    incomp = build_reward("jpeg_incompressibility").score(both, ["", ""]).scores
    assert comp[0] > comp[1] and incomp[1] > incomp[0]
    np.testing.assert_allclose(comp, -incomp)


def test_reward_input_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown reward 'clip'.*shapes"):
        build_reward("clip")
    reward = build_reward("shapes")
    with pytest.raises(ValueError, match="uint8"):
        reward.score(np.zeros((1, 32, 32, 3), dtype=np.float32), ["one red circle"])
    with pytest.raises(ValueError, match="1 images but 2 prompts"):
        reward.score(np.zeros((1, 32, 32, 3), dtype=np.uint8), ["one red circle"] * 2)


def test_strict_shapes_reward_is_the_all_clause_indicator() -> None:
    prompts = [p.text for p in heldout_prompts()[:8]]
    images = render_batch(prompts, np.random.default_rng(1))
    strict = build_reward("shapes_strict")
    np.testing.assert_array_equal(strict.score(images, prompts).scores, np.ones(8))
    shifted = strict.score(images, prompts[1:] + prompts[:1]).scores
    partial = build_reward("shapes").score(images, prompts[1:] + prompts[:1]).scores
    np.testing.assert_array_equal(shifted, (partial == 1.0).astype(float))


class Mean(Reward):
    """A user's reward whose own name would take the summary key ``reward/mean``."""

    name = "mean"

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        return RewardOutput(np.zeros(len(prompts)))


def test_the_scorer_refuses_a_reward_named_like_a_summary_metric() -> None:
    # The config cannot see a class's own `name`; the scorer, built before any round, can.
    specs = [RewardSpec(name="shapes"), RewardSpec(name="tests.unit.test_rewards:Mean")]
    with pytest.raises(ValueError, match=r"named 'mean' would overwrite .*`reward/mean`"):
        RewardScorer(specs)
