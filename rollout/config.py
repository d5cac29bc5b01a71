"""Settings of the rollout workers and of held-out evaluation: sampler, group size, resources."""

from __future__ import annotations

from pydantic import Field

from common.config import PositiveInt, Resources, SamplingConfig, Section

__all__ = ["EvalConfig", "RolloutConfig", "SamplingConfig"]


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
    images_per_category: int | None = Field(
        None,
        gt=0,
        description="Balance the evaluation over the world's categories: each category's "
        "prompts get ceil(N / its prompt count) images each (at least images_per_prompt), so "
        "a category of 3 prompts is measured as precisely as one of 36; null = "
        "images_per_prompt for every prompt.",
    )
    pass_k: int | None = Field(
        None,
        gt=0,
        description="Also report pass@K per category (unbiased estimator over n >= 2K "
        "images per prompt; `elborl eval --pass-k K` sets it); null = pass@1 only.",
    )


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
