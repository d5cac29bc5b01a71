"""Tests for algo.samplers: grids, ODE steps against diffusers, the Flow-GRPO SDE step."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
    FlowMatchEulerDiscreteScheduler,
)
from torch import Tensor

from algo.samplers import (
    GRIDS,
    diffusers_flow_timesteps,
    dpm2_step,
    euler_step,
    flow_timesteps,
    sample,
    sde_step,
)
from common.config import SamplingConfig

pytestmark = pytest.mark.unit

VelocityFn = Callable[[Tensor, Tensor], Tensor]
SHAPES = [(3, 4, 5), (2, 3, 2, 4, 3)]  # rank 3 and rank 5


def _dims(x: Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


def _linear_velocity(shape: tuple[int, ...], seed: int = 0) -> VelocityFn:
    """A fixed random affine map of the flattened state whose scale depends on t."""
    g = torch.Generator().manual_seed(seed)
    d = math.prod(shape[1:])
    w = torch.randn(d, d, generator=g) / math.sqrt(d)
    b = torch.randn(d, generator=g)

    def fn(x: Tensor, t: Tensor) -> Tensor:
        assert t.shape == (x.shape[0],)
        flat = x.reshape(x.shape[0], -1) @ w.T.to(x.dtype) + b.to(x.dtype)
        return (flat * (0.5 + t[:, None])).reshape(x.shape)

    return fn


def _gaussian_velocity(mu: float, s: float) -> VelocityFn:
    """Exact velocity E[eps - x0 | x_t] for data x0 ~ N(mu, s^2 I).

    With a = 1 - t and var = a^2 s^2 + t^2 (the variance of x_t):
    E[x0 | x_t] = mu + a s^2 / var (x - a mu), E[eps | x_t] = t / var (x - a mu).
    The ODE flow is then x_t = a mu + sqrt(var) z, so noise z maps exactly to mu + s z.
    """

    def fn(x: Tensor, t: Tensor) -> Tensor:
        tt = t.view(-1, *([1] * (x.ndim - 1)))
        a = 1.0 - tt
        var = a**2 * s**2 + tt**2
        return (tt - a * s**2) / var * (x - a * mu) - mu

    return fn


def _run_diffusers(scheduler: object, fn: VelocityFn, noise: Tensor, sigmas: Tensor) -> Tensor:
    x = noise
    for i, t in enumerate(scheduler.timesteps):  # type: ignore[attr-defined]
        v = fn(x, sigmas[i].repeat(x.shape[0]))
        x = scheduler.step(v, t, x, return_dict=False)[0]  # type: ignore[attr-defined]
    return x


# --- flow_timesteps -----------------------------------------------------------------------


@pytest.mark.parametrize("shift", [1.0, 0.3, 3.0, 7.5])
def test_flow_timesteps_endpoints_and_monotone(shift: float) -> None:
    ts = flow_timesteps(10, shift)
    assert ts.shape == (11,) and ts.dtype == torch.float32
    assert ts[0].item() == 1.0 and ts[-1].item() == 0.0
    assert bool((ts[1:] < ts[:-1]).all())


def test_flow_timesteps_shift_formula() -> None:
    base = flow_timesteps(8, 1.0, dtype=torch.float64)
    torch.testing.assert_close(base, torch.linspace(1, 0, 9, dtype=torch.float64))
    shifted = flow_timesteps(8, 3.0, dtype=torch.float64)
    torch.testing.assert_close(shifted, 3 * base / (1 + 2 * base))
    assert bool((shifted[1:-1] > base[1:-1]).all())  # shift > 1 spends more steps at high noise


def test_flow_timesteps_matches_diffusers_shift() -> None:
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=torch.linspace(1, 0, 11)[:-1].tolist())
    torch.testing.assert_close(sched.sigmas, flow_timesteps(10, 3.0), atol=1e-7, rtol=0)


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
@pytest.mark.parametrize("num_steps", [1, 4, 10, 28])
def test_the_diffusers_grid_is_the_schedulers_default_bit_for_bit(
    num_steps: int, shift: float
) -> None:
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(num_steps)
    assert torch.equal(diffusers_flow_timesteps(num_steps, shift), sched.sigmas)
    assert torch.equal(GRIDS.get("diffusers")(num_steps, shift), sched.sigmas)


def test_the_diffusers_grid_shifts_its_low_end_twice() -> None:
    """REAL_MODELS.md: 10 steps at shift 3 are 1, .960, ..., .278, .0089, 0 (not 0.25)."""
    grid = diffusers_flow_timesteps(10, 3.0)
    assert grid[1].item() == pytest.approx(0.9601, abs=1e-4)
    assert grid[-2].item() == pytest.approx(0.0089, abs=1e-4) and grid[-1].item() == 0.0
    assert flow_timesteps(10, 3.0)[-2].item() == pytest.approx(0.25)


def test_sampling_on_the_diffusers_grid_is_the_schedulers_euler_loop() -> None:
    shape = SHAPES[0]
    fn = _linear_velocity(shape)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    ref = _run_diffusers(sched, fn, noise, sched.sigmas)
    out = sample(fn, noise, sampler="euler", num_steps=10, shift=3.0, grid="diffusers")
    torch.testing.assert_close(out.timesteps, sched.sigmas, atol=0, rtol=0)
    torch.testing.assert_close(out.x0, ref, atol=1e-5, rtol=1e-5)


def test_an_unknown_grid_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown sigma grid 'karras'.*uniform, diffusers"):
        SamplingConfig(grid="karras")


# --- ODE samplers against diffusers --------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_matches_flow_match_euler_scheduler(shape: tuple[int, ...], shift: float) -> None:
    fn = _linear_velocity(shape)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=torch.linspace(1, 0, 11)[:-1].tolist())
    ref = _run_diffusers(sched, fn, noise, sched.sigmas)
    out = sample(fn, noise, sampler="euler", num_steps=10, shift=shift)
    assert out.x0.shape == shape and out.trajectory is None and out.log_probs is None
    torch.testing.assert_close(out.x0, ref, atol=1e-5, rtol=1e-5)


def _dpm_scheduler(shift: float) -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(
        solver_order=2,
        prediction_type="flow_prediction",
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        use_flow_sigmas=True,
        flow_shift=shift,
        lower_order_final=True,
        final_sigmas_type="zero",
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_dpm2_sample_matches_dpmsolver_scheduler(shape: tuple[int, ...], shift: float) -> None:
    """Full 10-step sample on our grid.

    diffusers' flow grid starts at 1 - 1/num_train_timesteps and no flag makes it start at 1,
    so its sigma table is replaced by ours; step() reads sigmas only through that table.
    """
    fn = _linear_velocity(shape)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    sched = _dpm_scheduler(shift)
    sched.set_timesteps(10)
    sched.sigmas = flow_timesteps(10, shift)
    ref = _run_diffusers(sched, fn, noise, sched.sigmas)
    out = sample(fn, noise, sampler="dpm2", num_steps=10, shift=shift)
    torch.testing.assert_close(out.x0, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_dpm2_step_matches_dpmsolver_on_its_native_grid(shape: tuple[int, ...]) -> None:
    """diffusers' own grid (sigma_max = 0.999) makes step 1 a true second-order step."""
    fn = _linear_velocity(shape, seed=3)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    sched = _dpm_scheduler(3.0)
    sched.set_timesteps(10)
    sigmas = sched.sigmas.clone()
    assert sigmas[0].item() < 1.0
    ref = _run_diffusers(sched, fn, noise, sigmas)
    x, state = noise, None
    for i in range(10):
        v = fn(x, sigmas[i].repeat(x.shape[0]))
        x, state = dpm2_step(x, v, sigmas[i], sigmas[i + 1], state)
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=1e-5)


