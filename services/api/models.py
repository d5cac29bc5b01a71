"""Response models of the status API (pydantic; they are the OpenAPI schema's components)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

RunState = Literal["starting", "running", "stopping", "stopped", "finished", "failed", "unknown"]


class Health(BaseModel):
    """Liveness: the process answers."""

    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    """Readiness: the runs directory can be read."""

    ready: bool
    runs_dir: str = Field(description="The directory whose runs are served.")
    num_runs: int = Field(ge=0, description="Run directories found.")


class RoleHealth(BaseModel):
    """The Ray actors of one role."""

    role: str = Field(description="rollout, reward or learner.")
    num_workers: int = Field(ge=0, description="Actors started for the role.")
    alive: int | None = Field(
        description="Actors Ray reports ALIVE at the last round; null when unknown."
    )
    restarts: int = Field(ge=0, description="Restarts Ray made of the role's actors in total.")
    nodes: list[str] = Field(description="Ray node ids the actors run on.")


class RunSummary(BaseModel):
    """One line of the run list."""

    run_id: str = Field(description="The run directory's name (the config's `name`).")
    state: RunState = Field(
        description="starting, running, stopping (a stop was requested), stopped (by request, "
        "with a checkpoint), finished (all rounds), failed (see `error`); unknown without a "
        "status file."
    )
    round: int = Field(ge=0, description="Rounds completed.")
    total_rounds: int | None = Field(description="Rounds the run is configured for.")
    reward_mean: float | None = Field(description="Mean total reward of the latest round.")
    accuracy: float | None = Field(description="Latest held-out accuracy (GenEval-style).")
    updated: float | None = Field(description="When the driver last wrote its status (Unix s).")


class RunDetail(RunSummary):
    """Everything the dashboard and `elborl status` show about one run."""

    error: str | None = Field(description="Why the run failed (state `failed`).")
    policy_version: int | None = Field(description="Version of the weights last published.")
    reward_std: float | None = Field(description="Std of the total reward in the latest round.")
    accuracy_round: int | None = Field(description="Round of the latest held-out evaluation.")
    images_per_s: float | None = Field(
        description="End-to-end throughput: images generated, scored and trained per wall-clock "
        "second over the last rounds."
    )
    rollout_images_per_s: float | None = Field(
        description="Images per second of rollout compute alone in the latest round."
    )
    seconds_per_round: float | None = Field(
        description="Mean wall-clock seconds per round over the last rounds."
    )
    eta_s: float | None = Field(description="Estimated seconds until the last round finishes.")
    started: float | None = Field(description="When this session of the driver started (Unix s).")
    stop_requested: bool = Field(description="A stop request is waiting for the loop.")
    last_checkpoint: str | None = Field(
        description="Newest complete checkpoint, relative to the run directory."
    )
    last_checkpoint_round: int | None = Field(description="Its round.")
    samples_scored: int | None = Field(description="Samples scored since the run began.")
    samples_trained: int | None = Field(description="Samples trained on since the run began.")
    workers: list[RoleHealth] = Field(description="Worker health per role.")
    service_url: str | None = Field(description="Where the driver serves this API, if it does.")
    warnings: list[str] = Field(
        default_factory=list,
        description="Alarms raised during the run, e.g. the reward-hacking guard's (`guard`).",
    )
    config: dict[str, Any] = Field(
        description="A summary of the run's configuration (model, sizes, loss, schedule)."
    )


class RunList(BaseModel):
    """Every run in the served directory, most recently updated first."""

    runs: list[RunSummary]


class MetricRecord(BaseModel):
    """One round's metrics."""

    round: int = Field(ge=0)
    time: float | None = Field(description="When the round was logged (Unix s).")
    values: dict[str, float | None] = Field(
        description="Metric name -> value; non-finite values are null."
    )


class MetricsHistory(BaseModel):
    """Per-round metrics, oldest first."""

    run_id: str
    keys: list[str] = Field(description="Every metric name the run has logged.")
    records: list[MetricRecord]


class SampleGrid(BaseModel):
    """A sample grid and what is in it."""

    run_id: str
    round: int = Field(ge=0, description="Round the grid was drawn at.")
    kind: Literal["train", "eval"] = Field(
        description="train: the round's rollouts; eval: held-out prompts with the trained weights."
    )
    image_url: str = Field(description="The PNG (needs the same bearer token).")
    prompts: list[str] = Field(description="Prompts of the images, row by row.")
    rewards: list[float | None] = Field(
        description="Reward (train) or clause score (eval) per image."
    )


class StopAccepted(BaseModel):
    """A stop request was recorded; the run stops after the round in flight."""

    run_id: str
    state: RunState
    requested_at: float = Field(description="Unix s.")
    message: str


class ErrorBody(BaseModel):
    """An error."""

    detail: str
