"""Settings of the reward pool: which rewards, their weights and ranges, actors and timeouts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import Field, field_validator, model_validator

from common.config import PositiveInt, Resources, Section


class RewardSpec(Section):
    """One reward function in the weighted sum."""

    name: str = Field(
        ...,
        min_length=1,
        description="A registered reward (`elborl config` lists them; built in: the world's "
        "own, e.g. `shapes` (fraction of clauses passed) and `shapes_strict` (1 if every clause "
        "passes), and `jpeg_(in)compressibility` (-/+ JPEG kB)); or your own as "
        "`package.module:ClassName` (a `rewards.base.Reward` subclass importable on every node).",
    )
    weight: float = Field(1.0, description="Weight of this reward in the total (dimensionless).")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments of the reward's constructor: for `remote` its `url`, "
        "`reward`, `token_env`/`token_file`, `timeout_s`, `max_batch`, `encoding`, `format`, "
        "`concurrency`, `retries`, `deadline_s` (docs/reward-protocol.md); for a "
        "`module:Class` reward its own; the other built-ins take none.",
    )
    range: tuple[float, float] | None = Field(
        None,
        description="Valid score range [low, high]; a score outside it (or NaN/inf) makes the "
        "sample invalid (dropped and counted). Default: the reward's own declared range.",
    )

    @field_validator("name")
    @classmethod
    def _known_name(cls, v: str) -> str:
        from rewards.base import reward_names

        module, sep, attr = v.partition(":")
        if v in reward_names() or (sep and module and attr.isidentifier()):
            return v
        raise ValueError(
            f"unknown reward {v!r}: use one of {', '.join(reward_names())} or an import "
            "path `package.module:ClassName`"
        )

    @model_validator(mode="after")
    def _check(self) -> RewardSpec:
        from rewards.base import REWARDS, check_params, reward_names

        if self.name in reward_names():
            check_params(self.name, REWARDS.get(self.name), self.params)
        if self.range is not None and not self.range[0] < self.range[1]:
            raise ValueError(f"range {list(self.range)} must be [low, high] with low < high")
        return self


# Summary keys of the reward metrics (`reward/mean`...): a reward's own curve `reward/<name>`
# must not take one of them.
RESERVED_NAMES = ("mean", "std", "accuracy", "diversity")


def metric_name(spec: RewardSpec) -> str | None:
    """The name a reward's metrics are keyed by, where the config alone tells it: a registered
    reward's name, a `module:Class` reward's class name, a remote reward's `params.reward`
    (None when the server is to say)."""
    if spec.name == "remote":
        served = spec.params.get("reward")
        return str(served) if served else None
    return spec.name.partition(":")[2] or spec.name


def check_metric_names(names: Sequence[str | None], where: str) -> None:
    """``ValueError`` unless every known name is unique and none is a summary key."""
    known = [n for n in names if n is not None]
    for n in known:
        if n in RESERVED_NAMES:
            raise ValueError(
                f"{where}: a reward named {n!r} would overwrite the summary metric "
                f"`reward/{n}`; rename it (a `module:Class` reward: set its `name`)"
            )
    dup = sorted({n for n in known if known.count(n) > 1})
    if dup:
        raise ValueError(
            f"{where}: rewards {dup} appear more than once, so one's metrics would overwrite "
            "the other's; list each reward once (weights add up) or give each its own name"
        )


class RewardsConfig(Section):
    """The reward actor pool."""

    functions: list[RewardSpec] = Field(
        default_factory=lambda: [RewardSpec(name="shapes")],
        min_length=1,
        description="Reward functions and weights; each is also logged on its own.",
    )
    num_actors: PositiveInt = Field(1, description="Reward actors in the pool.")
    resources: Resources = Field(
        default_factory=lambda: Resources(num_cpus=0.5), description="Per-actor resources."
    )
    timeout_s: float = Field(
        60.0,
        gt=0,
        description="Per-call scoring timeout, seconds: a reward actor that has not answered "
        "by then is killed and replaced, and the batch retried (see `faults.reward_retries`).",
    )

    @field_validator("functions")
    @classmethod
    def _distinct_names(cls, v: list[RewardSpec]) -> list[RewardSpec]:
        check_metric_names([metric_name(s) for s in v], "rewards.functions")
        return v
