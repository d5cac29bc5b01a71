"""The paper's policy-gradient losses on ELBO estimates, and the Girsanov KL to a reference.

Notation (DESIGN.md s.1): for one (sample, timestep) pair, ``E`` is the current policy's ELBO
estimate (with gradient), ``E_old`` the sampling policy's on the *same* draw (no gradient),
``l = sg(E) - E_old`` the detached log-ratio, ``rho = exp(l)`` and ``A`` the advantage.

==================  ================================================================
name                per-pair loss to minimise
==================  ================================================================
``epg``             ``-rho A E``
``pepg``            ``-rho (A - l) E``        (the paper's "Ours" row; proximal EPG)
``par``             ``1/2 rho (A - (E - E_old))^2``   (advantage regression)
``grpo``            ``max(-A_c r, -A_c clip(r, 1 - eps, 1 + eps))``, ``r = exp(E - E_old)``
                    with gradient, ``A_c = clamp(A, -5, 5)``, eps = 1e-3
``*_noratio``       the same without ``rho``
==================  ================================================================

KL to the reference (base) model, on the same ``x_t``: ``beta mean((pred - pred_ref)^2)``, the
Girsanov form (the KL between the two path measures up to a t-dependent weight).

Normalisation (the contract with the learner). A training step covers ``N`` samples (over all
ranks and microbatches) with ``K`` ELBO timesteps each. Every function here returns the
**sum** of its per-pair terms divided by ``N K`` (``GlobalNormalizer.num_pairs``), so summing
the returned losses over timestep indices, microbatches and ranks gives exactly the mean over
all ``N K`` pairs, the official objective (per-microbatch mean / (accumulation x K), DDP-averaged).
Consequences: (1) gradients must be **summed** across ranks; a data-parallel engine that
averages (DDP, DeepSpeed) needs the loss multiplied by the world size, or ``num_samples`` set
to the per-rank count (global N / world size, which need not be an integer when ranks keep
different numbers of samples); (2) unequal microbatches are weighted correctly (per pair,
not per batch).

Source: DESIGN.md s.1, checked against ``jaemoo-choi/rethinking-diffusion-rl``
``src/utils/base.py:compute_policy_loss/compute_kl_loss`` (girsanov). Written from the equations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from algo.elbo import EXACT_T_OFFSET, FLOW_WEIGHTINGS, VP_WEIGHTINGS
from algo.registry import Registry

Prediction = Literal["velocity", "epsilon"]
PREDICTIONS: tuple[str, ...] = get_args(Prediction)


@dataclass(frozen=True)
class PairTerms:
    """Inputs of a per-pair loss, all (B,) in the estimate's dtype.

    ``elbo`` carries the gradient; ``old`` and ``adv`` are constants; ``log_ratio`` is the
    detached ``l = sg(E) - E_old`` and ``rho = exp(l)`` (ones for the ``*_noratio`` losses).
    """

    elbo: Tensor
    old: Tensor
    adv: Tensor
    log_ratio: Tensor
    clip_eps: float
    adv_clip_max: float


@dataclass(frozen=True)
class PolicyLoss:
    """A registered policy loss: its per-pair function and what it requires.

    Attributes:
        per_pair: ``(terms, rho) -> loss (B,)``, nothing reduced.
        advantage: the advantage estimator the method defines this loss with (``None``: any);
            the learner config refuses another.
        ratio: weight each pair by ``rho = exp(l)``; ``False`` passes ``rho = 1``.
    """

    per_pair: Callable[[PairTerms, Tensor], Tensor]
    advantage: str | None = None
    ratio: bool = True


LOSSES: Registry[PolicyLoss] = Registry("policy loss", "learner.loss")
"""Every policy loss by name (module table); ``register_loss`` adds one."""


def register_loss(
    name: str, advantage: str | None = None, ratio_free_variant: bool = False
) -> Callable[[Callable[[PairTerms, Tensor], Tensor]], Callable[[PairTerms, Tensor], Tensor]]:
    """Decorator: register ``fn(terms, rho)`` as loss ``name`` (and ``name_noratio`` with
    ``rho = 1`` when ``ratio_free_variant``)."""

    def deco(
        fn: Callable[[PairTerms, Tensor], Tensor],
    ) -> Callable[[PairTerms, Tensor], Tensor]:
        LOSSES.add(name, PolicyLoss(fn, advantage))
        if ratio_free_variant:
            LOSSES.add(f"{name}_noratio", PolicyLoss(fn, advantage, ratio=False))
        return fn

    return deco


@dataclass(frozen=True)
class LossConfig:
    """Everything that fixes the per-pair loss. Validated on construction (``ValueError``).

    Attributes:
        loss: the policy loss (table in the module docstring). Default ``pepg``, the paper's
            "Ours" row.
        weighting: ELBO weighting: ``adaptive`` (default, every released recipe), ``x0_mse``,
            ``exact``, and ``velocity_mse`` (velocity models) or ``epsilon_mse`` (epsilon models).
        prediction: what the model outputs: ``velocity`` (flow matching) or ``epsilon`` (VP).
        clip_eps: ``grpo`` ratio clip half-width, dimensionless (official 1e-3).
        adv_clip_max: ``grpo`` advantage clamp ``|A| <= adv_clip_max`` (official 5). Only
            ``grpo`` clamps; the ELBO losses use the advantage as given.
        beta: Girsanov KL coefficient, per pair, in (prediction units)^2 (default 1e-4); 0 skips
            the reference pass.
        cfg_scale: guidance scale G the training predictions are made with; ``adaptive`` ELBOs are
            divided by G, ``*_mse`` by G^2 (1 = no guidance, the recipe's setting).
        exact_t_offset: the ``exact`` weight is ``(1 - t)/(t + offset)`` (official 1e-3).
    """

    loss: str = "pepg"
    weighting: str = "adaptive"
    prediction: Prediction = "velocity"
    clip_eps: float = 1e-3
    adv_clip_max: float = 5.0
    beta: float = 1e-4
    cfg_scale: float = 1.0
    exact_t_offset: float = EXACT_T_OFFSET

    def __post_init__(self) -> None:
        LOSSES.get(self.loss)
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; expected {PREDICTIONS}")
        allowed = FLOW_WEIGHTINGS if self.prediction == "velocity" else VP_WEIGHTINGS
        if self.weighting not in allowed:
            raise ValueError(
                f"weighting {self.weighting!r} is not valid for {self.prediction} models; "
                f"expected one of {', '.join(allowed.names())}"
            )
        checks = [
            ("clip_eps", self.clip_eps > 0),
            ("adv_clip_max", self.adv_clip_max > 0),
            ("beta", self.beta >= 0),
            ("cfg_scale", self.cfg_scale > 0),
            ("exact_t_offset", self.exact_t_offset >= 0),
        ]
        for name, ok in checks:
            if not ok or not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} out of range: {getattr(self, name)}")


@dataclass(frozen=True)
class GlobalNormalizer:
    """Global counts for one optimizer step; every loss here is divided by ``num_pairs``.

    Attributes:
        num_samples: N, samples contributing to this optimizer step over **all** ranks and
            microbatches.
        num_timesteps: K, ELBO timesteps (or trajectory steps) trained per sample.
    """

    num_samples: float
    num_timesteps: int

    def __post_init__(self) -> None:
        if not self.num_samples > 0 or self.num_timesteps < 1:
            raise ValueError(f"need num_samples > 0 and num_timesteps >= 1, got {self}")

    @property
    def num_pairs(self) -> float:
        """N K, the number of (sample, timestep) pairs the loss is a mean over."""
        return self.num_samples * self.num_timesteps


def clipped_surrogate(
    log_ratio: Tensor, advantages: Tensor, clip_eps: float, adv_clip_max: float
) -> Tensor:
    """PPO/GRPO clipped surrogate per pair (B,): ``max(-A_c r, -A_c clip(r, 1-eps, 1+eps))``.

    ``r = exp(log_ratio)`` keeps its gradient; ``A_c = clamp(A, -adv_clip_max, adv_clip_max)``.
    Shared by the ELBO ``grpo`` loss and the Flow-GRPO trajectory baseline.
    """
    ratio = torch.exp(log_ratio)
    adv = advantages.clamp(-adv_clip_max, adv_clip_max)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    return torch.maximum(unclipped, clipped)


def policy_loss_per_pair(
    elbo: Tensor,
    elbo_old: Tensor,
    advantages: Tensor,
    loss: str,
    clip_eps: float = 1e-3,
    adv_clip_max: float = 5.0,
) -> Tensor:
    """The per-pair policy loss (B,) of the module table (``LOSSES``); nothing reduced.

    ``elbo`` (B,) carries the gradient; ``elbo_old`` and ``advantages`` (B,) are treated as
    constants (detached here).
    """
    if not elbo.shape == elbo_old.shape == advantages.shape or elbo.ndim != 1:
        raise ValueError(
            f"elbo, elbo_old, advantages must share one (B,) shape, got {tuple(elbo.shape)}, "
            f"{tuple(elbo_old.shape)}, {tuple(advantages.shape)}"
        )
    spec = LOSSES.get(loss)
    old = elbo_old.detach().to(elbo.dtype)
    adv = advantages.detach().to(elbo.dtype)
    log_ratio = elbo.detach() - old  # l = sg(E) - E_old
    rho = torch.exp(log_ratio) if spec.ratio else torch.ones_like(log_ratio)
    return spec.per_pair(PairTerms(elbo, old, adv, log_ratio, clip_eps, adv_clip_max), rho)


@register_loss("epg", ratio_free_variant=True)
def _epg(z: PairTerms, rho: Tensor) -> Tensor:
    return -rho * z.adv * z.elbo


@register_loss("pepg", ratio_free_variant=True)
def _pepg(z: PairTerms, rho: Tensor) -> Tensor:
    return -rho * (z.adv - z.log_ratio) * z.elbo


@register_loss("par", ratio_free_variant=True)
def _par(z: PairTerms, rho: Tensor) -> Tensor:
    return 0.5 * rho * (z.adv - (z.elbo - z.old)).square()


@register_loss("grpo", advantage="standard")
def _grpo(z: PairTerms, rho: Tensor) -> Tensor:
    return clipped_surrogate(z.elbo - z.old, z.adv, z.clip_eps, z.adv_clip_max)


def girsanov_kl_per_pair(prediction: Tensor, ref_prediction: Tensor) -> Tensor:
    """``mean((pred - pred_ref)^2)`` over the non-batch dims, (B,); the reference is detached.

    The mean (not sum) over dims matches the per-element scale of the ELBO and the official
    ``compute_kl_loss`` (girsanov), so beta = 1e-4 means the same at any resolution.
    """
    if prediction.shape != ref_prediction.shape:
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and ref {tuple(ref_prediction.shape)} differ"
        )
    dtype = torch.promote_types(prediction.dtype, torch.float32)
    diff = prediction.to(dtype) - ref_prediction.detach().to(dtype)
    return diff.square().mean(dim=tuple(range(1, diff.ndim)))


def elbo_policy_loss(
    elbo: Tensor,
    elbo_old: Tensor,
    advantages: Tensor,
    config: LossConfig,
    normalizer: GlobalNormalizer,
    kl: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """This microbatch's share of the step loss: ``(sum_i loss_i + beta sum_i kl_i) / (N K)``.

    Args:
        elbo: current-policy ELBO (B,), with gradient.
        elbo_old: old-policy ELBO on the same draws (B,).
        advantages: (B,).
        config: the loss settings.
        normalizer: global N and K (module docstring: sum over timesteps, microbatches and ranks
            gives the mean over all pairs).
        kl: per-pair Girsanov KL (B,) from ``girsanov_kl_per_pair``; required iff beta > 0.

    Returns:
        ``(loss, metrics)``; metrics are plain floats over this microbatch's B pairs (see
        ``pair_metrics``).
    """
    if (kl is None) != (config.beta == 0):
        raise ValueError(f"kl must be given iff beta > 0 (beta={config.beta})")
    per_pair = policy_loss_per_pair(
        elbo, elbo_old, advantages, config.loss, config.clip_eps, config.adv_clip_max
    )
    policy = per_pair.sum() / normalizer.num_pairs
    loss = policy
    if kl is not None:
        if kl.shape != elbo.shape:
            raise ValueError(f"kl must have shape {tuple(elbo.shape)}, got {tuple(kl.shape)}")
        loss = policy + config.beta * kl.sum() / normalizer.num_pairs
    metrics = pair_metrics(elbo.detach() - elbo_old.detach(), advantages, config.clip_eps)
    metrics.update(
        {
            "learner/elbo_mean": float(elbo.detach().mean()),
            "learner/elbo_old_mean": float(elbo_old.detach().mean()),
            "learner/policy_loss": float(policy.detach()),
            "learner/loss": float(loss.detach()),
        }
    )
    if kl is not None:
        metrics["learner/kl_mean"] = float(kl.detach().mean())
    return loss, metrics


def pair_metrics(log_ratio: Tensor, advantages: Tensor, clip_eps: float) -> dict[str, float]:
    """Ratio diagnostics over the B pairs of one microbatch, as floats.

    ``ratio_*`` are of ``exp(log_ratio)``; ``clip_frac`` is the fraction with
    ``|ratio - 1| > clip_eps``; ``num_pairs`` = B lets the learner weight means across
    microbatches (reduce ``ratio_min``/``ratio_max`` with min/max, not a mean).
    """
    lr = log_ratio.detach().double()
    ratio = lr.exp()
    return {
        "learner/ratio_mean": float(ratio.mean()),
        "learner/ratio_std": float(ratio.std(unbiased=False)),
        "learner/ratio_min": float(ratio.min()),
        "learner/ratio_max": float(ratio.max()),
        "learner/log_ratio_abs_mean": float(lr.abs().mean()),
        "learner/clip_frac": float(((ratio - 1.0).abs() > clip_eps).double().mean()),
        "learner/adv_mean": float(advantages.detach().double().mean()),
        "learner/num_pairs": float(lr.numel()),
    }
