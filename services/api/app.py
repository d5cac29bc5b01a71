"""The FastAPI application: JSON API under ``/api/v1``, Prometheus ``/metrics``, the dashboard.

``create_app(runs_dir, token)`` serves every run under ``runs_dir``. Every route needs the
bearer token except ``/healthz`` and the dashboard's static shell (``/``, ``/static/*``), which
holds no run data: the page asks for the token and sends it as a header on each API call.

Every route is ``async``: it runs on the event loop, not in the thread pool. Its file reads are
small (a status file, the bytes appended to ``metrics.jsonl`` since the last request, a
directory listing) and the run detail is cached, while the thread pool's hand-off cost about
1 ms of CPU per request here (measured: a metrics history 0.47 ms async, 1.43 ms in the pool),
which a 100 requests/s burst takes from training. The price: on a runs directory that is slow
to read (a stalled network filesystem) one request can delay the others, ``/healthz`` too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi import Path as PathParam
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from services.api.auth import BearerAuth
from services.api.control import request_stop
from services.api.hardening import HardenedHTTP, LimitInFlight, printable
from services.api.models import (
    ErrorBody,
    Health,
    MetricsHistory,
    Ready,
    RunDetail,
    RunList,
    SampleGrid,
    StopAccepted,
)
from services.api.prometheus import CountRequests, make_registry
from services.api.reader import RunsReader

log = logging.getLogger("elborl.api")
STATIC = Path(__file__).resolve().parent / "static"
API = "/api/v1"
RunId = Annotated[str, PathParam(description="Run name (a directory under the runs dir).")]
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No bearer token."},
    403: {"model": ErrorBody, "description": "Wrong bearer token."},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "No run."}}


MAX_IN_FLIGHT = 32  # requests the status app works on at once; one more gets a 503


def create_app(
    runs_dir: str | Path,
    token: str,
    cors_origins: Sequence[str] = (),
    max_in_flight: int = MAX_IN_FLIGHT,
) -> FastAPI:
    """The status and control app over every run in ``runs_dir``, working on at most
    ``max_in_flight`` requests at once."""
    reader = RunsReader(runs_dir)
    registry, requests = make_registry(reader)
    auth = [Depends(BearerAuth(token))]
    app = FastAPI(
        title="elborl status and control",
        version="1",
        description="Status, metrics, samples and a graceful stop for elborl training runs.",
        docs_url=None,  # the Swagger/ReDoc pages load scripts from a CDN; serve the schema only
        redoc_url=None,
        openapi_url=None,
    )
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization"],
        )

    app.add_middleware(LimitInFlight, limit=max_in_flight)  # innermost of the three
    app.add_middleware(CountRequests, counter=requests)  # counts the 503s too
    app.add_middleware(HardenedHTTP)  # outermost: HEAD as GET, security headers

    _add_service_routes(app, reader, registry, auth)
    _add_run_routes(app, reader, auth)

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _add_service_routes(
    app: FastAPI, reader: RunsReader, registry: CollectorRegistry, auth: list[Any]
) -> None:
    """Health, readiness, the schema and Prometheus' ``/metrics``."""

    @app.get("/healthz", tags=["health"])
    async def healthz() -> Health:
        """Liveness: answers while the process runs. No token needed."""
        return Health()

    @app.get(
        "/readyz",
        tags=["health"],
        dependencies=auth,
        responses={**ERRORS, 503: {"model": Ready, "description": "Runs dir unreadable."}},
    )
    async def readyz(response: Response) -> Ready:
        """Readiness: the runs directory exists and can be listed."""
        ready = reader.root.is_dir()
        if not ready:
            response.status_code = 503
        return Ready(ready=ready, runs_dir=str(reader.root), num_runs=len(reader.run_ids()))

    @app.get("/openapi.json", include_in_schema=False, dependencies=auth)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get(
        "/metrics",
        tags=["metrics"],
        dependencies=auth,
        responses={**ERRORS, 200: {"content": {"text/plain": {}}, "description": "Metrics."}},
        response_class=Response,
    )
    async def metrics() -> Response:
        """Prometheus text format: gauges and counters per run (label ``run``)."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _run_path(reader: RunsReader, run_id: str) -> Path:
    """A run's directory, or 404."""
    path = reader.path(run_id)
    if path is None:
        raise HTTPException(status_code=404, detail=f"no run {run_id!r}")
    return path


