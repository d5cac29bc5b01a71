"""Flow-matching samplers: stateless step functions and one sampling loop.

Conventions (DESIGN.md section 1): ``t = sigma`` in [0, 1], ``sigma = 1`` is pure noise and
``sigma = 0`` is data, ``x_t = (1 - t) x0 + t eps``, and the model predicts the velocity
``v = eps - x0``, so the implied clean sample is ``x0_hat = x_t - t v``. A velocity function has
the signature ``velocity_fn(x (B, ...), t (B,)) -> v (B, ...)``; conditioning and classifier-free
guidance are closed over by the caller. Tensors may have any rank >= 2 (images, latents, video);
reductions run over ``dims = tuple(range(1, x.ndim))``.

Three samplers:

- ``euler``: the first-order ODE step ``x + (sigma_next - sigma) v``; what
  ``diffusers.FlowMatchEulerDiscreteScheduler`` does.
- ``dpm2``: DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095) in the flow-matching
  parameterisation ``alpha = 1 - sigma``; what ``DPMSolverMultistepScheduler(use_flow_sigmas=True,
  prediction_type="flow_prediction", algorithm_type="dpmsolver++", solver_order=2)`` does. The
  paper's training sampler: ELBO training needs only the final sample, so the fastest
  deterministic solver wins.
- ``sde``: the Flow-GRPO SDE (Liu et al. 2025, arXiv 2505.05470) with a Gaussian log-prob per
  step, the trajectory-likelihood baseline the paper compares against.

Written from the equations; the reference points were ``yifan123/flow_grpo``
(``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``) for the SDE step and
``jaemoo-choi/rethinking-diffusion-rl`` (``src/diffusers_patch/solver.py``) for DPM2.

All step math runs in at least float32 (bf16 latents are upcast, as both references do), and each
step returns its new state in the input dtype.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from algo.registry import Registry
from algo.vp import trailing_flow_grid

VelocityFn = Callable[[Tensor, Tensor], Tensor]
DpmState = tuple[Tensor, float]
"""State carried between ``dpm2_step`` calls: ``(x0_hat, sigma)`` of the previous step, where
``x0_hat = x - sigma v`` (B, ...) is kept in the compute dtype and ``sigma`` is a Python float."""

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def flow_timesteps(
    num_steps: int,
    shift: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The sampling grid: ``num_steps + 1`` sigmas from 1 down to 0.

    ``s_i = 1 - i / num_steps``, then SD3's resolution shift ``s' = shift s / (1 + (shift - 1) s)``
    (Esser et al. 2024), which for ``shift > 1`` spends more steps at high noise. The shift maps
    1 to 1 and 0 to 0; the endpoints are pinned exactly after the arithmetic because the samplers
    special-case ``sigma == 1`` (the SDE's noise scale) and ``sigma_next == 0`` (DPM2's final
    first-order step), and rounding (e.g. ``1 + (0.1 - 1) != 0.1``) must not switch those off.

    The shift is computed in float64 and cast to ``dtype`` once, as diffusers does.
    Returns a (num_steps + 1,) tensor, strictly decreasing.
    """
    _check_num_steps(num_steps)
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    s = shift * s / (1.0 + (shift - 1.0) * s)
    s[0], s[-1] = 1.0, 0.0
    return s.to(device=device, dtype=dtype)


def diffusers_flow_timesteps(
    num_steps: int,
    shift: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    num_train_timesteps: int = 1000,
) -> Tensor:
    """The default grid of diffusers' ``FlowMatchEulerDiscreteScheduler`` (static shift).

    What ``StableDiffusion3Pipeline`` and flow_grpo sample on, and the paper's SD3.5 runs: the
    scheduler's training sigmas ``k / T`` (k = 1..T) are shifted once to find ``sigma_min``;
    ``num_steps`` levels are spaced linearly from 1 to ``sigma_min``, shifted again, and a final
    0 is appended. (The low end is shifted twice, so this is not ``flow_timesteps``: for 10
    steps at shift 3 it gives 1, .960, .913, ..., .278, .0089, 0.) Computed with the
    scheduler's own float32/float64 steps, so the values are its values bit for bit.
    """
    _check_num_steps(num_steps)
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    first = torch.tensor([1.0], dtype=torch.float32) / num_train_timesteps
    sigma_min = float((shift * first / (1 + (shift - 1) * first)).item())
    s = _np_linspace(1.0 * num_train_timesteps, sigma_min * num_train_timesteps, num_steps)
    s = s / num_train_timesteps
    s = shift * s / (1 + (shift - 1) * s)
    grid = torch.cat([s.to(torch.float32), torch.zeros(1)])
    return grid.to(device=device, dtype=dtype)


