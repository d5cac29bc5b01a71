"""Settings of the rollout workers and of held-out evaluation: sampler, group size, resources."""

from __future__ import annotations

from pydantic import Field, field_validator

from algo.samplers import SAMPLERS
from common.config import PositiveInt, Resources, Section


class SamplingConfig(Section):
    """How images are drawn from a policy (ODE/SDE solver settings)."""

    sampler: str = Field(
        "dpm2",
        description="A registered sampler (`algo/samplers.py`): `dpm2` (2nd-order "
        "DPM-Solver), `euler` ODE, or the Flow-GRPO `sde`.",
    )
    num_steps: PositiveInt = Field(10, description="Solver steps from t=1 (noise) to t=0.")
    shift: float = Field(1.0, gt=0, description="SD3 timestep shift of the sigma grid (1 = none).")
    eta: float = Field(0.7, ge=0, description="SDE noise level (only for stochastic samplers).")
    guidance: float = Field(
        1.0,
        ge=1.0,
        description="Classifier-free guidance scale G; 1 disables the unconditional pass.",
    )

    @field_validator("sampler")
    @classmethod
    def _registered(cls, v: str) -> str:
        return SAMPLERS.check(v)

    @property
    def stochastic(self) -> bool:
        """Whether the sampler draws noise per step and records log-probs (a trajectory)."""
        return SAMPLERS.get(self.sampler).stochastic


class EvalConfig(Section):
    """Held-out evaluation: the GenEval-style accuracy of the policy."""

    images_per_prompt: PositiveInt = Field(1, description="Images sampled per held-out prompt.")
    max_prompts: int | None = Field(
        None, gt=0, description="Evaluate only the first N held-out prompts; null = all."
    )
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(sampler="euler", num_steps=20),
        description="Sampler used for evaluation (deterministic ODE by default).",
    )
    batch_size: PositiveInt = Field(128, description="Images per sampling batch during eval.")


class RolloutConfig(Section):
    """Rollout workers: sampling K images per prompt with the old (sampling) policy."""

    num_workers: PositiveInt = Field(1, description="Number of rollout actors.")
    resources: Resources = Field(default_factory=Resources, description="Per-actor resources.")
    prompts_per_round: PositiveInt = Field(8, description="Distinct prompts per RL round.")
    images_per_prompt: PositiveInt = Field(
        8, description="Group size K: images per prompt, normalised together for advantages."
    )
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Rollout sampler.")

    @property
    def images_per_round(self) -> int:
        """Images generated (and trained on) per round."""
        return self.prompts_per_round * self.images_per_prompt
