"""ELBO estimators of ``log p_theta(x0 | c)`` for flow-matching and VP (epsilon) diffusion models.

Choi et al., "Rethinking the Design Space of Reinforcement Learning for Diffusion Models"
(ICML 2026, arXiv 2602.04663) replace the trajectory log-likelihood of a sampler by an ELBO of
the *final sample only*: draw a noise level ``t`` and noise ``eps``, noise ``x0`` forward, and
score how well the model denoises it. Everything here is one draw per sample: the caller makes
the draw (``flow_noise_draw`` / ``vp_noise_draw``) and passes the *same* draw to the current,
old and reference models, so that ``E - E_old`` is a low-variance difference (DESIGN.md s.1,
"shared noise"; the variance ratio is measured in tests/unit/test_elbo.py).

Conventions (flow matching, DESIGN.md s.1): ``t`` in [0, 1], t = 1 is noise, t = 0 is data,
``x_t = (1 - t) x0 + t eps``, the model predicts ``v ~ eps - x0``, ``x0_hat = x_t - t v``.
VP models: ``x_t = alpha_t x0 + sigma_t eps``, the model predicts ``eps_hat ~ eps``,
``x0_hat = (x_t - sigma_t eps_hat) / alpha_t``.

A model is any callable ``model(x_t (B, ...), t (B,), cond) -> (B, ...)``; ``cond`` is passed
through untouched. Tensors may have any rank >= 2; reductions run over all non-batch dims.

Reductions. Every estimator returns one value per sample (B,). By default it **averages** over
the non-batch dims (``reduction="mean"``), as the official code does: the ELBO per element keeps
the same scale at any resolution, and the advantage scale (0.1) and learning rate of the released
recipe were tuned with it. ``reduction="sum"`` gives the true (un-normalised) ELBO in nats, which
is what the exact log-likelihood-ratio test needs. The batch dimension is never reduced here.

Precision. Inputs are upcast to at least float32 for the arithmetic; the adaptive weight is
computed in float64 (as in the official ``compute_elbo``) and cast back.

Source: equations from DESIGN.md s.1, checked against ``jaemoo-choi/rethinking-diffusion-rl``
``src/utils/__init__.py:compute_elbo`` (weighting names there: adaptive, t = x0_mse,
uniform = velocity_mse, exact) and ``src/train.py`` (timestep selection). Written from the
equations, not copied.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from algo.registry import Registry

ModelFn = Callable[[Tensor, Tensor, Any], Tensor]
"""``model(x_t (B, ...), t (B,), cond) -> prediction (B, ...)`` (velocity or epsilon)."""

Reduction = Literal["mean", "sum"]
ADAPTIVE_WEIGHT_MIN = 1e-5
"""Lower clamp of the adaptive weight ``sg(mean |x0_hat - x0|)`` (official value)."""
EXACT_T_OFFSET = 1e-3
"""``(1 - t) / (t + offset)``: the official code's guard against t -> 0 in the exact weight."""


@dataclass(frozen=True)
class NoiseDraw:
    """One ``(t, eps)`` per sample and the noised input it defines; share it between passes.

    Attributes:
        t: noise level per sample (B,).
        noise: eps ~ N(0, I) (B, ...), in x0's dtype.
        x_t: the model input (B, ...), in x0's dtype.
    """

    t: Tensor
    noise: Tensor
    x_t: Tensor


@dataclass(frozen=True)
class ElboOutput:
    """An ELBO estimate and the raw prediction it came from (the KL term reuses the latter).

    Attributes:
        elbo: one estimate per sample (B,), float32 or float64.
        prediction: the model output (B, ...) as returned (velocity or epsilon).
    """

    elbo: Tensor
    prediction: Tensor


@dataclass(frozen=True)
class ElboTerms:
    """The tensors a weighting needs, all in the compute dtype (B, ...); ``t`` is expanded to
    broadcast against them. ``prediction`` is the velocity (flow) or epsilon (VP) output."""

    prediction: Tensor
    x0: Tensor
    x_t: Tensor
    noise: Tensor
    t: Tensor


