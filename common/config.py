"""The base of every config section, the Ray resources one actor of a role reserves, and the
sampler settings both the rollouts and the learner read (the learner takes its ELBO
timesteps from the rollout sampler's own grid).

Each component owns the pydantic models of its own settings (``learner/config.py``,
``rollout/config.py``, ``rewards/config.py``, ``policy/config.py``, the world's beside the
world); ``services/config.py`` composes them into the run's tree. They all extend ``Section``:
frozen, unknown keys rejected, defaults validated.
"""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from algo.samplers import GRIDS, SAMPLERS

PositiveInt = Annotated[int, Field(gt=0)]


class Section(BaseModel):
    """Base of every config section: frozen, unknown keys rejected, types not coerced loosely."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class Resources(Section):
    """Ray resources one actor of a role reserves (fractions allowed)."""

    num_cpus: float = Field(
        1.0, ge=0, description="CPU cores reserved per actor (Ray logical CPUs)."
    )
    num_gpus: float = Field(
        0.0, ge=0, description="GPUs reserved per actor; fractional shares a GPU."
    )
    custom: dict[str, float] = Field(
        default_factory=dict,
        description="Extra Ray custom resources per actor, e.g. {'rollout_node': 1} to pin a role.",
    )
    torch_threads: int | None = Field(
        None, gt=0, description="torch intra-op threads per actor; null = ceil(num_cpus), min 1."
    )

    @property
    def threads(self) -> int:
        """torch intra-op threads for one actor of this role."""
        return self.torch_threads or max(1, math.ceil(self.num_cpus))


class SamplingConfig(Section):
    """How images are drawn from a policy (ODE/SDE solver settings)."""

    sampler: str = Field(
        "dpm2",
        description="A registered sampler (`algo/samplers.py`): `dpm2` (2nd-order "
        "DPM-Solver), `euler` ODE, or the Flow-GRPO `sde`.",
    )
    num_steps: PositiveInt = Field(10, description="Solver steps from t=1 (noise) to t=0.")
    shift: float = Field(1.0, gt=0, description="SD3 timestep shift of the sigma grid (1 = none).")
    grid: str = Field(
        "uniform",
        description="The sigma grid (`algo/samplers.py` GRIDS): `uniform` = 1 - i/S, shifted "
        "once by `shift`; `diffusers` = the model's own pipeline's grid: for `tiny` "
        "FlowMatchEulerDiscreteScheduler's default at `shift`, for `sd3` that at the "
        "scheduler's own shift (3; what flow_grpo and the paper sample SD3.5 on), for `flux` "
        "the uniform grid at the dynamic shift exp(mu) of the image's token count. The "
        "learner's ELBO timesteps come from the same grid.",
    )
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

    @field_validator("grid")
    @classmethod
    def _known_grid(cls, v: str) -> str:
        return GRIDS.check(v)

    @property
    def stochastic(self) -> bool:
        """Whether the sampler draws noise per step and records log-probs (a trajectory)."""
        return SAMPLERS.get(self.sampler).stochastic
