"""The base of every config section, and the Ray resources one actor of a role reserves.

Each component owns the pydantic models of its own settings (``learner/config.py``,
``rollout/config.py``, ``rewards/config.py``, ``policy/config.py``, the world's beside the
world); ``services/config.py`` composes them into the run's tree. They all extend ``Section``:
frozen, unknown keys rejected, defaults validated.
"""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

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