WeightingFn = Callable[[ElboTerms, "VpSchedule | None", float, Reduction, float], Tensor]
"""``(terms, vp_schedule, cfg_scale, reduction, exact_t_offset) -> ELBO estimate (B,)``."""

FLOW_WEIGHTINGS: Registry[WeightingFn] = Registry("flow ELBO weighting", "learner.elbo_weighting")
"""ELBO weightings of flow-matching (velocity) models; module docstring of each entry below."""
VP_WEIGHTINGS: Registry[WeightingFn] = Registry("VP ELBO weighting", "learner.elbo_weighting")
"""ELBO weightings of epsilon-prediction (VP) models."""


# --------------------------------------------------------------------------------------------
# Timestep selection
# --------------------------------------------------------------------------------------------


def select_sampler_timesteps(
    sigmas: Tensor,
    num_samples: int,
    num_timesteps: int = 9,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Per sample, ``num_timesteps`` distinct noise levels of the sampler's grid, random order.

    The paper's default: a random 9 of the 10 sampler timesteps per sample (official
    ``train.py``: a per-sample ``randperm`` of the sampler's timesteps, the first
    ``int(10 * 0.99) = 9`` kept). Drawing without replacement spreads one sample's K
    estimates over the schedule; fresh eps per (sample, timestep) is drawn later by
    ``flow_noise_draw``.

    Args:
        sigmas: the S noise levels the sampler evaluated the model at, (S,), each in (0, 1]
            (e.g. ``flow_timesteps(10)[:-1]``: drop the final sigma = 0, where the ELBO
            integrand is degenerate).
        num_samples: B.
        num_timesteps: K, 1 <= K <= S.
        generator: RNG for the permutations (its device is used for the draw).

    Returns:
        ``(indices, t)``: grid indices (B, K) int64 and the noise levels (B, K) in sigmas' dtype,
        both on sigmas' device.
    """
    if sigmas.ndim != 1 or sigmas.numel() == 0:
        raise ValueError(f"sigmas must be a non-empty 1-D tensor, got shape {tuple(sigmas.shape)}")
    _check_unit_interval("sigmas", sigmas, closed_right=True)
    num_steps = sigmas.numel()
    if not 1 <= num_timesteps <= num_steps:
        raise ValueError(f"num_timesteps must be in [1, {num_steps}], got {num_timesteps}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    rng_device = generator.device if generator is not None else sigmas.device
    keys = torch.rand(num_samples, num_steps, generator=generator, device=rng_device)
    indices = keys.argsort(dim=1)[:, :num_timesteps].to(sigmas.device)  # (B, K)
    return indices, sigmas[indices]


def sample_timesteps(
    num_samples: int,
    num_timesteps: int,
    icdf: Callable[[Tensor], Tensor] | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """(B, K) independent noise levels ``t = icdf(u)``, ``u ~ U(0, 1]``: any density on (0, 1].

    ``icdf=None`` is t ~ U(0, 1] (the continuous-time ELBO's own density). ``u`` excludes 0 so
    that the exact weight ``(1 - t)/t`` never sees t = 0. Use ``logit_normal_icdf`` for SD3's
    training density; for VP models pass an icdf into (0, 1) (alpha_1 = 0 there).
    """
    if num_samples < 1 or num_timesteps < 1:
        raise ValueError(f"need num_samples, num_timesteps >= 1: {num_samples}, {num_timesteps}")
    rng_device = generator.device if generator is not None else device
    u = 1.0 - torch.rand(
        num_samples, num_timesteps, generator=generator, device=rng_device, dtype=torch.float64
    )
    t = (u if icdf is None else icdf(u)).to(device=device, dtype=dtype)
    _check_unit_interval("t = icdf(u)", t, closed_right=True)
    return t


def logit_normal_icdf(mean: float = 0.0, std: float = 1.0) -> Callable[[Tensor], Tensor]:
    """Inverse CDF of the logit-normal density (Esser et al. 2024): ``sigmoid(m + s ndtri(u))``."""
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std}")
    return lambda u: torch.sigmoid(mean + std * torch.special.ndtri(u))


# --------------------------------------------------------------------------------------------
# Flow matching
# --------------------------------------------------------------------------------------------


def flow_noise_draw(
    x0: Tensor,
    t: Tensor,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> NoiseDraw:
    """``x_t = (1 - t) x0 + t eps`` for one noise level per sample, t in (0, 1].

    ``noise`` (B, ...) is used if given (tests, shared draws across ranks), else drawn from
    ``generator``. Output tensors are in x0's dtype.
    """
    _check_batch(x0, t)
    _check_unit_interval("t", t, closed_right=True)
    eps = _noise_like(x0, noise, generator)
    tb = _expand(t, x0).to(x0.dtype)
    return NoiseDraw(t=t, noise=eps, x_t=(1.0 - tb) * x0 + tb * eps)


def flow_elbo_from_velocity(
    velocity: Tensor,
    x0: Tensor,
    draw: NoiseDraw,
    weighting: str = "adaptive",
    *,
    cfg_scale: float = 1.0,
    reduction: Reduction = "mean",
    exact_t_offset: float = EXACT_T_OFFSET,
) -> Tensor:
    """ELBO estimate (B,) of a flow-matching model from its velocity on one draw.

    With ``x0_hat = x_t - t v`` and the target velocity ``u = eps - x0`` (R = mean or sum over
    the non-batch dims, see the module docstring):

    - ``adaptive``: ``-R((x0_hat - x0)^2) / sg(mean|x0_hat - x0|) / G``. The weight (float64,
      clamped >= 1e-5, no gradient) normalises each (sample, t) to a comparable scale. Dividing
      by the CFG scale G keeps E and E - E_old G-invariant: with a shared unconditional pass
      ``v - v_old = G (text part)``, so the error scales ~G (official comment).
    - ``x0_mse``: ``-R((x0_hat - x0)^2)`` (official name ``t``; equal to ``-t^2 R((v - u)^2)``).
    - ``velocity_mse``: ``-R((v - u)^2) / G^2`` (official ``uniform``; G^2 for the same reason).
    - ``exact``: ``-R((1 - t)/(t + offset) (v - u)^2)``. With ``offset = 0`` and ``reduction =
      "sum"`` this is the continuous-time ELBO up to a model-independent constant (derivation in
      tests/unit/test_elbo.py and docs/method.md): ``-1/2 (-d/dt log SNR) ||eps - eps_hat||^2``
      with ``SNR = (1-t)^2/t^2`` and ``eps - eps_hat = (1 - t)(u - v)``. No CFG division.

    ``cfg_scale`` G is the guidance scale the velocity was produced with (1 = none).
    """
    _check_like("velocity", velocity, x0)
    _check_like("draw.x_t", draw.x_t, x0)
    fn = FLOW_WEIGHTINGS.get(weighting)
    _check_cfg_and_reduction(cfg_scale, reduction)
    dtype = _compute_dtype(x0)
    terms = ElboTerms(
        velocity.to(dtype), x0.to(dtype), draw.x_t, draw.noise, _expand(draw.t, x0).to(dtype)
    )
    return fn(terms, None, cfg_scale, reduction, exact_t_offset)


def _flow_x0_error(z: ElboTerms) -> Tensor:
    return z.x_t.to(z.x0.dtype) - z.t * z.prediction - z.x0  # x0_hat - x0


def _velocity_error(z: ElboTerms) -> Tensor:
    return z.prediction - (z.noise.to(z.x0.dtype) - z.x0)  # v - u


@FLOW_WEIGHTINGS.register("adaptive")
def _flow_adaptive(
    z: ElboTerms, _s: VpSchedule | None, cfg_scale: float, reduction: Reduction, _o: float
) -> Tensor:
    return _adaptive_elbo(_flow_x0_error(z), reduction) / cfg_scale


@FLOW_WEIGHTINGS.register("x0_mse")
def _flow_x0_mse(
    z: ElboTerms, _s: VpSchedule | None, _g: float, reduction: Reduction, _o: float
) -> Tensor:
    return -_reduce(_flow_x0_error(z).square(), reduction)


@FLOW_WEIGHTINGS.register("velocity_mse")
def _flow_velocity_mse(
    z: ElboTerms, _s: VpSchedule | None, cfg_scale: float, reduction: Reduction, _o: float
) -> Tensor:
    return -_reduce(_velocity_error(z).square(), reduction) / cfg_scale**2


@FLOW_WEIGHTINGS.register("exact")
def _flow_exact(
    z: ElboTerms, _s: VpSchedule | None, _g: float, reduction: Reduction, offset: float
) -> Tensor:
    if offset < 0:
        raise ValueError(f"exact_t_offset must be >= 0, got {offset}")
    weight = (1.0 - z.t) / (z.t + offset)
    return -_reduce(weight * _velocity_error(z).square(), reduction)


def flow_elbo(
    model: ModelFn,
    x0: Tensor,
    cond: Any,
    draw: NoiseDraw,
    weighting: str = "adaptive",
    *,
    cfg_scale: float = 1.0,
    reduction: Reduction = "mean",
    exact_t_offset: float = EXACT_T_OFFSET,
) -> ElboOutput:
    """Call ``model(draw.x_t, draw.t, cond)`` once and score it with ``flow_elbo_from_velocity``.

    Gradient mode is the caller's: wrap the old and reference passes in ``torch.no_grad()``.
    """
    velocity = model(draw.x_t, draw.t, cond)
    elbo = flow_elbo_from_velocity(
        velocity,
        x0,
        draw,
        weighting,
        cfg_scale=cfg_scale,
        reduction=reduction,
        exact_t_offset=exact_t_offset,
    )
    return ElboOutput(elbo=elbo, prediction=velocity)


# --------------------------------------------------------------------------------------------
# VP (epsilon prediction)
# --------------------------------------------------------------------------------------------


class VpSchedule(Protocol):
    """A variance-preserving noise schedule in continuous time t in (0, 1)."""

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha_t, sigma_t)`` with ``alpha^2 + sigma^2 = 1``, same shape as t."""
        ...

    def neg_dlogsnr_dt(self, t: Tensor) -> Tensor:
        """``-d/dt log SNR(t)`` with ``SNR = alpha^2 / sigma^2`` (> 0), same shape as t."""
        ...


@dataclass(frozen=True)
class CosineVpSchedule:
    """``alpha = cos(pi t / 2)``, ``sigma = sin(pi t / 2)`` (Nichol & Dhariwal 2021, no offset).

    ``log SNR = 2 log cot(pi t / 2)``, so ``-d/dt log SNR = pi (tan + cot)(pi t / 2)
    = 2 pi / sin(pi t)``.
    """

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        half = 0.5 * math.pi * t
        return torch.cos(half), torch.sin(half)

    def neg_dlogsnr_dt(self, t: Tensor) -> Tensor:
        return 2.0 * math.pi / torch.sin(math.pi * t)


@dataclass(frozen=True)
class LinearVpSchedule:
    """The VP-SDE of Song et al. 2021: ``beta(t) = beta_min + t (beta_max - beta_min)``.

    ``alpha^2 = exp(-B(t))``, ``B(t) = beta_min t + (beta_max - beta_min) t^2 / 2``,
    ``sigma^2 = 1 - alpha^2``; ``log SNR = -B - log(1 - e^{-B})`` so
    ``-d/dt log SNR = beta(t) / sigma^2``. The continuous limit of DDPM's linear betas.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        big_b = self._integral(t)
        return torch.exp(-0.5 * big_b), torch.sqrt(-torch.expm1(-big_b))

    def neg_dlogsnr_dt(self, t: Tensor) -> Tensor:
        beta = self.beta_min + t * (self.beta_max - self.beta_min)
        return beta / (-torch.expm1(-self._integral(t)))

    def _integral(self, t: Tensor) -> Tensor:
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t.square()


def vp_noise_draw(
    x0: Tensor,
    t: Tensor,
    schedule: VpSchedule,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> NoiseDraw:
    """``x_t = alpha_t x0 + sigma_t eps`` for one t in (0, 1) per sample (t = 1 has alpha = 0)."""
    _check_batch(x0, t)
    _check_unit_interval("t", t, closed_right=False)
    eps = _noise_like(x0, noise, generator)
    alpha, sigma = schedule.alpha_sigma(_expand(t, x0).to(_compute_dtype(x0)))
    x_t = alpha * x0.to(alpha.dtype) + sigma * eps.to(alpha.dtype)
    return NoiseDraw(t=t, noise=eps, x_t=x_t.to(x0.dtype))


def vp_elbo_from_epsilon(
    epsilon: Tensor,
    x0: Tensor,
    draw: NoiseDraw,
    schedule: VpSchedule,
    weighting: str = "adaptive",
    *,
    cfg_scale: float = 1.0,
    reduction: Reduction = "mean",
) -> Tensor:
    """ELBO estimate (B,) of an epsilon-prediction (VP) model on one draw.

    With ``x0_hat = (x_t - sigma_t eps_hat) / alpha_t`` and R = mean or sum over non-batch dims:

    - ``adaptive``: ``-R((x0_hat - x0)^2) / sg(mean|x0_hat - x0|) / G`` (as for flow models).
    - ``x0_mse``: ``-R((x0_hat - x0)^2)``.
    - ``epsilon_mse``: ``-R((eps_hat - eps)^2) / G^2`` (DDPM's "simple" loss).
    - ``exact``: the VDM continuous-time ELBO (Kingma et al. 2021, eq. 17)
      ``-1/2 (-d/dt log SNR(t)) R((eps - eps_hat)^2)``, up to a model-independent constant.
    """
    _check_like("epsilon", epsilon, x0)
    _check_like("draw.x_t", draw.x_t, x0)
    fn = VP_WEIGHTINGS.get(weighting)
    _check_cfg_and_reduction(cfg_scale, reduction)
    dtype = _compute_dtype(x0)
    terms = ElboTerms(
        epsilon.to(dtype), x0.to(dtype), draw.x_t, draw.noise, _expand(draw.t, x0).to(dtype)
    )
    return fn(terms, schedule, cfg_scale, reduction, EXACT_T_OFFSET)


def _vp_x0_error(z: ElboTerms, schedule: VpSchedule) -> Tensor:
    alpha, sigma = schedule.alpha_sigma(z.t)
    return (z.x_t.to(z.x0.dtype) - sigma * z.prediction) / alpha - z.x0  # x0_hat - x0


@VP_WEIGHTINGS.register("adaptive")
def _vp_adaptive(
    z: ElboTerms, schedule: VpSchedule | None, cfg_scale: float, reduction: Reduction, _o: float
) -> Tensor:
    assert schedule is not None
    return _adaptive_elbo(_vp_x0_error(z, schedule), reduction) / cfg_scale


@VP_WEIGHTINGS.register("x0_mse")
def _vp_x0_mse(
    z: ElboTerms, schedule: VpSchedule | None, _g: float, reduction: Reduction, _o: float
) -> Tensor:
    assert schedule is not None
    return -_reduce(_vp_x0_error(z, schedule).square(), reduction)


@VP_WEIGHTINGS.register("epsilon_mse")
def _vp_epsilon_mse(
    z: ElboTerms, _s: VpSchedule | None, cfg_scale: float, reduction: Reduction, _o: float
) -> Tensor:
    sq = _reduce((z.prediction - z.noise.to(z.x0.dtype)).square(), reduction)
    return -sq / cfg_scale**2


@VP_WEIGHTINGS.register("exact")
def _vp_exact(
    z: ElboTerms, schedule: VpSchedule | None, _g: float, reduction: Reduction, _o: float
) -> Tensor:
    assert schedule is not None
    sq = _reduce((z.prediction - z.noise.to(z.x0.dtype)).square(), reduction)
    return -0.5 * schedule.neg_dlogsnr_dt(z.t.reshape(-1)) * sq


def vp_elbo(
    model: ModelFn,
    x0: Tensor,
    cond: Any,
    draw: NoiseDraw,
    schedule: VpSchedule,
    weighting: str = "adaptive",
    *,
    cfg_scale: float = 1.0,
    reduction: Reduction = "mean",
) -> ElboOutput:
    """Call ``model(draw.x_t, draw.t, cond)`` (epsilon) once and score it with
    ``vp_elbo_from_epsilon``. ``t`` is passed as the continuous level in (0, 1); a model adapter
    for a discrete-time UNet maps it to its own timestep index."""
    epsilon = model(draw.x_t, draw.t, cond)
    elbo = vp_elbo_from_epsilon(
        epsilon, x0, draw, schedule, weighting, cfg_scale=cfg_scale, reduction=reduction
    )
    return ElboOutput(elbo=elbo, prediction=epsilon)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _adaptive_elbo(err: Tensor, reduction: Reduction) -> Tensor:
    """``-R(err^2) / sg(clamp(mean|err|, 1e-5))``, the weight computed in float64."""
    dims = tuple(range(1, err.ndim))
    with torch.no_grad():
        weight = err.detach().double().abs().mean(dim=dims).clamp_min(ADAPTIVE_WEIGHT_MIN)
    return -_reduce(err.square(), reduction) / weight.to(err.dtype)


def _reduce(x: Tensor, reduction: Reduction) -> Tensor:
    dims = tuple(range(1, x.ndim))
    return x.mean(dim=dims) if reduction == "mean" else x.sum(dim=dims)


def _expand(t: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1), broadcastable against x."""
    return t.reshape(-1, *([1] * (x.ndim - 1))).to(x.device)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _noise_like(x0: Tensor, noise: Tensor | None, generator: torch.Generator | None) -> Tensor:
    if noise is not None:
        if generator is not None:
            raise ValueError("pass noise or generator, not both")
        _check_like("noise", noise, x0)
        return noise.to(device=x0.device, dtype=x0.dtype)
    rng_device = generator.device if generator is not None else x0.device
    eps = torch.randn(x0.shape, generator=generator, device=rng_device, dtype=_compute_dtype(x0))
    return eps.to(device=x0.device, dtype=x0.dtype)


def _check_batch(x0: Tensor, t: Tensor) -> None:
    if x0.ndim < 2 or not x0.is_floating_point():
        raise ValueError(f"x0 must be a float tensor (B, ...) of rank >= 2, got {tuple(x0.shape)}")
    if t.shape != (x0.shape[0],):
        raise ValueError(f"t must have shape ({x0.shape[0]},), got {tuple(t.shape)}")


def _check_unit_interval(name: str, t: Tensor, closed_right: bool) -> None:
    upper_ok = (t <= 1.0) if closed_right else (t < 1.0)
    if not bool(((t > 0.0) & upper_ok).all()):
        interval = "(0, 1]" if closed_right else "(0, 1)"
        raise ValueError(f"{name} must lie in {interval}; got min {t.min()}, max {t.max()}")


def _check_like(name: str, t: Tensor, x: Tensor) -> None:
    if t.shape != x.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected x0's {tuple(x.shape)}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(choices)}")


def _check_cfg_and_reduction(cfg_scale: float, reduction: str) -> None:
    if not cfg_scale > 0:
        raise ValueError(f"cfg_scale must be > 0, got {cfg_scale}")
    _check_choice("reduction", reduction, ("mean", "sum"))
