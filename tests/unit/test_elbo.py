"""ELBO estimators against exact answers (algo/elbo.py).

Exact log-likelihood ratio of two Gaussians (flow matching)
-----------------------------------------------------------
Data ``x0 ~ N(mu, s^2 I_D)``, forward path ``x_t = a x0 + b eps`` with ``a = 1 - t``, ``b = t``.
Then ``x_t ~ N(a mu, V I)``, ``V = a^2 s^2 + b^2``, ``Cov(x0, x_t) = a s^2``, ``Cov(eps, x_t) = b``,
so the posterior means are

    E[x0 | x_t]  = mu + a s^2 (x_t - a mu) / V,      E[eps | x_t] = b (x_t - a mu) / V,

and the flow-matching optimum ``v* = argmin E||v - (eps - x0)||^2 = E[eps - x0 | x_t]`` is

    v*(x_t, t) = (b - a s^2) (x_t - a mu) / V - mu.                                   (1)

The continuous-time ELBO of a Gaussian diffusion (Kingma et al. 2021, VDM, eq. 17) is

    log p(x0) >= -1/2 int_0^1 (-d lambda/dt) E_eps ||eps - eps_hat(x_t, t)||^2 dt + c(x0),

``lambda = log SNR = log(a^2 / b^2)``; ``c(x0)`` (prior and reconstruction terms, both divergent
in the limit) depends only on the forward process, so it is the *same* for any two models that
share it and cancels in a difference. The bound is an equality when ``eps_hat`` is the exact
posterior mean of the data distribution: the gap is the KL between the forward path posterior and
the model's, zero when the model's reverse process is the exact time reversal. For the flow path
``-d lambda/dt = 2 / (t (1 - t))`` and, from ``eps = x_t + (1 - t) v``,
``eps - eps_hat = (1 - t)(u - v)`` with ``u = eps - x0``. The integrand becomes

    -1/2 * 2 / (t (1 - t)) * (1 - t)^2 ||u - v||^2 = -((1 - t) / t) ||u - v||^2,

which is the ``exact`` weighting, *summed* over the D dims (``reduction="sum"``) with offset 0.
Hence, with t ~ U(0, 1] and eps ~ N(0, I) **shared** between the two optimal models,

    log N(x0; mu1, s1^2) - log N(x0; mu2, s2^2) = E[(1 - t)/t (||u - v2*||^2 - ||u - v1*||^2)].

The difference integrand is finite: as t -> 0 both ``v_i* = -x0 + O(t)``, so ``v1* - v2* = O(t)``
cancels the 1/t and the shared estimator has finite variance. Each term *alone* behaves like
``||eps||^2 / t``: with independent draws the variance is infinite at offset 0, and about
``2 D (D + 2) / offset`` with the code's default offset 1e-3.

MC bound tested: for each of 4 points, the mean of n = 50,000 shared draws is within 4.5 standard
errors of the exact value (SE = sample std / sqrt(n), asserted < 0.03 nats, ~1-2 % of the values;
the false-failure probability under a normal approximation is < 4 * 7e-6; the draws are seeded).

VP (epsilon) form: the same identity with ``x_t = alpha x0 + sigma eps`` (cosine schedule),
``E[eps | x_t] = sigma (x_t - alpha mu) / (alpha^2 s^2 + sigma^2)`` and the VDM weight
``1/2 (-d lambda / dt) = pi / sin(pi t)``. Near t = 0, sigma ~ pi t / 2 so the model difference is
O(t) against a 1/t weight (finite variance); near t = 1 it is O(1 - t) against 1/(1 - t).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from algo.elbo import (
    CosineVpSchedule,
    LinearVpSchedule,
    flow_elbo,
    flow_elbo_from_velocity,
    flow_noise_draw,
    logit_normal_icdf,
    sample_timesteps,
    select_sampler_timesteps,
    vp_elbo,
    vp_elbo_from_epsilon,
    vp_noise_draw,
)
from algo.samplers import flow_timesteps

pytestmark = pytest.mark.unit

D = 4
GAUSS_1 = (0.5, 0.8)  # (mu, s)
GAUSS_2 = (-0.3, 1.3)
POINTS = torch.tensor(
    [[0.1, -0.4, 1.2, 0.3], [0.5, 0.5, 0.5, 0.5], [-1.5, 0.2, 0.0, 2.0], [1.0, -1.0, 0.7, -0.2]],
    dtype=torch.float64,
)
N_DRAWS = 50_000


def _log_normal(x: Tensor, mu: float, s: float) -> Tensor:
    return (-0.5 * ((x - mu) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)).sum(-1)


def _optimal_velocity(mu: float, s: float):
    """Eq. (1) of the module docstring, as a model callable."""

    def model(x_t: Tensor, t: Tensor, cond: object) -> Tensor:
        a, b = (1 - t).view(-1, 1), t.view(-1, 1)
        var = a * a * s * s + b * b
        return (b - a * s * s) * (x_t - a * mu) / var - mu

    return model


def _optimal_epsilon(mu: float, s: float, schedule: CosineVpSchedule):
    def model(x_t: Tensor, t: Tensor, cond: object) -> Tensor:
        alpha, sigma = schedule.alpha_sigma(t.view(-1, 1))
        return sigma * (x_t - alpha * mu) / (alpha * alpha * s * s + sigma * sigma)

    return model


def _repeated_points() -> Tensor:
    return POINTS.repeat_interleave(N_DRAWS, dim=0)  # (P * n, D)


def _flow_elbo_draws(model, x0: Tensor, gen: torch.Generator, offset: float) -> Tensor:
    t = sample_timesteps(x0.shape[0], 1, generator=gen, dtype=torch.float64)[:, 0]
    draw = flow_noise_draw(x0, t, generator=gen)
    return flow_elbo(model, x0, None, draw, "exact", reduction="sum", exact_t_offset=offset).elbo


def _assert_within_mc_error(diff: Tensor, truth: Tensor) -> None:
    per_point = diff.view(len(POINTS), N_DRAWS)
    mean, se = per_point.mean(1), per_point.std(1) / math.sqrt(N_DRAWS)
    assert (se < 0.03).all(), se
    assert ((mean - truth).abs() < 4.5 * se).all(), (mean, truth, se)


def test_flow_exact_elbo_difference_is_the_log_likelihood_ratio() -> None:
    gen = torch.Generator().manual_seed(0)
    x0 = _repeated_points()
    t = sample_timesteps(x0.shape[0], 1, generator=gen, dtype=torch.float64)[:, 0]
    draw = flow_noise_draw(x0, t, generator=gen)  # shared by both models
    e1 = flow_elbo(
        _optimal_velocity(*GAUSS_1), x0, None, draw, "exact", reduction="sum", exact_t_offset=0.0
    ).elbo
    e2 = flow_elbo(
        _optimal_velocity(*GAUSS_2), x0, None, draw, "exact", reduction="sum", exact_t_offset=0.0
    ).elbo
    truth = _log_normal(POINTS, *GAUSS_1) - _log_normal(POINTS, *GAUSS_2)
    _assert_within_mc_error(e1 - e2, truth)
    # The code's default offset 1e-3 biases the difference by O(offset log(1/offset)) only.
    e1_off = flow_elbo(_optimal_velocity(*GAUSS_1), x0, None, draw, "exact", reduction="sum").elbo
    e2_off = flow_elbo(_optimal_velocity(*GAUSS_2), x0, None, draw, "exact", reduction="sum").elbo
    bias = ((e1_off - e2_off) - (e1 - e2)).view(len(POINTS), N_DRAWS).mean(1)
    assert (bias.abs() < 0.02).all(), bias


def test_shared_draws_have_far_lower_variance_than_independent_draws() -> None:
    """Measured at the default offset 1e-3 (finite variance): ~2.9e3 x here; asserted > 300 x."""
    gen = torch.Generator().manual_seed(1)
    x0 = POINTS[:1].repeat_interleave(N_DRAWS, dim=0)
    model_1, model_2 = _optimal_velocity(*GAUSS_1), _optimal_velocity(*GAUSS_2)
    t = sample_timesteps(x0.shape[0], 1, generator=gen, dtype=torch.float64)[:, 0]
    draw = flow_noise_draw(x0, t, generator=gen)
    shared = (
        flow_elbo(model_1, x0, None, draw, "exact", reduction="sum").elbo
        - flow_elbo(model_2, x0, None, draw, "exact", reduction="sum").elbo
    )
    independent = _flow_elbo_draws(model_1, x0, gen, 1e-3) - _flow_elbo_draws(
        model_2, x0, gen, 1e-3
    )
    ratio = float(independent.var() / shared.var())
    assert ratio > 300.0, ratio


def test_vp_exact_elbo_difference_is_the_log_likelihood_ratio() -> None:
    schedule = CosineVpSchedule()
    gen = torch.Generator().manual_seed(2)
    x0 = _repeated_points()
    # t in (0, 1): alpha(1) = 0, so drop the endpoint (the integrand is O(1) there: no bias).
    t = sample_timesteps(
        x0.shape[0], 1, icdf=lambda u: u * (1 - 1e-9), generator=gen, dtype=torch.float64
    )[:, 0]
    draw = vp_noise_draw(x0, t, schedule, generator=gen)
    e1 = vp_elbo(
        _optimal_epsilon(*GAUSS_1, schedule), x0, None, draw, schedule, "exact", reduction="sum"
    ).elbo
    e2 = vp_elbo(
        _optimal_epsilon(*GAUSS_2, schedule), x0, None, draw, schedule, "exact", reduction="sum"
    ).elbo
    truth = _log_normal(POINTS, *GAUSS_1) - _log_normal(POINTS, *GAUSS_2)
    _assert_within_mc_error(e1 - e2, truth)


@pytest.mark.parametrize("schedule", [CosineVpSchedule(), LinearVpSchedule()])
def test_vp_schedules_are_variance_preserving_with_the_right_snr_derivative(schedule) -> None:
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64, requires_grad=True)
    alpha, sigma = schedule.alpha_sigma(t)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t))
    log_snr = torch.log(alpha**2 / sigma**2)
    (dlog_snr,) = torch.autograd.grad(log_snr.sum(), t)
    torch.testing.assert_close(schedule.neg_dlogsnr_dt(t.detach()), -dlog_snr)


# ---------------------------------------------------------------- weightings, by hand


def _tiny_flow_case() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x0, eps, v (1, 2) and t = 0.5: x_t = 0.5 x0 + 0.5 eps."""
    x0 = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    eps = torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    v = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    return x0, eps, v, torch.tensor([0.5], dtype=torch.float64)


