"""The paper's losses (algo/losses.py) against hand-computed values and gradients.

The tiny case used throughout: two pairs with E = (-1, -2), E_old = (-1.2, -1.9), A = (0.5, -0.3),
so l = sg(E) - E_old = (0.2, -0.1), rho = (e^0.2, e^-0.1), and N K = 2 pairs in the step.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from algo.losses import (
    GlobalNormalizer,
    LossConfig,
    clipped_surrogate,
    elbo_policy_loss,
    girsanov_kl_per_pair,
    policy_loss_per_pair,
)

pytestmark = pytest.mark.unit

E0 = (-1.0, -2.0)
E_OLD = (-1.2, -1.9)
ADV = (0.5, -0.3)
R1, R2 = math.exp(0.2), math.exp(-0.1)
TWO_PAIRS = GlobalNormalizer(num_samples=2, num_timesteps=1)


def _case() -> tuple[Tensor, Tensor, Tensor]:
    elbo = torch.tensor(E0, dtype=torch.float64, requires_grad=True)
    return elbo, torch.tensor(E_OLD, dtype=torch.float64), torch.tensor(ADV, dtype=torch.float64)


# (per-pair values, d loss_pair / dE) for each loss, written out by hand.
HAND = {
    # -rho A E
    "epg": ((R1 * 0.5, -R2 * 0.6), (-R1 * 0.5, R2 * 0.3)),
    "epg_noratio": ((0.5, -0.6), (-0.5, 0.3)),
    # -rho (A - l) E: A - l = (0.3, -0.2)
    "pepg": ((R1 * 0.3, -R2 * 0.4), (-R1 * 0.3, R2 * 0.2)),
    "pepg_noratio": ((0.3, -0.4), (-0.3, 0.2)),
    # 1/2 rho (A - (E - E_old))^2: A - (E - E_old) = (0.3, -0.2); d/dE = -rho (A - (E - E_old))
    "par": ((R1 * 0.045, R2 * 0.02), (-R1 * 0.3, R2 * 0.2)),
    "par_noratio": ((0.045, 0.02), (-0.3, 0.2)),
    # r = (e^0.2, e^-0.1) are both outside 1 +- 1e-3 on the side that clips:
    # A > 0, r > 1.001 -> -A (1.001); A < 0, r < 0.999 -> -A (0.999); no gradient.
    "grpo": ((-0.5 * 1.001, 0.3 * 0.999), (0.0, 0.0)),
}


@pytest.mark.parametrize("loss", sorted(HAND))
def test_every_loss_matches_hand_values_and_gradients(loss: str) -> None:
    elbo, old, adv = _case()
    per_pair = policy_loss_per_pair(elbo, old, adv, loss)  # type: ignore[arg-type]
    values, grads = HAND[loss]
    torch.testing.assert_close(per_pair, torch.tensor(values, dtype=torch.float64))
    total, _ = elbo_policy_loss(elbo, old, adv, LossConfig(loss=loss, beta=0.0), TWO_PAIRS)  # type: ignore[arg-type]
    assert total.item() == pytest.approx(sum(values) / 2)
    total.backward()
    torch.testing.assert_close(elbo.grad, torch.tensor(grads, dtype=torch.float64) / 2)


@pytest.mark.parametrize(
    "loss", ["epg", "pepg", "par", "grpo", "epg_noratio", "pepg_noratio", "par_noratio"]
)
def test_at_ratio_one_the_gradient_is_reinforce(loss: str) -> None:
    """With E = E_old (ratio 1, l = 0) every loss's gradient is -A dE / (N K)."""
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    theta = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    adv = torch.randn(5, generator=gen, dtype=torch.float64)
    elbo = features @ theta  # E(theta), (5,)
    normalizer = GlobalNormalizer(num_samples=5, num_timesteps=2)
    total, metrics = elbo_policy_loss(
        elbo, elbo.detach(), adv, LossConfig(loss=loss, beta=0.0), normalizer
    )  # type: ignore[arg-type]
    total.backward()
    reinforce = -(adv @ features) / normalizer.num_pairs  # -sum_i A_i dE_i / (N K)
    torch.testing.assert_close(theta.grad, reinforce)
    assert metrics["learner/ratio_mean"] == pytest.approx(1.0)
    assert metrics["learner/clip_frac"] == 0.0