def test_dpm2_first_order_step_is_euler() -> None:
    x, v = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    for sigma, sigma_next in [(1.0, 0.7), (0.6, 0.3), (0.4, 0.0)]:
        got, (x0_hat, s) = dpm2_step(x, v, sigma, sigma_next, None)
        torch.testing.assert_close(got, euler_step(x, v, sigma, sigma_next))
        torch.testing.assert_close(x0_hat, x - sigma * v)
        assert s == sigma


# --- Gaussian data: samplers reach the right distribution ---------------------------------


def test_ode_samplers_transport_gaussian() -> None:
    """Both ODE samplers push N(0, I) towards N(mu, s^2 I); DPM2 much more accurately."""
    mu, s = 1.5, 0.5
    fn = _gaussian_velocity(mu, s)
    noise = torch.randn(4096, 2, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    exact = mu + s * noise  # the exact ODE transport of each noise draw
    max_err, std_err = {}, {}
    for name in ("euler", "dpm2"):
        x0 = sample(fn, noise, sampler=name, num_steps=10).x0
        max_err[name] = (x0 - exact).abs().max().item()
        std_err[name] = abs(x0.std().item() - s)
        assert abs(x0.mean().item() - mu) < 0.02
    # measured: max error euler 0.28, dpm2 0.013; std error euler 0.071, dpm2 0.0054
    assert max_err["dpm2"] < 0.02 and max_err["dpm2"] < 0.1 * max_err["euler"]
    assert std_err["dpm2"] < 0.01 and std_err["dpm2"] < 0.2 * std_err["euler"]
    assert std_err["euler"] < 0.1


def test_sde_sampler_reaches_gaussian() -> None:
    mu, s = -0.5, 0.8
    fn = _gaussian_velocity(mu, s)
    noise = torch.randn(8192, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    out = sample(
        fn, noise, sampler="sde", num_steps=40, eta=0.7, generator=torch.Generator().manual_seed(7)
    )
    assert abs(out.x0.mean().item() - mu) < 0.03
    assert abs(out.x0.std().item() - s) < 0.04


# --- the SDE step ------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("sigma", "sigma_next"), [(1.0, 0.9), (0.6, 0.45), (0.2, 0.0)])
def test_sde_log_prob_is_mean_gaussian_density(
    shape: tuple[int, ...], sigma: float, sigma_next: float
) -> None:
    g = torch.Generator().manual_seed(8)
    x, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    out = sde_step(x, v, sigma, sigma_next, eta=0.7, generator=g)
    assert out.log_prob.shape == (shape[0],)
    expected = torch.distributions.Normal(out.mean, out.std).log_prob(out.prev_sample)
    torch.testing.assert_close(out.log_prob, expected.mean(_dims(x)))
    dt = sigma_next - sigma
    s = 0.7 * math.sqrt(sigma / (1 - (sigma_next if sigma == 1.0 else sigma)))
    torch.testing.assert_close(out.std, torch.tensor(s * math.sqrt(-dt)))
    mean = x * (1 + s**2 / (2 * sigma) * dt) + v * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
    torch.testing.assert_close(out.mean, mean)
    assert bool(torch.isfinite(out.log_prob).all())


def test_sde_step_uses_given_noise() -> None:
    x, v, z = torch.randn(3, 2, 5), torch.randn(3, 2, 5), torch.randn(3, 2, 5)
    out = sde_step(x, v, 0.5, 0.4, noise=z)
    torch.testing.assert_close(out.prev_sample, out.mean + out.std * z)


def test_sde_prev_sample_reproduces_log_prob() -> None:
    g = torch.Generator().manual_seed(9)
    x, v = torch.randn(4, 3, 8, generator=g), torch.randn(4, 3, 8, generator=g)
    drawn = sde_step(x, v, 0.8, 0.7, generator=g)
    again = sde_step(x, v, 0.8, 0.7, prev_sample=drawn.prev_sample)
    assert torch.equal(again.prev_sample, drawn.prev_sample)
    torch.testing.assert_close(again.log_prob, drawn.log_prob, atol=0, rtol=0)
    other = sde_step(x, v + 0.1, 0.8, 0.7, prev_sample=drawn.prev_sample)
    assert not bool(torch.isclose(other.log_prob, drawn.log_prob).any())  # new weights, new density


def test_sde_prev_sample_reproduces_log_prob_in_bf16() -> None:
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 4, 4, generator=g).bfloat16()
    v = torch.randn(2, 4, 4, generator=g).bfloat16()
    drawn = sde_step(x, v, 1.0, 0.9, generator=g)
    assert drawn.prev_sample.dtype == torch.bfloat16 and drawn.log_prob.dtype == torch.float32
    again = sde_step(x, v, 1.0, 0.9, prev_sample=drawn.prev_sample)
    torch.testing.assert_close(again.log_prob, drawn.log_prob, atol=0, rtol=0)


@pytest.mark.parametrize(("sigma", "sigma_next"), [(1.0, 0.9), (0.5, 0.3), (0.1, 0.0)])
def test_sde_eta_zero_is_euler_exactly(sigma: float, sigma_next: float) -> None:
    x, v = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    out = sde_step(x, v, sigma, sigma_next, eta=0.0)
    assert torch.equal(out.prev_sample, euler_step(x, v, sigma, sigma_next))
    assert torch.equal(out.log_prob, torch.zeros(3))


def test_sde_eta_zero_sample_is_euler_sample() -> None:
    fn = _linear_velocity((2, 3, 4))
    noise = torch.randn(2, 3, 4)
    sde = sample(fn, noise, sampler="sde", eta=0.0)
    euler = sample(fn, noise, sampler="euler", return_trajectory=True)
    assert sde.trajectory is not None and euler.trajectory is not None
    assert torch.equal(sde.trajectory, euler.trajectory)


def test_sde_log_prob_gradient_flows_through_v() -> None:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 4, 2, generator=g)
    y = sde_step(x, torch.randn(3, 4, 2, generator=g), 0.7, 0.6, generator=g).prev_sample
    v = torch.randn(3, 4, 2, generator=g, requires_grad=True)
    stored = y.clone().requires_grad_(True)
    out = sde_step(x, v, 0.7, 0.6, prev_sample=stored)
    out.log_prob.sum().backward()
    assert v.grad is not None and bool((v.grad.abs().sum(dim=(1, 2)) > 0).all())
    assert stored.grad is None  # the stored sample is data, not a function of the weights
    # d log_prob / d v = (y - mu) / std^2 * d mu / d v, averaged over the 8 elements
    s = 0.7 * math.sqrt(0.7 / 0.3)
    dmu_dv = (1 + s**2 * 0.3 / 1.4) * -0.1
    expected = (y - out.mean.detach()) / out.std.detach() ** 2 * dmu_dv / 8
    torch.testing.assert_close(v.grad, expected)


