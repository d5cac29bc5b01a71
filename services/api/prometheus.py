"""Prometheus metrics: run gauges read from the run directories at scrape time, plus the API's
own request counter. Each app has its own registry (no process-global state)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, get_args

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.api.hardening import ASGIApp, Message, Receive, Scope, Send, method_label
from services.api.models import RunState
from services.api.reader import RunsReader

# (metric name, help, RunDetail attribute)
GAUGES = (
    ("elborl_round", "Rounds completed.", "round"),
    ("elborl_total_rounds", "Rounds the run is configured for.", "total_rounds"),
    ("elborl_policy_version", "Version of the weights last published.", "policy_version"),
    ("elborl_reward_mean", "Mean total reward of the latest round.", "reward_mean"),
    ("elborl_eval_accuracy", "Latest held-out accuracy.", "accuracy"),
    ("elborl_images_per_second", "End-to-end images per wall-clock second.", "images_per_s"),
    ("elborl_seconds_per_round", "Mean wall-clock seconds per round.", "seconds_per_round"),
    ("elborl_eta_seconds", "Estimated seconds until the last round finishes.", "eta_s"),
    ("elborl_last_checkpoint_round", "Round of the newest complete checkpoint.",
     "last_checkpoint_round"),
    ("elborl_status_updated_timestamp_seconds", "When the driver last wrote its status.",
     "updated"),
)  # fmt: skip
COUNTERS = (
    ("elborl_samples_scored", "Samples scored since the run began.", "samples_scored"),
    ("elborl_samples_trained", "Samples trained on since the run began.", "samples_trained"),
)


class RunsCollector(Collector):
    """One sample per run (label ``run``) for each gauge and counter, read when scraped."""

    def __init__(self, reader: RunsReader):
        self.reader = reader

    def collect(self) -> Iterator[Metric]:
        details = [self.reader.detail(r) for r in self.reader.run_ids()]
        for name, doc, attr in GAUGES:
            g = GaugeMetricFamily(name, doc, labels=["run"])
            for d in details:
                value = getattr(d, attr)
                if value is not None:
                    g.add_metric([d.run_id], float(value))
            yield g
        for name, doc, attr in COUNTERS:
            c = CounterMetricFamily(name, doc, labels=["run"])
            for d in details:
                value = getattr(d, attr)
                if value is not None:
                    c.add_metric([d.run_id], float(value))
            yield c
        state = GaugeMetricFamily(
            "elborl_run_state", "1 for the run's current state, 0 for the others.",
            labels=["run", "state"],
        )  # fmt: skip
        alive = GaugeMetricFamily(
            "elborl_workers_alive", "Actors of the role Ray reports alive.", labels=["run", "role"]
        )
        workers = GaugeMetricFamily(
            "elborl_workers", "Actors started for the role.", labels=["run", "role"]
        )
        restarts = CounterMetricFamily(
            "elborl_worker_restarts", "Restarts of the role's actors.", labels=["run", "role"]
        )
        warnings = GaugeMetricFamily(
            "elborl_warnings", "Alarms raised in the run (e.g. the reward-hacking guard's).",
            labels=["run"],
        )  # fmt: skip
        for d in details:
            warnings.add_metric([d.run_id], float(len(d.warnings)))
            for s in get_args(RunState):
                state.add_metric([d.run_id, s], float(d.state == s))
            for w in d.workers:
                workers.add_metric([d.run_id, w.role], w.num_workers)
                restarts.add_metric([d.run_id, w.role], w.restarts)
                if w.alive is not None:
                    alive.add_metric([d.run_id, w.role], w.alive)
        yield from (state, workers, alive, restarts, warnings)


def make_registry(reader: RunsReader) -> tuple[CollectorRegistry, Counter]:
    """A registry with the run collector, and the request counter the app increments."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunsCollector(reader))
    requests = Counter(
        "elborl_api_requests",
        "API requests served, by route template and status code.",
        ["method", "route", "status"],
        registry=registry,
    )
    return registry, requests


class CountRequests:
    """ASGI middleware counting requests by method, route template and status code (pure ASGI:
    no per-request task or body stream, unlike ``@app.middleware("http")``)."""

    def __init__(self, app: ASGIApp, counter: Counter):
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: list[Any] = [500]  # an exception before the response counts as a 500

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            route = scope.get("route")  # set by the router on the scope it was given
            template = getattr(route, "path", "unmatched")
            self.counter.labels(method_label(scope["method"]), template, str(status[0])).inc()
