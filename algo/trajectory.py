"""The trajectory-likelihood baseline (Flow-GRPO): per-step SDE log-probs and the clipped loss.

A rollout with the Flow-GRPO SDE stores its states ``x_{t_0} = noise, ..., x_{t_S} = x0``
(B, S+1, ...) and the old policy's per-step log-probs (B, S). Under new weights each stochastic
step ``i`` is a Gaussian transition ``N(mu_theta(x_{t_i}, t_i), std_i^2 I)`` (``algo.samplers.
sde_step``); its log-density of the stored ``x_{t_{i+1}}``, **averaged** over the non-batch dims
(Flow-GRPO's convention), gives ``log_prob_theta`` and the ratio
``r = exp(log_prob_theta - log_prob_old)``. The loss per (sample, step) is the clipped surrogate
``max(-A_c r, -A_c clip(r, 1 - eps, 1 + eps))``, plus ``beta`` times the per-step KL between the
two Gaussians with the same std, ``mean((mu_theta - mu_ref)^2 / (2 std^2))``.

Normalisation is the ELBO losses' (``algo.losses``): the sum over this call's pairs divided by
``N K``, with K the number of trained steps per sample, so the sum over step indices,
microbatches and ranks is the mean over all (sample, step) pairs.

Source: Liu et al. 2025 (Flow-GRPO, arXiv 2505.05470); checked against
``jaemoo-choi/rethinking-diffusion-rl`` ``src/flow_grpo.py`` (per-row shuffled step indices,
clip 1e-3 (upstream Flow-GRPO uses 1e-4), advantage clamp 5, the Gaussian-mean KL).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from algo.elbo import ModelFn
from algo.losses import GlobalNormalizer, pair_metrics, policy_loss_per_pair
from algo.samplers import SdeStepOutput, sde_step


def gather_steps(
    trajectory: Tensor, sigmas: Tensor, step_index: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample step ``i = step_index[b]``: ``(x_i, x_{i+1}, sigma_i, sigma_{i+1})``.

    Args:
        trajectory: (B, S+1, ...) stored states.
        sigmas: (S+1,) the grid, from 1 to 0.
        step_index: (B,) int64 in [0, S).

    Returns:
        ``x`` (B, ...), ``x_next`` (B, ...), ``sigma`` (B,), ``sigma_next`` (B,).
    """
    if trajectory.ndim < 3:
        raise ValueError(f"trajectory must be (B, S+1, ...), got {tuple(trajectory.shape)}")
    batch, num_states = trajectory.shape[:2]
    if sigmas.shape != (num_states,):
        raise ValueError(f"sigmas must have shape ({num_states},), got {tuple(sigmas.shape)}")
    if step_index.shape != (batch,) or step_index.dtype != torch.long:
        raise ValueError(
            f"step_index must be int64 ({batch},), got {step_index.dtype} {tuple(step_index.shape)}"
        )
    if not bool(((step_index >= 0) & (step_index < num_states - 1)).all()):
        raise ValueError(f"step_index must lie in [0, {num_states - 1})")
    rows = torch.arange(batch, device=trajectory.device)
    idx = step_index.to(trajectory.device)
    s = sigmas.to(trajectory.device)
    return trajectory[rows, idx], trajectory[rows, idx + 1], s[idx], s[idx + 1]


def trajectory_step(
    model: ModelFn,
    trajectory: Tensor,
    sigmas: Tensor,
    step_index: Tensor,
    cond: Any,
    eta: float = 0.7,
) -> SdeStepOutput:
    """Re-score one stored step per sample under ``model``: one model call at ``(x_i, sigma_i)``.

    Returns ``sde_step``'s output with ``prev_sample`` the stored ``x_{i+1}``; ``log_prob`` (B,)
    is differentiable through the model's velocity. Gradient mode is the caller's.
    """
    x, x_next, sigma, sigma_next = gather_steps(trajectory, sigmas, step_index)
    velocity = model(x, sigma.to(x.dtype), cond)
    return sde_step(x, velocity, sigma, sigma_next, eta=eta, prev_sample=x_next)


def trajectory_log_probs(
    model: ModelFn,
    trajectory: Tensor,
    sigmas: Tensor,
    cond: Any,
    eta: float = 0.7,
    step_indices: Tensor | None = None,
) -> Tensor:
    """Per-step log-probs (B, K) of a stored trajectory under ``model``; one model call per column.

    ``step_indices`` (B, K) int64 picks K steps per sample (rows may differ, as in the official
    per-row shuffle); ``None`` means all S steps in order. Column k is ``log p(x_{i+1} | x_i)``
    with ``i = step_indices[:, k]``, averaged over the non-batch dims.
    """
    batch, num_steps = trajectory.shape[0], trajectory.shape[1] - 1
    if step_indices is None:
        step_indices = torch.arange(num_steps, device=trajectory.device).expand(batch, -1)
    if step_indices.ndim != 2 or step_indices.shape[0] != batch:
        raise ValueError(f"step_indices must be ({batch}, K), got {tuple(step_indices.shape)}")
    columns = [
        trajectory_step(model, trajectory, sigmas, step_indices[:, k], cond, eta).log_prob
        for k in range(step_indices.shape[1])
    ]
    return torch.stack(columns, dim=1)


