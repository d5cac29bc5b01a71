"""The one typed configuration tree of an elborl run.

Every run (pretraining, RL training, evaluation) is described by one ``RunConfig`` loaded
from a YAML file in ``configs/`` and optionally overridden from the command line with
``--set section.field=value``. All models are frozen and forbid unknown keys, so a typo is
an error before any work starts rather than a silently ignored setting. Cross-field checks
(sizes that must divide, timesteps that must exist) live in ``RunConfig._check_sizes``, the
one place derived sizes are computed.

Loading errors are raised as ``ConfigError`` whose message names the file, the line where
the YAML has one, the dotted field and what is allowed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PositiveInt = Annotated[int, Field(gt=0)]


class _Section(BaseModel):
    """Base of every config section: frozen, unknown keys rejected, types not coerced loosely."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class Resources(_Section):
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


class WorldConfig(_Section):
    """The task world: where prompts come from and how images are judged."""

    name: Literal["shapes"] = Field("shapes", description="Built-in world; only `shapes` so far.")
    image_size: PositiveInt = Field(32, description="Side of the square RGB images, in pixels.")
    train_prompts: str = Field(
        "train",
        description="Prompts for training: a split name (`train`, `heldout`, `all`) or a path to "
        "a text file with one prompt per line.",
    )
    eval_prompts: str = Field(
        "heldout", description="Prompts for held-out evaluation: split name or file path."
    )


class LoraConfig(_Section):
    """Low-rank adapters on the attention projections (peft); rank 0 trains all weights."""

    rank: int = Field(0, ge=0, description="LoRA rank r; 0 disables LoRA (full fine-tuning).")
    alpha: int = Field(0, ge=0, description="LoRA alpha; scale is alpha / rank. 0 means 2 * rank.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        description="Module name suffixes that receive adapters.",
    )


class TinyArchConfig(_Section):
    """Architecture of the built-in tiny text-conditional flow model (pixel space)."""

    channels: tuple[PositiveInt, ...] = Field(
        (32, 64, 64), description="UNet block widths (channels) from the top level down."
    )
    layers_per_block: PositiveInt = Field(1, description="ResNet layers per UNet block.")
    text_dim: PositiveInt = Field(64, description="Width of the word-level prompt encoder.")
    text_layers: PositiveInt = Field(2, description="Transformer layers in the prompt encoder.")
    pack: PositiveInt = Field(
        2, description="Pixel-unshuffle factor: an HxW RGB image is modelled as (3p^2, H/p, W/p)."
    )


class ModelConfig(_Section):
    """Which policy model to load or build."""

    kind: Literal["tiny"] = Field(
        "tiny",
        description="Model family. `tiny` is the built-in pixel-space flow model; SD3/FLUX/SD1.5 "
        "adapters loaded from a local directory come later behind the same interface.",
    )
    checkpoint: str | None = Field(
        "checkpoints/shapes-base",
        description="Directory of a saved model (config.json + model.safetensors); null builds "
        "a randomly initialised model from `arch`.",
    )
    arch: TinyArchConfig = Field(default_factory=TinyArchConfig, description="Tiny-model shape.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Adapter settings for RL.")


class SamplingConfig(_Section):
    """How images are drawn from a policy (ODE/SDE solver settings)."""

    sampler: Literal["euler", "dpm2", "sde"] = Field(
        "dpm2", description="`dpm2` (2nd-order DPM-Solver), `euler` ODE, or the Flow-GRPO `sde`."
    )
    num_steps: PositiveInt = Field(10, description="Solver steps from t=1 (noise) to t=0.")
    shift: float = Field(1.0, gt=0, description="SD3 timestep shift of the sigma grid (1 = none).")
    eta: float = Field(0.7, ge=0, description="SDE noise level (only for sampler `sde`).")
    guidance: float = Field(
        1.0,
        ge=1.0,
        description="Classifier-free guidance scale G; 1 disables the unconditional pass.",
    )


class PretrainConfig(_Section):
    """Supervised flow-matching pretraining of the base policy on rendered images."""

    steps: PositiveInt = Field(2000, description="Optimizer steps.")
    batch_size: PositiveInt = Field(64, description="Images per optimizer step.")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    warmup_steps: int = Field(100, ge=0, description="Linear learning-rate warm-up, in steps.")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="After warm-up: keep `lr` (constant) or decay it along a half cosine to "
        "`min_lr_ratio * lr` at the last step (cosine).",
    )
    min_lr_ratio: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Final learning rate of the cosine schedule, as a fraction of `lr`.",
    )
    ema_decay: float = Field(
        0.999, ge=0, lt=1, description="EMA decay of the saved weights per step."
    )
    prompt_dropout: float = Field(
        0.1, ge=0, le=1, description="Fraction of prompts replaced by the empty prompt (for CFG)."
    )
    max_minutes: float | None = Field(
        None, gt=0, description="Stop early after this much wall-clock time (minutes); null = none."
    )
    eval_every: int = Field(500, ge=0, description="Steps between quick held-out evals; 0 = never.")
    output: str = Field("checkpoints/shapes-base", description="Directory the checkpoint goes to.")


