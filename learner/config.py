"""Settings of the learner, and the one mapping from them to the math's arguments.

``LearnerConfig.loss_config`` and ``LearnerConfig.advantage_config`` are the only places a
config turns into ``algo.losses.LossConfig`` / ``algo.advantages.AdvantageConfig``: the
driver, the engine and the benchmarks all call them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from algo.advantages import ADVANTAGES, AdvantageConfig
from algo.elbo import FLOW_WEIGHTINGS, VP_WEIGHTINGS
from algo.losses import LOSSES, LossConfig
from algo.old_policy import OLD_POLICY_SCHEDULES
from algo.registry import Registry
from common.config import PositiveInt, Resources, Section
from learner.estimators import ESTIMATORS

_REGISTRIES: dict[str, Registry[Any]] = {
    "loss": LOSSES,
    "estimator": ESTIMATORS,
    "advantage": ADVANTAGES,
    "old_policy_schedule": OLD_POLICY_SCHEDULES,
}


class LearnerConfig(Section):
    """The learner: ELBO likelihoods, the policy loss and the optimizer."""

    num_workers: PositiveInt = Field(
        1, description="Data-parallel learner ranks (one DeepSpeed group)."
    )
    resources: Resources = Field(default_factory=Resources, description="Per-rank resources.")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage 0-3.")
    lr: float = Field(3e-4, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(5.0, gt=0, description="Gradient-norm clip per optimizer step.")
    microbatch_size: PositiveInt = Field(16, description="Samples per rank per forward pass.")
    loss: str = Field(
        "pepg",
        description="Policy loss, a registered name (`algo/losses.py`, DESIGN.md section 1): "
        "epg, pepg, par, grpo and the *_noratio variants.",
    )
    estimator: str = Field(
        "elbo",
        description="Likelihood estimator (`learner/estimators.py`): `elbo` (final-sample "
        "ELBO) or `trajectory` (SDE trajectory log-probs, the Flow-GRPO baseline).",
    )
    elbo_weighting: str = Field(
        "adaptive",
        description="ELBO weighting (`algo/elbo.py`, DESIGN.md section 1): adaptive, x0_mse, "
        "exact, and velocity_mse (flow models) or epsilon_mse (epsilon models).",
    )
    num_timesteps: PositiveInt = Field(
        9, description="ELBO timesteps K per sample, drawn from the rollout sampler's schedule."
    )
    group_shared_noise: bool = Field(
        False,
        description="Use one ELBO draw (timesteps and eps) for all K images of a prompt group, "
        "besides sharing it between the current, old and reference passes. Advantages sum to "
        "zero within a group, so the draw's common-mode gradient cancels (a control variate).",
    )
    clip_eps: float = Field(1e-3, gt=0, description="GRPO ratio clip range epsilon.")
    adv_clip: float = Field(5.0, gt=0, description="GRPO advantage clamp (absolute value).")
    advantage: str = Field(
        "exact", description="Advantage estimator (`algo/advantages.py`): exact or standard."
    )
    advantage_scale: float | None = Field(
        None,
        gt=0,
        description="Advantage scale; null = 0.1 for `exact` (reward units^-1), 1 for `standard`.",
    )
    advantage_std: Literal["group", "round"] = Field(
        "group", description="Std used by the `standard` advantage: per prompt group or per round."
    )
    kl_beta: float = Field(1e-4, ge=0, description="KL weight to the reference (base) policy.")
    train_guidance: float | None = Field(
        None,
        ge=1.0,
        description="Classifier-free guidance scale G inside the learner's current and old "
        "passes (ELBO or trajectory log-probs); the ELBO is divided by it as the method "
        "defines. null = the rollouts' `rollout.sampling.guidance`. The trajectory baseline "
        "needs the sampling scale (it re-scores the sampled steps).",
    )
    first_ratio_tol: float = Field(
        1e-2,
        ge=0,
        description="Fail fast: before the first update the current and old policies are the "
        "same weights, so every importance ratio must be 1; the run stops (nothing applied) if "
        "one is further from 1 than this (guidance, dtype, adapter or re-scoring mistakes). "
        "0 = no check.",
    )
    ref_guidance: float | None = Field(
        None,
        ge=1.0,
        description="Guidance scale of the reference passes (the KL term); null = the "
        "training scale.",
    )
    old_policy_schedule: str = Field(
        "linear",
        description="Old-policy EMA old <- d old + (1 - d) current after each optimizer step "
        "(`algo/old_policy.py`); `linear`: d = min(0.001 step, 0.5) (the paper's recipe); "
        "`copy`: d = 0; `delayed_slow`, `delayed_fast`.",
    )

    @field_validator("loss", "estimator", "advantage", "old_policy_schedule")
    @classmethod
    def _registered(cls, v: str, info: ValidationInfo) -> str:
        return _REGISTRIES[str(info.field_name)].check(v)

    @field_validator("elbo_weighting")
    @classmethod
    def _weighting(cls, v: str) -> str:
        if v in FLOW_WEIGHTINGS or v in VP_WEIGHTINGS:
            return v
        names = sorted({*FLOW_WEIGHTINGS.names(), *VP_WEIGHTINGS.names()})
        raise ValueError(f"unknown ELBO weighting {v!r}; registered: {', '.join(names)}")

    @model_validator(mode="after")
    def _loss_and_advantage(self) -> LearnerConfig:
        wanted = LOSSES.get(self.loss).advantage if self.loss in LOSSES else None
        if wanted is not None and self.advantage != wanted:
            raise ValueError(
                f"learner.loss = {self.loss!r} is defined with the {wanted!r} advantage, got "
                f"learner.advantage = {self.advantage!r}; set learner.advantage = {wanted!r} "
                "(the method's GRPO also uses learner.advantage_std = 'round')"
            )
        return self

    def guidance_scales(self, sampling_guidance: float) -> tuple[float, float]:
        """``(training, reference)`` guidance scales for rollouts sampled at
        ``sampling_guidance`` (the nulls resolved)."""
        train = self.train_guidance if self.train_guidance is not None else sampling_guidance
        return train, self.ref_guidance if self.ref_guidance is not None else train

    def loss_config(self, prediction: str, cfg_scale: float) -> LossConfig:
        """The math's loss settings for a model predicting ``prediction`` (velocity/epsilon),
        trained at guidance scale ``cfg_scale``."""
        return LossConfig(
            loss=self.loss,
            weighting=self.elbo_weighting,
            prediction=prediction,  # type: ignore[arg-type]
            clip_eps=self.clip_eps,
            adv_clip_max=self.adv_clip,
            beta=self.kl_beta,
            cfg_scale=cfg_scale,
        )

    def advantage_config(self) -> AdvantageConfig:
        """The math's advantage settings."""
        return AdvantageConfig(
            method=self.advantage, scale=self.advantage_scale, std_scope=self.advantage_std
        )