def _add_run_routes(app: FastAPI, reader: RunsReader, auth: list[Any]) -> None:
    """The ``/api/v1/runs`` routes (full paths, so the request counter sees the template)."""
    common: dict[str, Any] = {"tags": ["runs"], "dependencies": auth}

    def run_path(run_id: str) -> Path:
        return _run_path(reader, run_id)

    @app.get(f"{API}/runs", responses=ERRORS, **common)
    async def list_runs() -> RunList:
        """Every run in the served directory, the most recently updated first."""
        runs = [reader.summary(r) for r in reader.run_ids()]
        runs.sort(key=lambda s: s.updated or 0.0, reverse=True)
        return RunList(runs=runs)

    # These two answer with JSON the reader serialized once (a cached ``RunDetail`` or
    # history), not a model FastAPI would validate and serialize again on every poll.
    @app.get(
        f"{API}/runs/{{run_id}}",
        response_model=RunDetail,
        responses={**ERRORS, **NOT_FOUND},
        **common,
    )
    async def get_run(run_id: RunId) -> Response:
        """State, progress, reward and accuracy, throughput, ETA, workers, checkpoint, config."""
        run_path(run_id)
        return Response(reader.detail_json(run_id), media_type="application/json")

    @app.get(
        f"{API}/runs/{{run_id}}/metrics",
        response_model=MetricsHistory,
        responses={**ERRORS, **NOT_FOUND},
        **common,
    )
    async def get_metrics(
        run_id: RunId,
        since: Annotated[
            int, Query(ge=0, description="Only rounds after this one (for incremental polling).")
        ] = 0,
        keys: Annotated[
            list[str] | None,
            Query(
                description="Metric names to return, repeated or comma-separated; all if absent."
            ),
        ] = None,
    ) -> Response:
        """Per-round metrics history (``reward/mean``, ``eval/accuracy``, ``timing/round``...)."""
        run_path(run_id)
        wanted = [k.strip() for item in keys or [] for k in item.split(",") if k.strip()]
        return Response(reader.metrics_json(run_id, since, wanted), media_type="application/json")

    _add_sample_routes(app, reader, common)

    @app.post(
        f"{API}/runs/{{run_id}}/stop",
        status_code=202,
        **common,
        responses={
            **ERRORS,
            **NOT_FOUND,
            409: {"model": ErrorBody, "description": "The run is not running."},
        },
    )
    async def stop_run(run_id: RunId) -> StopAccepted:
        """Graceful stop: the run finishes the round in flight, checkpoints it and exits 0."""
        path = run_path(run_id)
        state = reader.detail(run_id).state
        if state not in ("starting", "running", "stopping"):
            raise HTTPException(status_code=409, detail=f"run {run_id!r} is {state}, not running")
        requested_at = request_stop(path, source="api")
        log.info("stop requested for run %s", printable(run_id))
        return StopAccepted(
            run_id=run_id,
            state="stopping",
            requested_at=requested_at,
            message="the run will finish the round in flight, checkpoint it and exit",
        )


def _add_sample_routes(app: FastAPI, reader: RunsReader, common: dict[str, Any]) -> None:
    """The sample-grid routes: the latest grid with its captions, and grid PNGs."""

    @app.get(
        f"{API}/runs/{{run_id}}/samples/latest",
        responses={**ERRORS, 404: {"model": ErrorBody, "description": "No run, or no grid yet."}},
        **common,
    )
    async def latest_samples(
        run_id: RunId,
        kind: Annotated[
            Literal["train", "eval"],
            Query(description="train: the round's rollouts; eval: held-out prompts."),
        ] = "train",
    ) -> SampleGrid:
        """The newest sample grid: its PNG's URL, and its prompts and rewards in grid order."""
        _run_path(reader, run_id)
        grid = reader.latest_grid(run_id, kind, f"{API}/runs/{run_id}/samples")
        if grid is None:
            raise HTTPException(status_code=404, detail=f"run {run_id!r} has no {kind} grid yet")
        return grid

    @app.get(
        f"{API}/runs/{{run_id}}/samples/{{file_name}}",
        response_class=FileResponse,
        **common,
        responses={
            **ERRORS,
            200: {"content": {"image/png": {}}, "description": "The grid as a PNG."},
            404: {"model": ErrorBody, "description": "No such run or grid."},
        },
    )
    async def sample_file(
        run_id: RunId,
        file_name: Annotated[
            str, PathParam(description="A grid's file name, e.g. round_00010.png.")
        ],
    ) -> FileResponse:
        """One sample grid PNG, as named by ``samples/latest``'s ``image_url``."""
        _run_path(reader, run_id)
        png = reader.grid_file(run_id, file_name)
        if png is None:
            raise HTTPException(status_code=404, detail=f"no grid {file_name!r}")
        return FileResponse(png, media_type="image/png")
