"""The one typed configuration tree of an elborl run, composed from the components' own.

Every run (pretraining, RL training, evaluation) is described by one ``RunConfig`` loaded
from a YAML file in ``configs/`` and optionally overridden from the command line with
``--set section.field=value``. Each section's model lives beside its component
(``worlds/``, ``policy/config.py``, ``rollout/config.py``, ``rewards/config.py``,
``learner/config.py``); this module adds the loop's own sections (``train``, ``faults``,
``service``), composes the tree, and checks what spans components (sizes that must divide,
timesteps that must exist) in ``RunConfig._check_sizes``, the one place derived sizes are
computed. All models are frozen and forbid unknown keys, so a typo is an error before any
work starts rather than a silently ignored setting.

Loading errors are raised as ``ConfigError`` whose message names the file, the line where
the YAML has one, the dotted field and what is allowed.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SerializeAsAny, ValidationError, field_validator, model_validator

from common.config import PositiveInt, Resources, Section
from learner.config import LearnerConfig
from learner.estimators import ESTIMATORS
from policy.config import LoraConfig, ModelConfig, PretrainConfig
from rewards.config import RewardsConfig, RewardSpec, check_metric_names, metric_name
from rollout.config import EvalConfig, RolloutConfig, SamplingConfig
from worlds.base import WorldConfig, world_class, world_names

_Section = Section
RUNS_DIR_ENV = "ELBORL_RUNS_DIR"
"""Environment variable naming the persistent root of run directories (beats `runs_dir`)."""

__all__ = [
    "RUNS_DIR_ENV",
    "ConfigError",
    "EvalConfig",
    "FaultsConfig",
    "LearnerConfig",
    "LoraConfig",
    "ModelConfig",
    "PretrainConfig",
    "Resources",
    "RewardSpec",
    "RewardsConfig",
    "RolloutConfig",
    "RunConfig",
    "SamplingConfig",
    "ServiceConfig",
    "TrainConfig",
    "WorldConfig",
    "load_config",
]


class TrainConfig(_Section):
    """The RL loop around the roles."""

    rounds: PositiveInt = Field(100, description="RL rounds (generate, score, update) to run.")
    eval_every: int = Field(10, ge=0, description="Rounds between held-out evals; 0 = only at end.")
    checkpoint_every: int = Field(
        10, ge=0, description="Rounds between checkpoints; 0 = at end only."
    )
    sample_grid_every: int = Field(5, ge=0, description="Rounds between logged sample grids.")
    eval_at_start: bool = Field(
        False,
        description="Also evaluate the initial weights before round 1 of a fresh run, logged as "
        "round 0, so the held-out curves start at the base model.",
    )
    async_rollout: bool = Field(
        False, description="Overlap round r+1's rollouts with round r's update."
    )
    step_timeout_s: float = Field(
        600.0,
        gt=0,
        description="Longest wait for one phase of a round (rollout, score, "
        "learner step, actor start-up), seconds; past it the run stops with an error.",
    )


class GuardConfig(_Section):
    """A guard against reward hacking: the training reward rising while a watched held-out
    metric falls, evaluation after evaluation."""

    watch: list[str] = Field(
        default_factory=list,
        description="Held-out metrics to watch, e.g. `eval/reward_aesthetic` (from "
        "eval.rewards) or `eval/overall`; empty = the guard is off.",
    )
    train_metric: str = Field(
        "reward/mean",
        description="The training metric whose rise is compared, averaged over the rounds "
        "between two evaluations.",
    )
    patience: PositiveInt = Field(
        2,
        description="Consecutive evaluations at which the training metric rose and a watched "
        "one fell before the guard fires.",
    )
    min_change: float = Field(
        0.0, ge=0, description="Changes of at most this size (either metric) do not count."
    )
    action: Literal["warn", "stop"] = Field(
        "warn",
        description="`warn`: a log line, the status API's `warnings`, the `guard/alarm` metric "
        "and Prometheus' `elborl_warnings`; `stop`: also stop the run gracefully (the round in "
        "flight finishes and is checkpointed).",
    )

    @field_validator("watch")
    @classmethod
    def _held_out(cls, v: list[str]) -> list[str]:
        bad = [k for k in v if not k.startswith("eval/")]
        if bad:
            raise ValueError(f"guard.watch takes held-out metrics (eval/...), not {bad}")
        return v


class FaultsConfig(_Section):
    """What the run tolerates before it stops (docs/reliability.md)."""

    reward_retries: int = Field(
        2,
        ge=0,
        description="Retries of one reward batch whose actor died or timed out; after them the "
        "batch's samples are dropped and counted (`faults/samples_dropped`).",
    )
    max_restarts: int = Field(
        5,
        ge=0,
        description="Actor replacements per role (rollout, reward) over the whole run; one more "
        "death stops the run with a checkpoint.",
    )
    max_invalid_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Largest fraction of a round's samples that may be invalid (NaN/inf or "
        "out-of-range reward, or dropped) before the round counts as bad.",
    )
    max_bad_rounds: PositiveInt = Field(
        3,
        description="Consecutive bad rounds (see max_invalid_fraction) or skipped learner steps "
        "(non-finite loss) after which the run stops with an error and a checkpoint.",
    )


class ServiceConfig(_Section):
    """The status/control HTTP service (``services/api``): JSON API, Prometheus, dashboard."""

    enabled: bool = Field(
        False,
        description="Serve the status API and dashboard from the driver process while training.",
    )
    host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Bind address; loopback unless you mean otherwise (e.g. 0.0.0.0 on a Ray "
        "head node behind a firewall).",
    )
    port: int = Field(8470, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    token_env: str = Field(
        "ELBORL_TOKEN",
        min_length=1,
        description="Name of the environment variable holding the bearer token (not the token).",
    )
    token_file: str | None = Field(
        None,
        description="File holding the bearer token, read when the variable in token_env is "
        "unset or empty.",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins allowed to call the API from a browser page served elsewhere; "
        "empty = CORS off.",
    )


class EvalSettings(EvalConfig):
    """Held-out evaluation: the rollout worker's sampling settings, plus the rewards the
    driver watches on the held-out images."""

    rewards: list[RewardSpec] = Field(
        default_factory=list,
        description="Rewards scored on every held-out evaluation's images besides the world's "
        "verifier (for a world without one, e.g. `text`, instead of it), logged as "
        "`eval/reward_<name>` (the mean over valid scores): watch rewards you do not train "
        "on, e.g. an aesthetic score and CLIP score while training on PickScore.",
    )

    @field_validator("rewards")
    @classmethod
    def _distinct_names(cls, v: list[RewardSpec]) -> list[RewardSpec]:
        check_metric_names([metric_name(s) for s in v], "eval.rewards")
        return v


class RunConfig(_Section):
    """A whole run. Sections are handed to the role that needs them and nothing more."""

    name: str = Field(
        "shapes", min_length=1, description="Run name; also the run directory's prefix."
    )
    seed: int = Field(0, ge=0, description="Base seed; per-worker/round seeds derive from it.")
    runs_dir: str = Field(
        "runs",
        description="Root of the run directories (`<runs_dir>/<name>/`), resolved to an absolute "
        f"path on the driver's node. A relative one (the default `runs`) is replaced by the "
        f"environment variable {RUNS_DIR_ENV} when that is set (deploy/submit.sh sets it); an "
        "absolute one is kept. Under `ray job submit` a relative root without the variable is "
        "refused: it would land in the job's temporary working directory, which Ray deletes.",
    )
    world: SerializeAsAny[WorldConfig] = Field(
        default_factory=WorldConfig,
        description="Task world: `name` selects a registered world, whose own config class "
        "(e.g. `worlds.shapes.world.ShapesConfig`) validates the rest.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="Policy model.")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="Pretraining.")
    eval: EvalSettings = Field(
        default_factory=lambda: EvalSettings(), description="Held-out evaluation."
    )
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Rollout workers.")
    rewards: RewardsConfig = Field(default_factory=RewardsConfig, description="Reward pool.")
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="Learner.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="RL loop.")
    faults: FaultsConfig = Field(default_factory=FaultsConfig, description="Fault tolerance.")
    guard: GuardConfig = Field(default_factory=GuardConfig, description="Reward-hacking guard.")
    service: ServiceConfig = Field(default_factory=ServiceConfig, description="Status service.")

    @field_validator("world", mode="before")
    @classmethod
    def _the_world_s_own_config(cls, v: Any) -> Any:
        """Validate ``world`` with the config class of the world it names."""
        if isinstance(v, WorldConfig):
            v = v.model_dump()
        if not isinstance(v, dict):
            return v
        name = v.get("name", "shapes")
        if name not in world_names():
            raise ValueError(f"unknown world {name!r}; registered: {', '.join(world_names())}")
        return world_class(name).config_class.model_validate(v)

    def runs_root(self) -> Path:
        """The absolute root of run directories: an absolute ``runs_dir``, else
        ``$ELBORL_RUNS_DIR`` when set, else ``runs_dir`` against the working directory."""
        own = Path(self.runs_dir).expanduser()
        env = os.environ.get(RUNS_DIR_ENV)
        return (own if own.is_absolute() or not env else Path(env).expanduser()).absolute()

    @model_validator(mode="after")
    def _check_sizes(self) -> RunConfig:
        """Derived sizes must be consistent; each message names the fields and the fix."""
        ro, lr = self.rollout, self.learner
        per_rank, rem = divmod(ro.images_per_round, lr.num_workers)
        if rem:
            raise ValueError(
                f"rollout.prompts_per_round * rollout.images_per_prompt = {ro.images_per_round} "
                f"images per round must divide evenly over learner.num_workers = {lr.num_workers}"
            )
        if per_rank % lr.microbatch_size:
            raise ValueError(
                f"each learner rank gets {per_rank} images per round, which is not a multiple of "
                f"learner.microbatch_size = {lr.microbatch_size}; choose a divisor of {per_rank}"
            )
        chunks = math.lcm(ro.num_workers, lr.num_workers)
        if ro.images_per_round % chunks:
            raise ValueError(
                f"a round's {ro.images_per_round} images are dealt in lcm(rollout.num_workers, "
                f"learner.num_workers) = {chunks} equal chunks; make rollout.prompts_per_round * "
                "rollout.images_per_prompt a multiple of it"
            )
        needs_trajectory = ESTIMATORS.get(lr.estimator).needs_trajectory
        if not needs_trajectory and lr.num_timesteps > ro.sampling.num_steps:
            raise ValueError(
                f"learner.num_timesteps = {lr.num_timesteps} exceeds the sampler schedule "
                f"(rollout.sampling.num_steps = {ro.sampling.num_steps}); use at most that many"
            )
        if needs_trajectory and not ro.sampling.stochastic:
            raise ValueError(
                f"learner.estimator = {lr.estimator!r} needs SDE rollouts with log-probs: set "
                "rollout.sampling.sampler = 'sde'"
            )
        return self

    @model_validator(mode="after")
    def _check_guidance(self) -> RunConfig:
        """The trajectory baseline re-scores the sampled SDE steps: same guidance or no ratio."""
        lr, sampling = self.learner, self.rollout.sampling
        train, _ = lr.guidance_scales(sampling.guidance)
        if ESTIMATORS.get(lr.estimator).needs_trajectory and train != sampling.guidance:
            raise ValueError(
                f"learner.estimator = {lr.estimator!r} re-scores the sampled steps, so its "
                f"passes need the sampling guidance: learner.train_guidance = {train} differs "
                f"from rollout.sampling.guidance = {sampling.guidance}; set it to "
                f"{sampling.guidance} or leave it null"
            )
        return self


class ConfigError(ValueError):
    """A configuration the user must fix; the message says where and how."""


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set learner.lr=1e-4")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML scalars) to a nested dict."""
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                dotted = ".".join(path[: i + 1])
                raise ConfigError(f"--set {item!r}: {dotted} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def _yaml_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path in a YAML document to its 1-based line number (for error messages)."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                path = (*prefix, str(key.value))
                lines[path] = key.start_mark.line + 1
                walk(value, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, value in enumerate(node.value):
                walk(value, (*prefix, str(i)))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def _format_error(err: ValidationError, source: str, lines: dict[tuple[str, ...], int]) -> str:
    parts = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        field = ".".join(loc) or "(top level)"
        line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
        where = f" (line {line})" if line else ""
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key; check the spelling against `elborl config` or the docs"
        elif e["type"] == "literal_error" or "input" not in e:
            pass
        else:
            msg = f"{msg} (got {e['input']!r})"
        parts.append(f"  {field}{where}: {msg}")
    return "\n".join(parts)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a ``RunConfig`` from YAML (or defaults when ``path`` is None) plus overrides.

    Raises ``ConfigError`` naming the file, line and field for anything invalid.
    """
    text, source = "", "(defaults)"
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {source}: {exc}") from exc
    try:
        data = yaml.safe_load(text) if text else {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{source}:{where} is not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: the top level must be a mapping of sections, got {type(data).__name__}"
        )
    if overrides:
        data = apply_overrides(data, overrides)
        source += " with --set " + " ".join(overrides)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source, _yaml_lines(text) if text else {})) from None


def config_to_yaml(cfg: RunConfig) -> str:
    """The full, resolved config as YAML (written into every run directory)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