def test_sde_per_sample_sigmas_match_scalar_calls() -> None:
    x, v, z = torch.randn(3, 5, 2), torch.randn(3, 5, 2), torch.randn(3, 5, 2)
    sigma, sigma_next = torch.tensor([1.0, 0.6, 0.3]), torch.tensor([0.8, 0.5, 0.0])
    out = sde_step(x, v, sigma, sigma_next, noise=z)
    assert out.std.shape == (3, 1, 1)
    for i in range(3):
        one = sde_step(
            x[i : i + 1], v[i : i + 1], sigma[i].item(), sigma_next[i].item(), noise=z[i : i + 1]
        )
        torch.testing.assert_close(out.prev_sample[i : i + 1], one.prev_sample)
        torch.testing.assert_close(out.log_prob[i : i + 1], one.log_prob)


def test_sample_sde_outputs_and_generator() -> None:
    fn = _linear_velocity((2, 3, 4))
    noise = torch.randn(2, 3, 4)
    a = sample(fn, noise, sampler="sde", num_steps=6, generator=torch.Generator().manual_seed(0))
    b = sample(fn, noise, sampler="sde", num_steps=6, generator=torch.Generator().manual_seed(0))
    assert a.trajectory is not None and a.log_probs is not None
    assert a.trajectory.shape == (2, 7, 3, 4) and a.log_probs.shape == (2, 6)
    assert torch.equal(a.trajectory[:, 0], noise) and torch.equal(a.trajectory[:, -1], a.x0)
    assert torch.equal(a.x0, b.x0)
    # re-scoring the stored trajectory step by step gives the stored log-probs
    for i in range(6):
        x = a.trajectory[:, i]
        v = fn(x, a.timesteps[i].repeat(2))
        lp = sde_step(x, v, a.timesteps[i], a.timesteps[i + 1], prev_sample=a.trajectory[:, i + 1])
        torch.testing.assert_close(lp.log_prob, a.log_probs[:, i])