def test_flow_weightings_match_hand_values() -> None:
    x0, eps, v, t = _tiny_flow_case()
    draw = flow_noise_draw(x0, t, noise=eps)
    # x_t = (0.5, 0.5); x0_hat = x_t - 0.5 v = (0.5, 0.0); err = x0_hat - x0 = (-0.5, 1.0)
    # u = eps - x0 = (-1, 3); v - u = (1, -2)
    mse_x0, mean_abs = (0.25 + 1.0) / 2, (0.5 + 1.0) / 2
    cases = {
        ("adaptive", 1.0): -mse_x0 / mean_abs,
        ("adaptive", 2.0): -mse_x0 / mean_abs / 2.0,
        ("x0_mse", 1.0): -mse_x0,
        ("x0_mse", 2.0): -mse_x0,  # no CFG division
        ("velocity_mse", 1.0): -(1.0 + 4.0) / 2,
        ("velocity_mse", 2.0): -(1.0 + 4.0) / 2 / 4.0,
        ("exact", 1.0): -(0.5 / (0.5 + 1e-3)) * (1.0 + 4.0) / 2,
    }
    for (weighting, cfg), expected in cases.items():
        got = flow_elbo_from_velocity(v, x0, draw, weighting, cfg_scale=cfg)  # type: ignore[arg-type]
        assert got.shape == (1,)
        assert got.item() == pytest.approx(expected, rel=1e-12), (weighting, cfg)
    total = flow_elbo_from_velocity(v, x0, draw, "velocity_mse", reduction="sum")
    assert total.item() == pytest.approx(-5.0)


