"""Variance-preserving (DDPM-family) models in flow coordinates: the exact change of variables.

Pure math (torch only). A VP model (SD1.5, SD2) noises ``x_vp = alpha x0 + sigma eps`` with
``alpha^2 = abar(tau)`` from its discrete table at integer timestep ``tau``. The flow view
``y = x_vp / (alpha + sigma)`` at ``s = sigma / (alpha + sigma)`` gives ``y = (1 - s) x0 + s eps``,
the rectified-flow interpolation, so the same samplers and ELBO serve both families
(``../shared/REAL_MODELS.md`` section 1.4):

- ``s`` <-> log-SNR: ``lambda = log(abar / (1 - abar)) = 2 log((1 - s) / s)``; a flow level maps
  to a fractional timestep by interpolating the table in log-SNR (UNets take float timesteps);
- the velocity is ``v = eps_hat - x0_hat`` (x0_hat is the same object in both coordinates);
- Euler on the flow grid of the scheduler's timesteps equals DDIM with eta = 0 step for step.

The table covers ``s`` in ``[s(0), s(T - 1)]`` only (about [0.028, 0.936] for SD1.5), so a VP
model's sampling grid starts at ``s(T - 1)`` (``trailing_flow_grid``), from the state
``eps / (alpha_T + sigma_T)`` that DDIM starts from (``initial_scale``).
"""

from __future__ import annotations

import torch
from torch import Tensor

SD_BETAS = (0.00085, 0.012, 1000)
"""``scaled_linear`` betas (start, end, steps) of SD1.x, SD2.x and SDXL."""


def scaled_linear_alphas_cumprod(
    beta_start: float = SD_BETAS[0], beta_end: float = SD_BETAS[1], steps: int = SD_BETAS[2]
) -> Tensor:
    """``abar`` (steps,) float64, computed as diffusers' schedulers do (float32 betas)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0).double()


def flow_level(alphas_cumprod: Tensor) -> Tensor:
    """The flow level ``s = sigma / (alpha + sigma)`` of each ``abar`` (float64)."""
    abar = alphas_cumprod.double()
    alpha, sigma = abar.sqrt(), (1.0 - abar).sqrt()
    return sigma / (alpha + sigma)


def alpha_sigma(s: Tensor) -> tuple[Tensor, Tensor]:
    """VP ``(alpha, sigma)`` with ``alpha / sigma = (1 - s) / s`` and ``alpha^2 + sigma^2 = 1``."""
    s = s.double()
    norm = torch.sqrt((1.0 - s) ** 2 + s**2)
    return (1.0 - s) / norm, s / norm


def fractional_timestep(s: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """The float timestep ``tau`` in ``[0, T - 1]`` whose log-SNR is that of flow level ``s``,
    linear in log-SNR between table entries (clamped at the table's ends)."""
    lam_table = torch.log(alphas_cumprod.double() / (1.0 - alphas_cumprod.double()))  # decreasing
    s = s.double().clamp(1e-12, 1.0 - 1e-12)
    lam = 2.0 * torch.log((1.0 - s) / s)
    neg = -lam_table.to(s.device)  # increasing in tau
    hi = torch.searchsorted(neg, -lam).clamp(1, len(neg) - 1)
    lo = hi - 1
    frac = ((-lam) - neg[lo]) / (neg[hi] - neg[lo])
    return (lo.double() + frac).clamp(0.0, len(neg) - 1.0)


def trailing_timesteps(num_steps: int, steps: int = SD_BETAS[2]) -> list[int]:
    """DDIM's ``trailing`` integer timesteps, ``round(arange(T, 0, -T / N)) - 1`` (numpy's
    round half to even, as Python's), largest first."""
    if num_steps < 1 or num_steps > steps:
        raise ValueError(f"num_steps must be in [1, {steps}], got {num_steps}")
    ratio = steps / num_steps
    return [round(steps - i * ratio) - 1 for i in range(num_steps)]


def trailing_flow_grid(
    num_steps: int,
    shift: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The SD schedule's trailing DDIM timesteps as flow levels, then 0: (num_steps + 1,),
    strictly decreasing from ``s(T - 1)`` (~0.936). ``shift`` does not apply (the spacing is
    the scheduler's) and is ignored."""
    abar = scaled_linear_alphas_cumprod()
    taus = torch.tensor(trailing_timesteps(num_steps))
    grid = torch.cat([flow_level(abar[taus]), torch.zeros(1, dtype=torch.float64)])
    return grid.to(device=device, dtype=dtype)


def initial_scale(alphas_cumprod: Tensor) -> float:
    """``1 / (alpha_T + sigma_T)``: DDIM starts from ``x_vp = eps`` at the last timestep, which
    is ``y = eps / (alpha_T + sigma_T)`` in flow coordinates (~0.94 eps for SD1.5)."""
    abar = float(alphas_cumprod[-1])
    return 1.0 / (abar**0.5 + (1.0 - abar) ** 0.5)