def test_sample_sde_steps_window() -> None:
    fn = _linear_velocity((2, 3, 4))
    noise = torch.randn(2, 3, 4)
    out = sample(
        fn,
        noise,
        sampler="sde",
        num_steps=6,
        sde_steps=2,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.log_probs is not None and out.log_probs.shape == (2, 2)
    assert out.trajectory is not None
    x, ts = out.trajectory, out.timesteps
    for i in range(2, 6):
        step = euler_step(x[:, i], fn(x[:, i], ts[i].repeat(2)), ts[i], ts[i + 1])
        torch.testing.assert_close(x[:, i + 1], step)


def test_sample_trajectory_and_dtype() -> None:
    fn = _linear_velocity((2, 3, 2, 2))
    noise = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    out = sample(fn, noise, sampler="dpm2", num_steps=4, return_trajectory=True)
    assert out.trajectory is not None and out.trajectory.shape == (2, 5, 3, 2, 2)
    assert out.timesteps.dtype == torch.float64 and out.x0.dtype == torch.float64
    assert out.log_probs is None
    assert not out.x0.requires_grad


# --- argument validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sampler": "heun"}, "euler, dpm2, sde"),
        ({"num_steps": 0}, "num_steps"),
        ({"num_steps": 2.5}, "num_steps"),
        ({"eta": -0.1}, "eta"),
        ({"shift": 0.0}, "shift"),
        ({"sampler": "dpm2", "sde_steps": 2}, "sde_steps"),
        ({"sampler": "sde", "sde_steps": 11}, "sde_steps"),
    ],
)
def test_sample_rejects_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sample(_linear_velocity((2, 3)), torch.randn(2, 3), **kwargs)  # type: ignore[arg-type]


