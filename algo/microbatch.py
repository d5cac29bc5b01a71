"""The reference loss of one training microbatch: draw, three passes, ELBOs, loss, KL.

For one timestep index (one column of the (B, K) timestep draw) and one shared noise draw:

    E_old = ELBO(old model)        no grad
    E     = ELBO(current model)    with grad
    v_ref = reference prediction   no grad, only when beta > 0
    loss  = (sum_b policy_loss(E, E_old, A)_b + beta sum_b mean((v - v_ref)^2)_b) / (N K)

``loss.backward()`` adds exactly this (microbatch, timestep) slice's gradient. The learner calls
``microbatch_loss`` once per timestep index (gradient accumulation, one model call per pass per
index, so ``cond`` is never repeated or indexed) and once per microbatch; with ``N`` the number
of samples over all microbatches and ranks in the optimizer step and ``K`` the timesteps per
sample, the sum of all these losses (and gradients, summed over ranks) is the mean over all
``N K`` (sample, timestep) pairs. Data-parallel engines that *average* gradients over ranks must
scale the loss by the world size (see ``algo.losses``). ``accumulate_microbatch`` is the
loop for one microbatch and all K indices.

This file is the plain-torch reference the distributed learner wraps; it holds no optimizer,
no process group and no model state. Source: DESIGN.md s.1; the pass order and the shared
draw follow ``jaemoo-choi/rethinking-diffusion-rl`` ``src/utils/base.py:compute_loss``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from algo.elbo import (
    ElboOutput,
    ModelFn,
    NoiseDraw,
    VpSchedule,
    flow_elbo,
    flow_noise_draw,
    vp_elbo,
    vp_noise_draw,
)
from algo.losses import GlobalNormalizer, LossConfig, elbo_policy_loss, girsanov_kl_per_pair


def make_noise_draw(
    x0: Tensor,
    t: Tensor,
    config: LossConfig,
    vp_schedule: VpSchedule | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> NoiseDraw:
    """The shared draw for one timestep index: flow or VP forward noising of x0 (B, ...) at t (B,).

    Fresh eps per call (from ``generator``) unless ``noise`` is given.
    """
    if config.prediction == "velocity":
        return flow_noise_draw(x0, t, noise=noise, generator=generator)
    return vp_noise_draw(x0, t, _require_schedule(vp_schedule), noise=noise, generator=generator)


def microbatch_loss(
    model: ModelFn,
    old_model: ModelFn,
    ref_model: ModelFn | None,
    x0: Tensor,
    cond: Any,
    advantages: Tensor,
    draw: NoiseDraw,
    config: LossConfig,
    normalizer: GlobalNormalizer,
    vp_schedule: VpSchedule | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """This (microbatch, timestep index)'s share of the step loss, and its metrics.

    Args:
        model: the current policy (its parameters get the gradient).
        old_model: the sampling policy; called under ``torch.no_grad()``.
        ref_model: the reference (base) model, called under ``no_grad``; must be ``None`` iff
            ``config.beta == 0`` (the pass is then skipped).
        x0: the final samples of the rollout (B, ...).
        cond: the conditioning, passed through to every model call untouched.
        advantages: (B,).
        draw: one shared (t, eps, x_t) for all passes, from ``make_noise_draw``.
        config: loss, ELBO weighting, prediction type, clip, beta, CFG scale.
        normalizer: global N (samples per optimizer step, all ranks) and K (timesteps/sample).
        vp_schedule: required for ``config.prediction == "epsilon"``.

    Returns:
        ``(loss, metrics)``: a scalar with gradient and a dict of floats (``learner/...``).
    """
    if (ref_model is None) != (config.beta == 0):
        raise ValueError(f"ref_model must be given iff beta > 0 (beta={config.beta})")
    if advantages.shape != (x0.shape[0],):
        raise ValueError(f"advantages must have shape ({x0.shape[0]},), got {advantages.shape}")
    with torch.no_grad():
        old = _elbo(old_model, x0, cond, draw, config, vp_schedule)
    current = _elbo(model, x0, cond, draw, config, vp_schedule)
    kl = None
    if ref_model is not None:
        with torch.no_grad():
            ref_prediction = ref_model(draw.x_t, draw.t, cond)
        kl = girsanov_kl_per_pair(current.prediction, ref_prediction)
    return elbo_policy_loss(current.elbo, old.elbo, advantages, config, normalizer, kl)


def accumulate_microbatch(
    model: ModelFn,
    old_model: ModelFn,
    ref_model: ModelFn | None,
    x0: Tensor,
    cond: Any,
    advantages: Tensor,
    timesteps: Tensor,
    config: LossConfig,
    normalizer: GlobalNormalizer,
    vp_schedule: VpSchedule | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Backward through all K timestep indices of one microbatch; returns merged metrics.

    ``timesteps`` (B, K) come from ``algo.elbo.select_sampler_timesteps`` or
    ``sample_timesteps``; eps is fresh per (sample, timestep) from ``generator`` unless
    ``noise`` (B, K, ...) is given. Gradients accumulate in the model's ``.grad``; the optimizer
    step is the caller's. Metrics: ``learner/loss`` and ``learner/policy_loss`` are summed over
    the K indices (they are contributions to the step loss), ``*_min``/``*_max`` reduced by
    min/max, ``num_pairs`` summed, the rest averaged.
    """
    if timesteps.ndim != 2 or timesteps.shape[0] != x0.shape[0]:
        raise ValueError(f"timesteps must be ({x0.shape[0]}, K), got {tuple(timesteps.shape)}")
    num_timesteps = timesteps.shape[1]
    if noise is not None and noise.shape != (x0.shape[0], num_timesteps, *x0.shape[1:]):
        raise ValueError(
            f"noise must be (B, K, ...) = {(x0.shape[0], num_timesteps)} + "
            f"{tuple(x0.shape[1:])}, got {tuple(noise.shape)}"
        )
    per_index: list[dict[str, float]] = []
    for k in range(num_timesteps):
        draw = make_noise_draw(
            x0,
            timesteps[:, k],
            config,
            vp_schedule,
            noise=None if noise is None else noise[:, k],
            generator=generator,
        )
        loss, metrics = microbatch_loss(
            model, old_model, ref_model, x0, cond, advantages, draw, config, normalizer, vp_schedule
        )
        loss.backward()
        per_index.append(metrics)
    return merge_metrics(per_index)


