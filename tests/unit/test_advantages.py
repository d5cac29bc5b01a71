"""Group-relative advantages (algo/advantages.py)."""

from __future__ import annotations

import math

import pytest
import torch

from algo.advantages import AdvantageConfig, compute_advantages

pytestmark = pytest.mark.unit

# group 0: (1, 2, 3), mean 2, population std sqrt(2/3); group 1: (5, 5) zero variance;
# group 2: (7,) a singleton.
REWARDS = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 7.0])
GROUPS = torch.tensor([0, 0, 0, 1, 1, 2])


def _group_sums(adv: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    return torch.stack([adv[groups == g].sum() for g in groups.unique()])


def test_exact_advantage_is_scaled_centered_reward() -> None:
    adv, metrics = compute_advantages(REWARDS, GROUPS)
    torch.testing.assert_close(adv, torch.tensor([-0.1, 0.0, 0.1, 0.0, 0.0, 0.0]))
    assert metrics["advantage/num_groups"] == 3.0
    assert metrics["advantage/zero_std_groups"] == 1.0
    assert metrics["advantage/singleton_groups"] == 1.0
    assert metrics["advantage/zero_std_ratio"] == pytest.approx(2 / 3)
    assert metrics["advantage/group_size_mean"] == 2.0


def test_standard_advantage_divides_by_group_or_round_std() -> None:
    adv, _ = compute_advantages(REWARDS, GROUPS, AdvantageConfig(method="standard"))
    std0 = math.sqrt(2 / 3)
    expected = torch.tensor([-1 / (std0 + 1e-4), 0.0, 1 / (std0 + 1e-4), 0.0, 0.0, 0.0])
    torch.testing.assert_close(adv, expected)
    adv_round, _ = compute_advantages(
        REWARDS, GROUPS, AdvantageConfig(method="standard", std_scope="round", scale=2.0)
    )
    std_all = float(REWARDS.double().std(unbiased=False))
    expected_round = 2.0 * torch.tensor([-1.0, 0.0, 1.0]) / (std_all + 1e-4)
    torch.testing.assert_close(adv_round[:3], expected_round)


@pytest.mark.parametrize(
    "config",
    [
        AdvantageConfig(),
        AdvantageConfig(method="standard"),
        AdvantageConfig(method="standard", std_scope="round"),
    ],
)
def test_group_means_are_zero_with_unsorted_sparse_labels(config: AdvantageConfig) -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([17, 3, 17, 99, 3, 99, 17, 3] * 3)
    rewards = torch.rand(labels.numel(), generator=gen)
    adv, metrics = compute_advantages(rewards, labels, config)
    assert torch.isfinite(adv).all()
    torch.testing.assert_close(_group_sums(adv, labels), torch.zeros(3), atol=1e-6, rtol=0)
    assert metrics["advantage/num_groups"] == 3.0
    assert metrics["advantage/mean"] == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize(
    "config",
    [
        AdvantageConfig(),
        AdvantageConfig(method="standard"),
        AdvantageConfig(method="standard", std_scope="round"),
    ],
)
def test_degenerate_groups_give_exact_zeros_without_nan(config: AdvantageConfig) -> None:
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.3])  # 0.1 * 3 / 3 != 0.1 in float: must still be 0
    adv, metrics = compute_advantages(rewards, torch.tensor([0, 0, 0, 1]), config)
    assert torch.equal(adv, torch.zeros(4))
    assert metrics["advantage/zero_std_groups"] == 1.0
    assert metrics["advantage/singleton_groups"] == 1.0
    assert metrics["advantage/zero_std_ratio"] == 1.0
    assert all(math.isfinite(v) for v in metrics.values())


def test_dtype_follows_rewards() -> None:
    adv64, _ = compute_advantages(REWARDS.double(), GROUPS)
    assert adv64.dtype == torch.float64
    adv16, _ = compute_advantages(REWARDS.half(), GROUPS)
    assert adv16.dtype == torch.float32


def test_input_and_config_errors() -> None:
    with pytest.raises(ValueError, match="match"):
        compute_advantages(REWARDS, GROUPS[:3])
    with pytest.raises(ValueError, match="integer"):
        compute_advantages(REWARDS, GROUPS.float())
    with pytest.raises(ValueError, match="NaN"):
        compute_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="non-empty"):
        compute_advantages(torch.tensor([]), torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="unknown advantage"):
        AdvantageConfig(method="gae")
    with pytest.raises(ValueError, match="scale"):
        AdvantageConfig(scale=0.0)
    assert AdvantageConfig().effective_scale == 0.1
    assert AdvantageConfig(method="standard").effective_scale == 1.0