@pytest.mark.parametrize(
    ("log_ratio", "adv", "clipped"),
    [
        (0.01, 1.0, True),  # A > 0, r > 1 + eps: no gain from pushing r further up
        (-0.01, 1.0, False),  # A > 0, r < 1 - eps: still pulled up
        (-0.01, -1.0, True),  # A < 0, r < 1 - eps: no gain from pushing r further down
        (0.01, -1.0, False),  # A < 0, r > 1 + eps: still pushed down
        (0.0005, 1.0, False),  # inside the trust region
    ],
)
def test_grpo_clips_where_it_should(log_ratio: float, adv: float, clipped: bool) -> None:
    lr = torch.tensor([log_ratio], dtype=torch.float64, requires_grad=True)
    loss = clipped_surrogate(lr, torch.tensor([adv], dtype=torch.float64), 1e-3, 5.0)
    loss.sum().backward()
    r = math.exp(log_ratio)
    assert lr.grad is not None
    if clipped:
        bound = 1.0 + 1e-3 if log_ratio > 0 else 1.0 - 1e-3
        assert loss.item() == pytest.approx(-adv * bound)
        assert lr.grad.item() == 0.0
    else:
        assert loss.item() == pytest.approx(-adv * r)
        assert lr.grad.item() == pytest.approx(-adv * r)  # d(-A e^lr)/dlr


def test_grpo_clamps_the_advantage_to_five() -> None:
    lr = torch.zeros(2, dtype=torch.float64)
    loss = clipped_surrogate(lr, torch.tensor([12.0, -7.0], dtype=torch.float64), 1e-3, 5.0)
    torch.testing.assert_close(loss, torch.tensor([-5.0, 5.0], dtype=torch.float64))


def test_grpo_metrics_count_clipped_pairs() -> None:
    elbo, old, adv = _case()
    _, metrics = elbo_policy_loss(elbo, old, adv, LossConfig(loss="grpo", beta=0.0), TWO_PAIRS)
    assert metrics["learner/clip_frac"] == 1.0
    assert metrics["learner/ratio_max"] == pytest.approx(R1)
    assert metrics["learner/ratio_min"] == pytest.approx(R2)
    assert metrics["learner/ratio_mean"] == pytest.approx((R1 + R2) / 2)
    assert metrics["learner/ratio_std"] == pytest.approx(abs(R1 - R2) / 2)
    assert metrics["learner/log_ratio_abs_mean"] == pytest.approx(0.15)
    assert metrics["learner/elbo_mean"] == pytest.approx(-1.5)
    assert metrics["learner/elbo_old_mean"] == pytest.approx(-1.55)
    assert metrics["learner/num_pairs"] == 2.0


def test_girsanov_kl_and_beta_weighting() -> None:
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[0.0, 0.0], [1.0, 3.0]], dtype=torch.float64, requires_grad=True)
    kl = girsanov_kl_per_pair(pred, ref)
    torch.testing.assert_close(kl, torch.tensor([2.5, 5.0], dtype=torch.float64))
    elbo, old, adv = _case()
    config = LossConfig(loss="epg_noratio", beta=0.1)
    total, metrics = elbo_policy_loss(elbo, old, adv, config, TWO_PAIRS, kl=kl)
    assert total.item() == pytest.approx((0.5 - 0.6 + 0.1 * 7.5) / 2)
    assert metrics["learner/kl_mean"] == pytest.approx(3.75)
    total.backward()
    assert ref.grad is None  # the reference is a constant
    assert pred.grad is not None
    torch.testing.assert_close(pred.grad[0], 0.1 * torch.tensor([1.0, 2.0]).double() / 2)


def test_the_loss_is_a_sum_over_pairs_divided_by_the_global_count() -> None:
    """Halves of a batch with the global normaliser sum to the whole (the rank-split contract)."""
    elbo, old, adv = _case()
    normalizer = GlobalNormalizer(num_samples=2, num_timesteps=3)
    config = LossConfig(loss="pepg", beta=0.0)
    whole, _ = elbo_policy_loss(elbo, old, adv, config, normalizer)
    halves = [
        elbo_policy_loss(elbo[i : i + 1], old[i : i + 1], adv[i : i + 1], config, normalizer)[0]
        for i in range(2)
    ]
    assert (halves[0] + halves[1]).item() == pytest.approx(whole.item())
    assert normalizer.num_pairs == 6


def test_config_and_argument_errors() -> None:
    with pytest.raises(ValueError, match="unknown policy loss"):
        LossConfig(loss="ppo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not valid for velocity"):
        LossConfig(weighting="epsilon_mse")
    with pytest.raises(ValueError, match="not valid for epsilon"):
        LossConfig(weighting="velocity_mse", prediction="epsilon")
    for field in ("clip_eps", "adv_clip_max", "cfg_scale"):
        with pytest.raises(ValueError, match=field):
            LossConfig(**{field: 0.0})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="beta"):
        LossConfig(beta=-1.0)
    with pytest.raises(ValueError, match="num_samples"):
        GlobalNormalizer(0, 1)
    elbo, old, adv = _case()
    with pytest.raises(ValueError, match="kl must be given"):
        elbo_policy_loss(elbo, old, adv, LossConfig(beta=1e-4), TWO_PAIRS)
    with pytest.raises(ValueError, match="share one"):
        policy_loss_per_pair(elbo, old[:1], adv, "epg")