def test_adaptive_weight_is_a_constant_in_the_gradient() -> None:
    x0, eps, v, t = _tiny_flow_case()
    v.requires_grad_(True)
    draw = flow_noise_draw(x0, t, noise=eps)
    flow_elbo_from_velocity(v, x0, draw, "adaptive").sum().backward()
    err = torch.tensor([[-0.5, 1.0]], dtype=torch.float64)
    weight = err.abs().mean()
    # E = -mean(err^2)/w with err = x_t - t v - x0 -> dE/dv = 2 t err / (D w)
    torch.testing.assert_close(v.grad, 2 * 0.5 * err / (2 * weight))


def test_adaptive_weight_is_clamped() -> None:
    x0, eps, _, t = _tiny_flow_case()
    draw = flow_noise_draw(x0, t, noise=eps)
    v_perfect = (draw.x_t - x0) / 0.5 + 1e-9  # x0_hat within 1e-9 of x0: weight hits 1e-5
    got = flow_elbo_from_velocity(v_perfect, x0, draw, "adaptive")
    assert torch.isfinite(got).all()
    assert got.item() == pytest.approx(-((0.5e-9) ** 2) / 1e-5, rel=1e-6)


def test_vp_weightings_match_hand_values() -> None:
    schedule = CosineVpSchedule()
    x0 = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    eps = torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    eps_hat = torch.tensor([[0.5, 1.0]], dtype=torch.float64)
    t = torch.tensor([0.5], dtype=torch.float64)
    draw = vp_noise_draw(x0, t, schedule, noise=eps)
    c = math.cos(math.pi / 4)  # alpha = sigma = c at t = 1/2
    torch.testing.assert_close(draw.x_t, c * x0 + c * eps)
    err = (draw.x_t - c * eps_hat) / c - x0  # = eps - eps_hat = (-0.5, 1.0)
    torch.testing.assert_close(err, torch.tensor([[-0.5, 1.0]], dtype=torch.float64))
    expected = {
        "adaptive": -(1.25 / 2) / 0.75,
        "x0_mse": -(1.25 / 2),
        "epsilon_mse": -(1.25 / 2),
        "exact": -0.5 * (2 * math.pi / math.sin(math.pi / 2)) * (1.25 / 2),
    }
    for weighting, value in expected.items():
        got = vp_elbo_from_epsilon(eps_hat, x0, draw, schedule, weighting)  # type: ignore[arg-type]
        assert got.item() == pytest.approx(value, rel=1e-12), weighting