def _elbo(
    model: ModelFn,
    x0: Tensor,
    cond: Any,
    draw: NoiseDraw,
    config: LossConfig,
    vp_schedule: VpSchedule | None,
) -> ElboOutput:
    if config.prediction == "velocity":
        return flow_elbo(
            model,
            x0,
            cond,
            draw,
            config.weighting,
            cfg_scale=config.cfg_scale,
            exact_t_offset=config.exact_t_offset,
        )
    return vp_elbo(
        model,
        x0,
        cond,
        draw,
        _require_schedule(vp_schedule),
        config.weighting,
        cfg_scale=config.cfg_scale,
    )


def _require_schedule(vp_schedule: VpSchedule | None) -> VpSchedule:
    if vp_schedule is None:
        raise ValueError("epsilon-prediction models need a vp_schedule")
    return vp_schedule


def merge_metrics(per_index: list[dict[str, float]]) -> dict[str, float]:
    """Combine per-(microbatch, timestep) metrics: losses and counts add up (they are
    contributions to one step's loss), ``*_min``/``*_max`` reduce by min/max, the rest average."""
    merged: dict[str, float] = {}
    for key in per_index[0]:
        values = [m[key] for m in per_index]
        if key.endswith("_min"):
            merged[key] = min(values)
        elif key.endswith("_max"):
            merged[key] = max(values)
        elif key.endswith(("num_pairs", "/loss", "/policy_loss")):
            merged[key] = sum(values)
        else:
            merged[key] = sum(values) / len(values)
    return merged