def _np_linspace(start: float, stop: float, num: int) -> Tensor:
    """float64 ``numpy.linspace(start, stop, num)`` to the bit: ``start + i * step``, the last
    value pinned to ``stop`` (torch's linspace rounds differently)."""
    if num == 1:
        return torch.tensor([start], dtype=torch.float64)
    step = (stop - start) / (num - 1)
    out = torch.arange(num, dtype=torch.float64) * step + start
    out[-1] = stop
    return out


GridFn = Callable[..., Tensor]
GRIDS: Registry[GridFn] = Registry("sigma grid", "sampling.grid")
"""Sigma grids by name: ``(num_steps, shift, device=, dtype=) -> (num_steps + 1,)`` from 1 to 0."""
GRIDS.add("uniform", flow_timesteps)
GRIDS.add("diffusers", diffusers_flow_timesteps)
GRIDS.add("sd_trailing", trailing_flow_grid)  # VP models (SD1.5/SD2) in the flow view


def euler_step(x: Tensor, v: Tensor, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
    """One Euler step of the probability-flow ODE ``dx/dsigma = v``: ``x + (sigma_next - sigma) v``.

    ``sigma`` and ``sigma_next`` are floats, 0-d tensors, or (B,) tensors (one sigma per sample).
    Returns the new state (B, ...) in ``x.dtype``.
    """
    _check_like("v", v, x)
    dtype = _compute_dtype(x)
    s, s_next = _as_coeff(sigma, x, dtype), _as_coeff(sigma_next, x, dtype)
    return (x.to(dtype) + (s_next - s) * v.to(dtype)).to(x.dtype)


def dpm2_step(
    x: Tensor,
    v: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    prev: DpmState | None,
) -> tuple[Tensor, DpmState]:
    """One DPM-Solver++(2M) step for flow matching; returns ``(x_next, state)``.

    With ``alpha = 1 - sigma``, the log-SNR ``lambda = log(alpha / sigma)``, the data prediction
    ``x0_hat = x - sigma v`` and ``h = lambda_next - lambda``, DPM-Solver++ integrates the ODE
    exactly in the linear part and approximates ``x0_hat`` as a polynomial in lambda:

        x_next = (sigma_next / sigma) x + alpha_next (1 - e^{-h}) D
        D = x0_hat                                          (first order)
        D = x0_hat + (h / (2 h_prev)) (x0_hat - x0_hat_prev)  (second order, multistep)

    where ``h_prev = lambda - lambda_prev``. ``alpha_next (1 - e^{-h})`` is evaluated as
    ``alpha_next - sigma_next alpha / sigma``, which stays finite at sigma = 1 (lambda = -inf) and
    sigma_next = 0 (lambda = +inf). The first-order step is algebraically the Euler step.

    The step is first-order when (as diffusers' ``DPMSolverMultistepScheduler`` does):
    - ``prev is None`` (the first step: there is no earlier x0_hat);
    - ``sigma_next == 0`` (``lower_order_final``: h is infinite, and the step lands on x0_hat);
    - the previous sigma was 1: lambda_prev = -inf, so ``h / h_prev = 0`` and the correction
      vanishes (the limit diffusers computes too). On a grid that starts at sigma = 1, steps 0 and
      1 are therefore both first-order.

    Args:
        x: the state at ``sigma`` (B, ...).
        v: the velocity at ``(x, sigma)`` (B, ...).
        sigma, sigma_next: scalars (float or one-element tensor), ``0 <= sigma_next < sigma <= 1``.
        prev: ``None`` on the first step, else the state returned by the previous call.

    Returns:
        ``x_next`` (B, ...) in ``x.dtype`` and the state ``(x0_hat, sigma)`` for the next call.
    """
    _check_like("v", v, x)
    s, s_next = _as_scalar("sigma", sigma), _as_scalar("sigma_next", sigma_next)
    if not 0.0 <= s_next < s <= 1.0:
        raise ValueError(f"need 0 <= sigma_next < sigma <= 1, got sigma={s}, sigma_next={s_next}")
    dtype = _compute_dtype(x)
    x_c = x.to(dtype)
    x0_hat = x_c - s * v.to(dtype)
    d = x0_hat
    if prev is not None:
        x0_prev, s_prev = prev
        _check_like("prev x0_hat", x0_prev, x)
        if not s_prev > s:
            raise ValueError(f"prev sigma must be > sigma (got {s_prev} <= {s}): state is stale")
        if s_next > 0.0 and s_prev < 1.0:
            h = _log_snr(s_next) - _log_snr(s)
            h_prev = _log_snr(s) - _log_snr(s_prev)
            d = x0_hat + (0.5 * h / h_prev) * (x0_hat - x0_prev.to(dtype))
    coeff = (1.0 - s_next) - s_next * (1.0 - s) / s
    x_next = (s_next / s) * x_c + coeff * d
    return x_next.to(x.dtype), (x0_hat, s)


@dataclass
class SdeStepOutput:
    """Result of one Flow-GRPO SDE step.

    Attributes:
        prev_sample: the next state x_{sigma_next} (B, ...) in the input dtype (drawn, or the one
            passed in).
        log_prob: Gaussian log-density of ``prev_sample`` per element, averaged over all non-batch
            dims (B,), in the compute dtype; differentiable w.r.t. ``v`` (and ``x``).
        mean: the transition mean mu (B, ...), compute dtype.
        std: the transition standard deviation ``s sqrt(-dt)``, broadcastable to ``mean``
            (0-d for a scalar sigma, (B, 1, ..., 1) for per-sample sigmas).
    """

    prev_sample: Tensor
    log_prob: Tensor
    mean: Tensor
    std: Tensor


def sde_step(
    x: Tensor,
    v: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    eta: float = 0.7,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SdeStepOutput:
    """One Euler-Maruyama step of the Flow-GRPO reverse SDE, with its Gaussian log-prob.

    The SDE with the same marginals as the ODE, noise scale ``s(sigma)``, the score
    ``-(x + (1 - sigma) v) / sigma`` and ``dt = sigma_next - sigma < 0`` gives

        mu  = x (1 + s^2 / (2 sigma) dt) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt
        std = s sqrt(-dt),   s = eta sqrt(sigma / (1 - sigma))
        x_next = mu + std z,  z ~ N(0, I)

    **sigma == 1.** ``s`` is infinite there. Like Flow-GRPO, which replaces the ``sigma`` in
    ``1 - sigma`` by the schedule's second entry ``sigmas[1]`` when ``sigma == 1``, we use
    ``s = eta sqrt(1 / (1 - sigma_next))``: a step from sigma = 1 is always the first step of
    the grid, so its ``sigma_next`` *is* ``sigmas[1]``. (The drift stays finite: the
    ``(1 - sigma)`` factor zeroes the v-correction.)

    **log_prob** is the per-element Gaussian log-density
    ``-(x_next - mu)^2 / (2 std^2) - log std - log sqrt(2 pi)``, **averaged** (not summed) over
    all non-batch dims: Flow-GRPO's convention, which keeps ratios ``exp(lp - lp_old)`` at a
    usable scale for any resolution. ``x_next`` is detached, so gradients flow only through mu
    (i.e. through ``v``), which is what the policy-gradient ratio needs.

    With ``prev_sample`` the log-prob of that stored sample is computed (re-evaluating a rollout
    under new weights); otherwise a sample is drawn from ``noise`` (standard normal, x's shape)
    or from ``generator``. The drawn sample is cast to ``x.dtype`` *before* its log-prob is
    taken, so re-evaluating the stored sample later gives the same number.

    ``eta = 0`` is exactly the Euler step; the transition is then a point mass, no noise is
    drawn, ``prev_sample`` must not be given, and ``log_prob`` is returned as zeros (a
    placeholder so loops can stack it; it is not a density).

    ``sigma``, ``sigma_next``: floats, 0-d tensors, or (B,) tensors; ``0 <= sigma_next < sigma
    <= 1`` elementwise.
    """
    _check_sde_args(x, v, sigma, sigma_next, eta, noise, prev_sample, generator)
    dtype = _compute_dtype(x)
    s, s_next = _as_coeff(sigma, x, dtype), _as_coeff(sigma_next, x, dtype)
    dt = s_next - s
    noise_scale = eta * torch.sqrt(s / (1.0 - torch.where(s >= 1.0, s_next, s)))
    x_c, v_c = x.to(dtype), v.to(dtype)
    mean = (
        x_c * (1.0 + noise_scale**2 / (2.0 * s) * dt)
        + v_c * (1.0 + noise_scale**2 * (1.0 - s) / (2.0 * s)) * dt
    )
    std = noise_scale * torch.sqrt(-dt)
    batch = x.shape[0]
    if eta == 0.0:
        zeros = torch.zeros(batch, dtype=dtype, device=x.device)
        return SdeStepOutput(mean.to(x.dtype), zeros, mean, std)
    if prev_sample is None:
        if noise is None:
            # Drawn where the generator lives (a CPU generator gives the same noise on any
            # device), used where x is.
            rng_device = generator.device if generator is not None else x.device
            noise = torch.randn(x.shape, generator=generator, dtype=dtype, device=rng_device)
        prev_sample = (mean + std * noise.to(x.device, dtype)).detach().to(x.dtype)
    y = prev_sample.detach().to(dtype)
    log_density = -((y - mean) ** 2) / (2.0 * std**2) - torch.log(std) - _HALF_LOG_2PI
    log_prob = log_density.mean(dim=tuple(range(1, x.ndim)))
    return SdeStepOutput(prev_sample, log_prob, mean, std)


@dataclass(frozen=True)
class StepContext:
    """What a sampler step may need besides the state: its index and the SDE settings.

    Attributes:
        index: the step number i (0-based) of this call on the grid.
        eta: SDE noise level (stochastic samplers only).
        noisy_steps: stochastic samplers add noise in the first ``noisy_steps`` steps only.
        generator: RNG for the noise of stochastic samplers.
    """

    index: int
    eta: float
    noisy_steps: int
    generator: torch.Generator | None


StepResult = tuple[Tensor, Any, Tensor | None]
"""``(x_next (B, ...), state for the next call, log_prob (B,) or None)``."""


class Sampler(ABC):
    """A solver from sigma = 1 (noise) to 0 (data) that owns its time grid.

    The learner draws its ELBO timesteps from ``timesteps`` too (never its own copy), so a
    sampler with another grid keeps the estimator on the levels the rollouts visited.
    ``stochastic`` samplers draw noise each step and return a per-step log-prob (what the
    trajectory estimator trains on); deterministic ones return ``None`` for it.
    """

    name: ClassVar[str]
    stochastic: ClassVar[bool] = False

    def timesteps(
        self,
        num_steps: int,
        shift: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        grid: str = "uniform",
    ) -> Tensor:
        """The (num_steps + 1,) sigma grid from 1 to 0: the registered ``grid`` (``GRIDS``;
        default ``uniform``, i.e. ``flow_timesteps``). A sampler with a grid of its own
        overrides this."""
        return GRIDS.get(grid)(num_steps, shift, device=device, dtype=dtype)

    def init_state(self) -> Any:
        """The state before the first step (None unless the solver is multistep)."""
        return None

    @abstractmethod
    def step(
        self, x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, state: Any, ctx: StepContext
    ) -> StepResult:
        """One step from ``sigma`` to ``sigma_next`` given the velocity ``v`` at ``(x, sigma)``."""


SAMPLERS: Registry[Sampler] = Registry("sampler", "sampling.sampler")
"""Every sampler by name; ``@register_sampler`` adds one (an instance of the class)."""


def register_sampler(cls: type[Sampler]) -> type[Sampler]:
    """Class decorator: register one instance of a ``Sampler`` subclass under ``cls.name``."""
    SAMPLERS.add(cls.name, cls())
    return cls


def get_sampler(name: str | Sampler) -> Sampler:
    """The registered sampler ``name`` (an instance passes through)."""
    return name if isinstance(name, Sampler) else SAMPLERS.get(name)


@register_sampler
class EulerSampler(Sampler):
    """The first-order probability-flow ODE step (``euler_step``)."""

    name = "euler"

    def step(
        self, x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, state: Any, ctx: StepContext
    ) -> StepResult:
        return euler_step(x, v, sigma, sigma_next), None, None


@register_sampler
class Dpm2Sampler(Sampler):
    """DPM-Solver++(2M) (``dpm2_step``): the paper's training sampler."""

    name = "dpm2"

    def step(
        self, x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, state: Any, ctx: StepContext
    ) -> StepResult:
        x_next, new_state = dpm2_step(x, v, sigma, sigma_next, state)
        return x_next, new_state, None


@register_sampler
class FlowGrpoSdeSampler(Sampler):
    """The Flow-GRPO SDE (``sde_step``) for the first ``noisy_steps`` steps, Euler after."""

    name = "sde"
    stochastic = True

    def step(
        self, x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, state: Any, ctx: StepContext
    ) -> StepResult:
        if ctx.index >= ctx.noisy_steps:
            return euler_step(x, v, sigma, sigma_next), None, None
        out = sde_step(x, v, sigma, sigma_next, eta=ctx.eta, generator=ctx.generator)
        return out.prev_sample, None, out.log_prob


@dataclass
class SampleOutput:
    """Result of ``sample``.

    Attributes:
        x0: the final sample (B, ...), in the noise's dtype.
        timesteps: the sigma grid used, (S + 1,), from 1 to 0.
        trajectory: all states x_{t_0} = noise, ..., x_{t_S} = x0 as (B, S + 1, ...), when
            ``return_trajectory`` or the sampler is stochastic; else None.
        log_probs: per-step log-probs (B, N) for the N stochastic steps (N = S, or
            ``sde_steps``), stochastic samplers only; else None.
    """

    x0: Tensor
    timesteps: Tensor
    trajectory: Tensor | None
    log_probs: Tensor | None


def sample(
    velocity_fn: VelocityFn,
    noise: Tensor,
    *,
    sampler: str | Sampler = "dpm2",
    num_steps: int = 10,
    shift: float = 1.0,
    eta: float = 0.7,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
    sde_steps: int | None = None,
    grid: str = "uniform",
) -> SampleOutput:
    """Integrate from ``noise`` (at sigma = 1) to a sample (at sigma = 0) on the sampler's grid.

    Runs under ``torch.no_grad()``. ``velocity_fn`` gets the state in the noise's dtype and
    ``t`` as a (B,) tensor in the grid's dtype (float32, or float64 for float64 noise).

    Args:
        velocity_fn: ``(x (B, ...), t (B,)) -> v (B, ...)``.
        noise: the initial state x_1 (B, ...), any rank >= 2.
        sampler: a registered name (``"euler"``, ``"dpm2"`` (default), ``"sde"``, ...) or a
            ``Sampler``.
        num_steps: S, the number of velocity evaluations.
        shift: SD3 resolution shift of the grid (see ``flow_timesteps``).
        eta: SDE noise level (stochastic samplers only); 0 gives the Euler ODE.
        generator: RNG for the SDE noise.
        return_trajectory: also return every intermediate state (always on when stochastic).
        sde_steps: stochastic samplers only: add noise in the first ``sde_steps`` steps and
            take Euler steps after them (``log_probs`` then has ``sde_steps`` columns).
        grid: the sigma grid, a name in ``GRIDS`` (``uniform`` or ``diffusers``).
    """
    solver = _check_sample_args(noise, sampler, num_steps, shift, eta, sde_steps)
    timesteps = solver.timesteps(
        num_steps, shift, device=noise.device, dtype=_compute_dtype(noise), grid=grid
    )
    noisy = num_steps if sde_steps is None else sde_steps
    keep = return_trajectory or solver.stochastic
    batch = noise.shape[0]
    x = noise
    states, log_probs = [x], []
    state = solver.init_state()
    with torch.no_grad():
        for i in range(num_steps):
            sigma, sigma_next = timesteps[i], timesteps[i + 1]
            v = velocity_fn(x, sigma.repeat(batch))
            ctx = StepContext(index=i, eta=eta, noisy_steps=noisy, generator=generator)
            x, state, log_prob = solver.step(x, v, sigma, sigma_next, state, ctx)
            if log_prob is not None:
                log_probs.append(log_prob)
            if keep:
                states.append(x)
    return SampleOutput(
        x0=x,
        timesteps=timesteps,
        trajectory=torch.stack(states, dim=1) if keep else None,
        log_probs=torch.stack(log_probs, dim=1) if solver.stochastic else None,
    )


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32, or float64 if ``x`` is float64: low-precision states are upcast for the step."""
    return torch.promote_types(x.dtype, torch.float32)


def _log_snr(sigma: float) -> float:
    """lambda = log(alpha / sigma) with alpha = 1 - sigma (finite for 0 < sigma < 1)."""
    return math.log((1.0 - sigma) / sigma)


def _as_scalar(name: str, sigma: Tensor | float) -> float:
    """A float from a float or a one-element tensor (DPM2's grid is shared by the batch)."""
    if isinstance(sigma, Tensor):
        if sigma.numel() != 1:
            shape = tuple(sigma.shape)
            raise ValueError(f"{name} must be a scalar for dpm2_step, got shape {shape}")
        return float(sigma.item())
    return float(sigma)


def _as_coeff(sigma: Tensor | float, x: Tensor, dtype: torch.dtype) -> Tensor:
    """``sigma`` as a tensor that broadcasts against x: 0-d, or (B, 1, ..., 1) from (B,)."""
    s = torch.as_tensor(sigma, dtype=dtype, device=x.device)
    if s.ndim == 0:
        return s
    if s.shape == (x.shape[0],):
        return s.view(-1, *([1] * (x.ndim - 1)))
    raise ValueError(f"sigma must be a scalar or shape ({x.shape[0]},), got {tuple(s.shape)}")


def _check_like(name: str, t: Tensor, x: Tensor) -> None:
    if t.shape != x.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected x's {tuple(x.shape)}")


def _check_num_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")


def _check_eta(eta: float) -> None:
    if not (math.isfinite(eta) and eta >= 0.0):
        raise ValueError(f"eta must be finite and >= 0, got {eta}")


def _check_sde_args(
    x: Tensor,
    v: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    eta: float,
    noise: Tensor | None,
    prev_sample: Tensor | None,
    generator: torch.Generator | None,
) -> None:
    """Reject inputs for which the SDE transition or its log-prob is undefined or ambiguous."""
    _check_like("v", v, x)
    _check_eta(eta)
    s, s_next = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
    if not bool(((s_next >= 0.0) & (s_next < s) & (s <= 1.0)).all()):
        raise ValueError(
            "need 0 <= sigma_next < sigma <= 1, "
            f"got sigma={s.tolist()}, sigma_next={s_next.tolist()}"
        )
    if prev_sample is not None and (noise is not None or generator is not None):
        raise ValueError("pass prev_sample (to score it) or noise/generator (to draw), not both")
    if noise is not None and generator is not None:
        raise ValueError("pass noise or generator, not both")
    if prev_sample is not None and eta == 0.0:
        raise ValueError("eta = 0 is deterministic: a given prev_sample has no density to score")
    for name, t in (("noise", noise), ("prev_sample", prev_sample)):
        if t is not None:
            _check_like(name, t, x)


def _check_sample_args(
    noise: Tensor,
    sampler: str | Sampler,
    num_steps: int,
    shift: float,
    eta: float,
    sde_steps: int | None,
) -> Sampler:
    """User-facing validation for ``sample``: concise errors rather than silent correction."""
    solver = get_sampler(sampler)
    _check_num_steps(num_steps)
    _check_eta(eta)
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if noise.ndim < 2 or not noise.is_floating_point():
        raise ValueError(f"noise must be a float tensor (B, ...) of rank >= 2, got {noise.shape}")
    if sde_steps is not None:
        if not solver.stochastic:
            raise ValueError(
                f"sde_steps applies only to stochastic samplers, got sampler={solver.name!r}"
            )
        if isinstance(sde_steps, bool) or not 1 <= sde_steps <= num_steps:
            raise ValueError(f"sde_steps must be in [1, num_steps={num_steps}], got {sde_steps}")
    return solver