@pytest.mark.parametrize("shape", [(3, 5), (3, 2, 4, 4), (3, 2, 2, 3, 3)])
def test_any_rank_reduces_over_all_non_batch_dims(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(shape, generator=gen)
    v = torch.randn(shape, generator=gen)
    draw = flow_noise_draw(x0, torch.full((3,), 0.3), generator=gen)
    for weighting in ("adaptive", "x0_mse", "velocity_mse", "exact"):
        got = flow_elbo_from_velocity(v, x0, draw, weighting)
        flat = flow_elbo_from_velocity(
            v.reshape(3, -1),
            x0.reshape(3, -1),
            flow_noise_draw(x0.reshape(3, -1), draw.t, noise=draw.noise.reshape(3, -1)),
            weighting,
        )
        assert got.shape == (3,)
        torch.testing.assert_close(got, flat)


def test_bf16_inputs_are_scored_in_float32() -> None:
    x0 = torch.randn(2, 3, 4).bfloat16()
    draw = flow_noise_draw(x0, torch.tensor([0.2, 0.9]))
    assert draw.x_t.dtype == torch.bfloat16
    got = flow_elbo_from_velocity(torch.randn(2, 3, 4).bfloat16(), x0, draw)
    assert got.dtype == torch.float32


# ---------------------------------------------------------------- draws and timesteps


def test_flow_draw_is_the_forward_path_and_rejects_bad_t() -> None:
    x0 = torch.randn(2, 3)
    eps = torch.randn(2, 3)
    draw = flow_noise_draw(x0, torch.tensor([1.0, 0.25]), noise=eps)
    torch.testing.assert_close(draw.x_t, torch.stack([eps[0], 0.75 * x0[1] + 0.25 * eps[1]]))
    for bad in ([0.0, 0.5], [0.5, 1.5]):
        with pytest.raises(ValueError, match="t must lie"):
            flow_noise_draw(x0, torch.tensor(bad))
    with pytest.raises(ValueError, match="shape"):
        flow_noise_draw(x0, torch.tensor([0.5]))
    with pytest.raises(ValueError, match="t must lie"):
        vp_noise_draw(x0, torch.tensor([1.0, 0.5]), CosineVpSchedule())


def test_fresh_noise_per_draw() -> None:
    gen = torch.Generator().manual_seed(4)
    x0 = torch.zeros(2, 3)
    t = torch.full((2,), 0.5)
    assert not torch.equal(
        flow_noise_draw(x0, t, generator=gen).noise, flow_noise_draw(x0, t, generator=gen).noise
    )


def test_sampler_timesteps_pick_k_distinct_grid_levels_per_sample() -> None:
    sigmas = flow_timesteps(10)[:-1]  # the 10 levels the sampler evaluated, without 0
    gen = torch.Generator().manual_seed(5)
    idx, t = select_sampler_timesteps(sigmas, num_samples=64, num_timesteps=9, generator=gen)
    assert idx.shape == t.shape == (64, 9)
    torch.testing.assert_close(t, sigmas[idx])
    assert all(len(set(row.tolist())) == 9 for row in idx)
    assert len({tuple(row.tolist()) for row in idx}) > 1  # a fresh permutation per sample
    assert set(idx.flatten().tolist()) == set(range(10))
    with pytest.raises(ValueError, match="sigmas must lie"):
        select_sampler_timesteps(flow_timesteps(10), 4)  # includes sigma = 0
    with pytest.raises(ValueError, match="num_timesteps"):
        select_sampler_timesteps(sigmas, 4, num_timesteps=11)


def test_density_timesteps_stay_in_the_unit_interval() -> None:
    gen = torch.Generator().manual_seed(6)
    uniform = sample_timesteps(1000, 3, generator=gen)
    assert uniform.shape == (1000, 3)
    assert float(uniform.min()) > 0.0 and float(uniform.max()) <= 1.0
    assert float(uniform.mean()) == pytest.approx(0.5, abs=0.03)
    logit = sample_timesteps(1000, 1, icdf=logit_normal_icdf(0.0, 1.0), generator=gen)
    assert float(logit.min()) > 0.0 and float(logit.max()) < 1.0
    assert float(logit.median()) == pytest.approx(0.5, abs=0.05)
    with pytest.raises(ValueError, match="icdf"):
        sample_timesteps(4, 1, icdf=lambda u: u - 1.0)


def test_bad_arguments_raise_value_error() -> None:
    x0, eps, v, t = _tiny_flow_case()
    draw = flow_noise_draw(x0, t, noise=eps)
    with pytest.raises(ValueError, match="weighting"):
        flow_elbo_from_velocity(v, x0, draw, "epsilon_mse")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cfg_scale"):
        flow_elbo_from_velocity(v, x0, draw, cfg_scale=0.0)
    with pytest.raises(ValueError, match="shape"):
        flow_elbo_from_velocity(v[:, :1], x0, draw)
    with pytest.raises(ValueError, match="weighting"):
        vp_elbo_from_epsilon(v, x0, draw, CosineVpSchedule(), "velocity_mse")  # type: ignore[arg-type]
