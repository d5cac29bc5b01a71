"""The training driver: a Ray job around the controller (``services/controller.py``).

``train`` validates everything it can before any actor starts (config, prompt files, model,
run directory and its root, resources), then hands the rounds to a ``Controller``. Without
an address it starts a local single-node Ray cluster sized to the machine; with
``--address`` or ``RAY_ADDRESS`` (as under ``ray job submit``) it joins that cluster.

With ``service.enabled`` the status API (``services/api``) is served from a child process
of this process for as long as the run lasts. ``status.json`` carries the run's state:
starting -> running -> finished, or -> stopping -> stopped after a stop request or a signal
(the round in flight is finished and checkpointed), or failed with the error.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray

from services.api.control import clear_stop_request, load_token
from services.cluster import check_cluster, ray_session
from services.config import RUNS_DIR_ENV, ConfigError, RunConfig
from services.controller import Controller, RoleClasses
from services.errors import ClusterLost, LearnerLost, RunStopped
from services.manifest import write_manifest
from services.prompts import resolve_prompts
from services.run import RunDir, verify_checkpoint
from services.status import update_status
from worlds.base import make_world

log = logging.getLogger("elborl.driver")
WATCHDOG_PERIOD_S = 2.0
"""After a signal, how often the driver checks that the cluster is still there."""


def train(
    cfg: RunConfig,
    address: str | None,
    resume: bool,
    config_path: str | None,
    classes: RoleClasses | None = None,
    run_dir_class: type[RunDir] = RunDir,
) -> int:
    """``elborl train``: returns the process exit status.

    0: finished, or stopped on request; 1: stopped by a fault (``RunStopped``, ``LearnerLost``,
    with a checkpoint where one could be written); 128 + signal number after SIGTERM/SIGINT
    (the round in flight is finished and checkpointed first, unless the cluster is gone).
    ``classes`` and ``run_dir_class`` let tests run subclasses that inject faults.
    """
    prompts, eval_prompts = _preflight(cfg)
    token = load_token(cfg.service) if cfg.service.enabled else None
    run = run_dir_class(cfg, resume)
    if resume and (ckpt := run.latest_checkpoint()) is not None:
        verify_checkpoint(ckpt)  # before any actor starts: a damaged file is named here
    clear_stop_request(run.path)
    hint = f"elborl train --config {config_path or '<the same config>'} --resume"
    with _serving(cfg, token) as service_url:
        update_status(
            run,
            state="starting",
            error=None,
            total_rounds=cfg.train.rounds,
            eta_s=None,
            started=time.time(),
            pid=os.getpid(),
            hostname=socket.gethostname(),
            service_url=service_url,
            run_path=str(run.path),
        )
        ctl = Controller(cfg, run, prompts, eval_prompts, classes)
        failed: list[bool] = []
        try:
            with ray_session(address) as local, _signals(ctl, run, hint, local):
                try:  # (signal handlers go in after ray.init: it sets its own)
                    cluster = {"resources": ray.cluster_resources(), "local": local}
                    write_manifest(run.path, cfg, resume, cluster)
                    ctl.start(resume)
                    stopped = ctl.run()
                except (RunStopped, LearnerLost) as exc:
                    _record_failure(ctl, exc, failed, health=True)
                    log.error("run stopped: %s", exc)
                    print(f"elborl train: run stopped: {exc}\nresume with: {hint}", file=sys.stderr)
                    return 1
                except BaseException as exc:
                    _record_failure(ctl, exc, failed, health=True)
                    raise
                finally:
                    run.close()
        except BaseException as exc:  # Ray itself failed to start or stop
            _record_failure(ctl, exc, failed, health=False)
            raise
        return _finish(ctl, stopped, hint)


def _finish(ctl: Controller, stopped: bool, hint: str) -> int:
    run = ctl.run_dir
    if ctl.interrupted and stopped:  # (a signal during the last round lets it finish)
        message = f"interrupted by {ctl.interrupted} after round {ctl.round}"
        update_status(run, state="stopped", error=message, eta_s=None)
        print(f"elborl train: {message}; checkpointed. Resume with: {hint}", file=sys.stderr)
        return 128 + int(getattr(signal, ctl.interrupted))
    update_status(run, state="stopped" if stopped else "finished", eta_s=None)
    if stopped:
        log.info("stopped on request after round %d; continue with: %s", ctl.round, hint)
    else:
        log.info("run finished: %s", run.path)
    return 0


def _preflight(cfg: RunConfig) -> tuple[list[str], list[str]]:
    """Validate every input before anything is written or started; errors name the field."""
    check_runs_root(cfg)
    world = make_world(cfg.world)
    prompts = resolve_prompts(world, cfg.world.train_prompts, "world.train_prompts")
    eval_prompts = resolve_prompts(world, cfg.world.eval_prompts, "world.eval_prompts")
    _check_model(cfg)
    return prompts, eval_prompts


def _check_model(cfg: RunConfig) -> None:
    """The model's files, before any actor starts: a real model's directory is checked without
    loading it; a saved tiny policy is loaded (it is small) and its image size compared."""
    from policy.io import check_model_config, load_policy
    from policy.models import model_kind

    try:
        check_model_config(cfg.model, cfg.world.image_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if model_kind(cfg.model.kind).from_path is not None:
        return
    try:
        policy = load_policy(str(cfg.model.checkpoint))
    except Exception as exc:  # corrupted weights or a config.json from something else
        raise ConfigError(f"model.checkpoint = {cfg.model.checkpoint!r}: {exc}") from exc
    if policy.image_size != cfg.world.image_size:
        raise ConfigError(
            f"model.checkpoint {cfg.model.checkpoint!r} was trained on "
            f"{policy.image_size}px images but world.image_size = {cfg.world.image_size}; use "
            "the checkpoint's size or a checkpoint made for this config"
        )


def in_ray_job_working_dir() -> bool:
    """Whether this process runs as a Ray job's entrypoint, in its temporary working dir."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ or "working_dir_files" in Path.cwd().parts