class EvalConfig(_Section):
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


class RolloutConfig(_Section):
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


BUILTIN_REWARDS = ("shapes", "shapes_strict", "jpeg_compressibility", "jpeg_incompressibility")


class RewardSpec(_Section):
    """One reward function in the weighted sum."""

    name: str = Field(
        ...,
        min_length=1,
        description="A built-in reward: `shapes` (fraction of clauses passed), `shapes_strict` "
        "(1 if every clause passes), `jpeg_(in)compressibility` (-/+ JPEG kB); or your own as "
        "`package.module:ClassName` (a `rewards.base.Reward` subclass importable on every node).",
    )
    weight: float = Field(1.0, description="Weight of this reward in the total (dimensionless).")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments for a `module:Class` reward's constructor (none for "
        "the built-ins).",
    )
    range: tuple[float, float] | None = Field(
        None,
        description="Valid score range [low, high]; a score outside it (or NaN/inf) makes the "
        "sample invalid (dropped and counted). Default: the reward's own declared range.",
    )

    @field_validator("name")
    @classmethod
    def _known_name(cls, v: str) -> str:
        if v in BUILTIN_REWARDS:
            return v
        module, sep, attr = v.partition(":")
        if not sep or not module or not attr.isidentifier():
            raise ValueError(
                f"unknown reward {v!r}: use one of {', '.join(BUILTIN_REWARDS)} or an import "
                "path `package.module:ClassName`"
            )
        return v

    @model_validator(mode="after")
    def _check(self) -> RewardSpec:
        if self.params and self.name in BUILTIN_REWARDS:
            raise ValueError(f"reward {self.name!r} takes no params")
        if self.range is not None and not self.range[0] < self.range[1]:
            raise ValueError(f"range {list(self.range)} must be [low, high] with low < high")
        return self


class RewardsConfig(_Section):
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


class LearnerConfig(_Section):
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
    loss: Literal["epg", "pepg", "par", "grpo", "epg_noratio", "pepg_noratio", "par_noratio"] = (
        Field("pepg", description="Policy loss (DESIGN.md section 1).")
    )
    estimator: Literal["elbo", "trajectory"] = Field(
        "elbo", description="Likelihood estimator: final-sample ELBO or SDE trajectory log-probs."
    )
    elbo_weighting: Literal["adaptive", "x0_mse", "velocity_mse", "exact"] = Field(
        "adaptive", description="ELBO weighting (DESIGN.md section 1)."
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
    advantage: Literal["exact", "standard"] = Field("exact", description="Advantage estimator.")
    advantage_scale: float | None = Field(
        None,
        gt=0,
        description="Advantage scale; null = 0.1 for `exact` (reward units^-1), 1 for `standard`.",
    )
    advantage_std: Literal["group", "round"] = Field(
        "group", description="Std used by the `standard` advantage: per prompt group or per round."
    )
    kl_beta: float = Field(1e-4, ge=0, description="KL weight to the reference (base) policy.")
    old_policy_schedule: Literal["linear", "copy", "delayed_slow", "delayed_fast"] = Field(
        "linear",
        description="Old-policy EMA old <- d old + (1 - d) current after each optimizer step; "
        "`linear`: d = min(0.001 step, 0.5) (the paper's recipe); `copy`: d = 0.",
    )


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


class RunConfig(_Section):
    """A whole run. Sections are handed to the role that needs them and nothing more."""

    name: str = Field(
        "shapes", min_length=1, description="Run name; also the run directory's prefix."
    )
    seed: int = Field(0, ge=0, description="Base seed; per-worker/round seeds derive from it.")
    runs_dir: str = Field("runs", description="Directory under which run directories are created.")
    world: WorldConfig = Field(default_factory=WorldConfig, description="Task world.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Policy model.")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="Pretraining.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Held-out evaluation.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Rollout workers.")
    rewards: RewardsConfig = Field(default_factory=RewardsConfig, description="Reward pool.")
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="Learner.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="RL loop.")
    faults: FaultsConfig = Field(default_factory=FaultsConfig, description="Fault tolerance.")
    service: ServiceConfig = Field(default_factory=ServiceConfig, description="Status service.")

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
        if lr.estimator == "elbo" and lr.num_timesteps > ro.sampling.num_steps:
            raise ValueError(
                f"learner.num_timesteps = {lr.num_timesteps} exceeds the sampler schedule "
                f"(rollout.sampling.num_steps = {ro.sampling.num_steps}); use at most that many"
            )
        if lr.estimator == "trajectory" and ro.sampling.sampler != "sde":
            raise ValueError(
                "learner.estimator = 'trajectory' needs SDE rollouts with log-probs: set "
                "rollout.sampling.sampler = 'sde'"
            )
        if self.world.image_size % self.model.arch.pack:
            raise ValueError(
                f"world.image_size = {self.world.image_size} must be a multiple of "
                f"model.arch.pack = {self.model.arch.pack}"
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
