"""Group-relative advantages: rewards are compared within each prompt's group of images.

With ``R`` the reward of one image and ``mean_g`` the mean over its prompt group g
(K images per prompt, 24 in the released recipe):

- ``exact`` (default): ``A = scale (R - mean_g)``, scale 0.1; no std, no clipping. The paper's
  "no-proximal" advantage. The official code writes the scale as ``BETA / ALPHA = 1e-4 / 1e-3``
  (the KL coefficient reused); we keep it a separate number so beta can change alone.
- ``standard``: ``A = scale (R - mean_g) / (std + 1e-4)``, with std the population std of the
  group (``std_scope="group"``) or of the whole round (``"round"``, the official default
  ``global_std=True``); scale 1 by default.

Degenerate groups are explicit: a group of size 1 or with zero reward variance carries no
preference signal, so its advantages are set to **exactly 0** (not left to ``R - mean`` round-off
or a 0/1e-4 division) and counted in the metrics (``advantage/zero_std_groups``,
``advantage/singleton_groups``). Statistics are computed in float64.

Source: DESIGN.md s.1; checked against ``jaemoo-choi/rethinking-diffusion-rl``
``src/utils/__init__.py:PerPromptStatTracker.update`` (population std, ``+ 1e-4``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from algo.registry import Registry

StdScope = Literal["group", "round"]
STD_SCOPES: tuple[str, ...] = get_args(StdScope)


@dataclass(frozen=True)
class GroupStats:
    """One round's rewards against their groups, float64: ``rewards`` (N,), ``centered``
    (N,) = R - mean_g, ``group_std`` (N,) the population std of each sample's group."""

    rewards: Tensor
    centered: Tensor
    group_std: Tensor


@dataclass(frozen=True)
class AdvantageEstimator:
    """A registered advantage: ``fn(stats, config) -> unscaled advantages (N,)`` and the scale
    used when ``AdvantageConfig.scale`` is None."""

    fn: Callable[[GroupStats, AdvantageConfig], Tensor]
    default_scale: float


ADVANTAGES: Registry[AdvantageEstimator] = Registry("advantage", "learner.advantage")
"""Every advantage estimator by name (module docstring)."""


@dataclass(frozen=True)
class AdvantageConfig:
    """How rewards become advantages. Validated on construction (``ValueError``).

    Attributes:
        method: ``exact`` (scale (R - mean_g)) or ``standard`` (divided by a std).
        scale: multiplies the advantage (reward units^-1 for ``exact``; dimensionless for
            ``standard``). ``None`` picks the recipe default: 0.1 for exact, 1.0 for standard.
        std_scope: ``standard`` only: std over each prompt group or over the whole round.
        std_eps: ``standard`` only: added to the std (official 1e-4), reward units.
    """

    method: str = "exact"
    scale: float | None = None
    std_scope: StdScope = "group"
    std_eps: float = 1e-4

    def __post_init__(self) -> None:
        ADVANTAGES.get(self.method)
        if self.std_scope not in STD_SCOPES:
            raise ValueError(f"unknown std_scope {self.std_scope!r}; expected {STD_SCOPES}")
        if self.scale is not None and not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if not self.std_eps > 0:
            raise ValueError(f"std_eps must be > 0, got {self.std_eps}")

    @property
    def effective_scale(self) -> float:
        """The scale in use: the given one, or 0.1 (exact) / 1.0 (standard)."""
        if self.scale is not None:
            return self.scale
        return ADVANTAGES.get(self.method).default_scale


def compute_advantages(
    rewards: Tensor, group_ids: Tensor, config: AdvantageConfig | None = None
) -> tuple[Tensor, dict[str, float]]:
    """Advantages (N,) for one round of N scored images, grouped by prompt.

    Args:
        rewards: (N,) scalar reward per image (any float dtype; must be finite).
        group_ids: (N,) integer prompt-group label per image (any values; equal label = same
            prompt). Groups may have different sizes.
        config: the method; default ``AdvantageConfig()`` (exact, scale 0.1).

    Returns:
        ``(advantages, metrics)``: advantages (N,) in float32 (float64 if rewards are float64),
        every group's advantages summing to 0, degenerate groups exactly 0; metrics under
        ``reward/``.
    """
    config = config or AdvantageConfig()
    _check_inputs(rewards, group_ids)
    r = rewards.detach().double()
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    num_groups = counts.numel()
    mean_g = torch.zeros(num_groups, dtype=r.dtype, device=r.device).index_add_(0, inverse, r)
    mean_g = mean_g / counts
    centered = r - mean_g[inverse]
    var_g = torch.zeros_like(mean_g).index_add_(0, inverse, centered.square()) / counts
    std_g = var_g.sqrt()
    degenerate_g = (counts == 1) | (var_g == 0)  # (G,)
    stats = GroupStats(rewards=r, centered=centered, group_std=std_g[inverse])
    adv = ADVANTAGES.get(config.method).fn(stats, config)
    adv = config.effective_scale * adv
    adv = torch.where(degenerate_g[inverse], torch.zeros_like(adv), adv)
    out_dtype = torch.promote_types(rewards.dtype, torch.float32)
    metrics = {
        "advantage/num_groups": float(num_groups),
        "advantage/group_size_mean": float(counts.double().mean()),
        "advantage/singleton_groups": float((counts == 1).sum()),
        "advantage/zero_std_groups": float(((var_g == 0) & (counts > 1)).sum()),
        "advantage/zero_std_ratio": float(degenerate_g.double().mean()),
        "advantage/group_std_mean": float(std_g.mean()),
        "advantage/mean": float(adv.mean()),
        "advantage/std": float(adv.std(unbiased=False)),
        "advantage/abs_mean": float(adv.abs().mean()),
        "advantage/max": float(adv.max()),
        "advantage/min": float(adv.min()),
    }
    return adv.to(out_dtype), metrics


def _exact(stats: GroupStats, config: AdvantageConfig) -> Tensor:
    return stats.centered


def _standard(stats: GroupStats, config: AdvantageConfig) -> Tensor:
    std = stats.group_std if config.std_scope == "group" else stats.rewards.std(unbiased=False)
    return stats.centered / (std + config.std_eps)


ADVANTAGES.add("exact", AdvantageEstimator(_exact, default_scale=0.1))
ADVANTAGES.add("standard", AdvantageEstimator(_standard, default_scale=1.0))


def _check_inputs(rewards: Tensor, group_ids: Tensor) -> None:
    if rewards.ndim != 1 or rewards.numel() == 0 or not rewards.is_floating_point():
        raise ValueError(f"rewards must be a non-empty float (N,) tensor, got {rewards.shape}")
    if group_ids.shape != rewards.shape:
        raise ValueError(f"group_ids {tuple(group_ids.shape)} must match rewards {rewards.shape}")
    if group_ids.is_floating_point() or group_ids.is_complex():
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contain NaN or inf")