def check_runs_root(cfg: RunConfig) -> None:
    """Refuse a relative run root inside a Ray job's working directory (Ray deletes it)."""
    if os.environ.get(RUNS_DIR_ENV) or Path(cfg.runs_dir).expanduser().is_absolute():
        return
    if in_ray_job_working_dir():
        raise ConfigError(
            f"runs_dir = {cfg.runs_dir!r} is relative, and this run is a Ray job: it would be "
            f"written under the job's temporary working directory ({Path.cwd()}), which Ray "
            f"deletes. Set runs_dir to an absolute path on storage the driver's node keeps "
            f"(--set runs_dir=/data/runs) or export {RUNS_DIR_ENV} (deploy/submit.sh does)"
        )


@contextmanager
def _signals(ctl: Controller, run: RunDir, hint: str, local: bool) -> Iterator[None]:
    """First SIGTERM/SIGINT: finish the round in flight, checkpoint, exit 128+n. Second: abort.

    After the first signal a watchdog checks every few seconds that the cluster is still
    there; if it is gone (nothing more can finish or be saved) the driver says so and exits.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    done = threading.Event()  # set when the run is over: the cluster may then go quietly

    def handler(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if ctl.interrupted:
            raise KeyboardInterrupt(f"second {name}: aborting without a checkpoint")
        ctl.interrupted = name
        log.warning("%s: finishing the round in flight, then checkpointing (again to abort)", name)
        args = (run, 128 + signum, hint, local, done)
        threading.Thread(target=_watchdog, args=args, daemon=True, name="elborl-watchdog").start()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        done.set()
        for s, h in previous.items():
            signal.signal(s, h)


def _watchdog(run: RunDir, code: int, hint: str, local: bool, done: threading.Event) -> None:
    """Exit ``code`` with a message as soon as the cluster is found gone (until ``done``)."""
    while not done.wait(WATCHDOG_PERIOD_S):
        try:
            check_cluster(local)
        except ClusterLost as exc:
            if done.is_set():  # the run ended and shut its cluster down meanwhile
                return
            ckpt = run.latest_checkpoint()
            where = f"the latest checkpoint is {ckpt.name}" if ckpt else "no checkpoint exists"
            message = (
                f"{exc} after the stop signal: the round in flight cannot finish and nothing "
                f"more can be saved; {where}"
            )
            update_status(run, state="failed", error=message, eta_s=None)
            print(f"elborl train: {message}. Resume with: {hint}", file=sys.stderr, flush=True)
            os._exit(code)  # Ray's own shutdown would wait on the dead cluster


@contextmanager
def _serving(cfg: RunConfig, token: str | None) -> Iterator[str | None]:
    """The status service in a child process for the block's duration (its URL or None)."""
    if token is None:
        yield None
        return
    from services.api.server import ApiServer

    svc = cfg.service
    server = ApiServer(str(cfg.runs_root()), token, svc.host, svc.port, svc.cors_origins).start()
    try:
        yield server.url
    finally:
        server.stop()


def _record_failure(ctl: Controller, exc: BaseException, failed: list[bool], health: bool) -> None:
    """``failed`` with the error in ``status.json`` (once), and which workers are alive."""
    if failed:
        return
    failed.append(True)
    message = f"{type(exc).__name__}: {exc}"[:2000] if str(exc) else type(exc).__name__
    fields: dict[str, Any] = {"state": "failed", "error": message, "eta_s": None}
    if health and ray.is_initialized():
        fields["workers"] = ctl.health()
    update_status(ctl.run_dir, **fields)