def test_sample_rejects_rank1_noise() -> None:
    with pytest.raises(ValueError, match="rank"):
        sample(lambda x, t: x, torch.randn(5))


def test_flow_timesteps_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_steps"):
        flow_timesteps(0)
    with pytest.raises(ValueError, match="shift"):
        flow_timesteps(4, shift=-1.0)


def test_step_functions_reject_bad_arguments() -> None:
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match="shape"):
        euler_step(x, torch.randn(2, 4), 1.0, 0.5)
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        sde_step(x, v, 0.5, 0.5)
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        sde_step(x, v, 1.2, 0.5)
    with pytest.raises(ValueError, match="eta"):
        sde_step(x, v, 0.5, 0.4, eta=-1.0)
    with pytest.raises(ValueError, match="not both"):
        sde_step(x, v, 0.5, 0.4, prev_sample=x, generator=torch.Generator())
    with pytest.raises(ValueError, match="not both"):
        sde_step(x, v, 0.5, 0.4, noise=x, generator=torch.Generator())
    with pytest.raises(ValueError, match="deterministic"):
        sde_step(x, v, 0.5, 0.4, eta=0.0, prev_sample=x)
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        dpm2_step(x, v, 0.3, 0.5, None)
    with pytest.raises(ValueError, match="scalar"):
        dpm2_step(x, v, torch.tensor([0.5, 0.5]), 0.3, None)
    with pytest.raises(ValueError, match="stale"):
        dpm2_step(x, v, 0.5, 0.3, (x, 0.4))