def sde_mean_kl(mean: Tensor, ref_mean: Tensor, std: Tensor) -> Tensor:
    """KL between two Gaussian steps with equal std, per element, averaged over dims: (B,).

    ``KL(N(mu, s^2) || N(mu_ref, s^2)) = (mu - mu_ref)^2 / (2 s^2)``; the reference is detached.
    """
    if mean.shape != ref_mean.shape:
        raise ValueError(f"mean {tuple(mean.shape)} and ref_mean {tuple(ref_mean.shape)} differ")
    kl = (mean - ref_mean.detach()).square() / (2.0 * std.square())
    return kl.mean(dim=tuple(range(1, kl.ndim)))


def flow_grpo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    normalizer: GlobalNormalizer,
    clip_eps: float = 1e-3,
    adv_clip_max: float = 5.0,
    beta: float = 0.0,
    kl: Tensor | None = None,
    loss: str = "grpo",
) -> tuple[Tensor, dict[str, float]]:
    """One step-column's share of the trajectory loss: ``(sum_i loss_i + beta sum_i kl_i)
    / (N K)``; Flow-GRPO's clipped surrogate with ``loss = "grpo"``, or any registered policy
    loss (``algo.losses.LOSSES``) with ``E = log_prob`` and ``E_old = old_log_prob``.

    Args:
        log_prob: current policy's step log-prob (B,), with gradient.
        old_log_prob: the sampling policy's, stored at rollout (B,).
        advantages: (B,), clamped to ``+-adv_clip_max`` inside the surrogate.
        normalizer: global N samples and K trained steps per sample.
        clip_eps: ratio clip half-width (official 1e-3).
        adv_clip_max: advantage clamp.
        beta: KL coefficient; ``kl`` (B,) from ``sde_mean_kl`` is required iff beta > 0.
        loss: the policy loss (default the baseline's own, ``grpo``).

    Returns:
        ``(loss, metrics)`` with the ratio diagnostics of ``algo.losses.pair_metrics``.
    """
    if not log_prob.shape == old_log_prob.shape == advantages.shape or log_prob.ndim != 1:
        raise ValueError("log_prob, old_log_prob and advantages must share one (B,) shape")
    if (kl is None) != (beta == 0):
        raise ValueError(f"kl must be given iff beta > 0 (beta={beta})")
    log_ratio = log_prob - old_log_prob.detach().to(log_prob.dtype)
    per_pair = policy_loss_per_pair(
        log_prob, old_log_prob, advantages, loss, clip_eps, adv_clip_max
    )
    policy = per_pair.sum() / normalizer.num_pairs
    total = policy if kl is None else policy + beta * kl.sum() / normalizer.num_pairs
    metrics = pair_metrics(log_ratio, advantages, clip_eps)
    metrics["learner/policy_loss"] = float(policy.detach())
    metrics["learner/loss"] = float(total.detach())
    if kl is not None:
        metrics["learner/kl_mean"] = float(kl.detach().mean())
    return total, metrics


def flow_grpo_microbatch_loss(
    model: ModelFn,
    ref_model: ModelFn | None,
    trajectory: Tensor,
    sigmas: Tensor,
    old_log_probs: Tensor,
    step_index: Tensor,
    cond: Any,
    advantages: Tensor,
    normalizer: GlobalNormalizer,
    eta: float = 0.7,
    clip_eps: float = 1e-3,
    adv_clip_max: float = 5.0,
    beta: float = 0.0,
    loss: str = "grpo",
) -> tuple[Tensor, dict[str, float]]:
    """The baseline's reference loss for one microbatch and one step column (call per column,
    ``loss.backward()`` each: gradient accumulation, as for the ELBO path).

    ``old_log_probs`` (B, S) are the rollout's stored log-probs, indexed by ``step_index`` (B,).
    ``ref_model`` is called (no grad) only when beta > 0.
    """
    if (ref_model is None) != (beta == 0):
        raise ValueError(f"ref_model must be given iff beta > 0 (beta={beta})")
    current = trajectory_step(model, trajectory, sigmas, step_index, cond, eta)
    rows = torch.arange(trajectory.shape[0], device=old_log_probs.device)
    old = old_log_probs[rows, step_index.to(old_log_probs.device)]
    kl = None
    if ref_model is not None:
        with torch.no_grad():
            ref = trajectory_step(ref_model, trajectory, sigmas, step_index, cond, eta)
        kl = sde_mean_kl(current.mean, ref.mean, current.std)
    return flow_grpo_loss(
        current.log_prob,
        old.to(current.log_prob.device),
        advantages,
        normalizer,
        clip_eps,
        adv_clip_max,
        beta,
        kl,
        loss,
    )
