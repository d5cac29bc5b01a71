"""Running the app with uvicorn: in a child process beside training, or in the foreground.

The socket is bound up front, so a port in use is a configuration error before any training
starts, and port 0 gives a free port whose number is known at once (the driver writes the URL
into ``status.json``). Beside training the app runs in its own process at the lowest CPU
priority (``SCHED_IDLE`` on Linux, else ``nice`` 19; below even Ray's niced workers): the service
only reads the run directory, so it needs nothing of the driver's, and a burst of requests
yields the CPU to training. It works on at most ``app.MAX_IN_FLIGHT`` requests and holds at most
``MAX_CONNECTIONS`` connections at once; more get a 503 at once (``bench.api_load`` measures a
burst's cost to the rounds).
"""

from __future__ import annotations

import ipaddress
import logging
import multiprocessing
import multiprocessing.process
import os
import signal
import socket
from collections.abc import Sequence
from pathlib import Path

import uvicorn

from services.api.app import create_app
from services.config import ConfigError

log = logging.getLogger("elborl.api")
MAX_CONNECTIONS = 512  # open connections (dashboards keep a few each alive); more get a 503


class ApiServer:
    """The status app on ``host:port`` over the runs in ``runs_dir``."""

    def __init__(
        self,
        runs_dir: str | Path,
        token: str,
        host: str = "127.0.0.1",
        port: int = 0,
        cors_origins: Sequence[str] = (),
    ):
        self.sock = _bind(host, port)
        bound_port = self.sock.getsockname()[1]
        self.url = f"http://{_url_host(host)}:{bound_port}"
        self.args = (str(runs_dir), token, tuple(cors_origins))
        self.server = _server(*self.args)
        self.process: multiprocessing.process.BaseProcess | None = None
        if not _is_loopback(host):
            log.warning(
                "the status service listens on %s, reachable beyond this machine; keep the "
                "token secret and the port firewalled",
                host,
            )

    def start(self) -> ApiServer:
        """Serve from a child process at lower priority (spawned: it shares no state with the
        driver but the listening socket)."""
        ctx = multiprocessing.get_context("spawn")
        self.process = ctx.Process(
            target=_serve_child, args=(self.sock, *self.args), name="elborl-api", daemon=True
        )
        self.process.start()
        log.info("status service at %s/ (dashboard; the API is under /api/v1)", self.url)
        return self

    def serve_forever(self) -> None:
        """Serve from the main thread until SIGINT/SIGTERM, then return normally.

        uvicorn shuts down gracefully on those signals and then re-raises them under the
        handlers it found; no-op handlers make that a normal return (exit status 0).
        """
        log.info("status service at %s/ (dashboard; the API is under /api/v1)", self.url)
        signals = (signal.SIGINT, signal.SIGTERM)
        quiet = {sig: signal.signal(sig, lambda *_: None) for sig in signals}
        try:
            self.server.run(sockets=[self.sock])
        finally:
            for sig, handler in quiet.items():
                signal.signal(sig, handler)
            self.sock.close()

    def stop(self, timeout: float = 5.0) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.terminate()  # SIGTERM: uvicorn shuts down gracefully
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(timeout)
        self.sock.close()


def _server(runs_dir: str, token: str, cors_origins: Sequence[str]) -> uvicorn.Server:
    config = uvicorn.Config(
        create_app(runs_dir, token, cors_origins),
        log_config=None,  # keep the caller's logging
        access_log=False,  # request lines would carry query strings; nothing to gain
        lifespan="off",
        timeout_graceful_shutdown=2,
        # Connections held open at once (idle keep-alive ones count); past it uvicorn answers
        # 503. The app itself bounds the requests in progress (``create_app``'s max_in_flight).
        limit_concurrency=MAX_CONNECTIONS,
        backlog=64,
    )
    return uvicorn.Server(config)


def _serve_child(
    sock: socket.socket, runs_dir: str, token: str, cors_origins: Sequence[str]
) -> None:
    """The child process: lower priority, the parent's log format, uvicorn on ``sock``."""
    _lowest_priority()
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    _server(runs_dir, token, cors_origins).run(sockets=[sock])


def _lowest_priority() -> None:
    """Below Ray's workers (niced themselves): ``SCHED_IDLE`` where the OS has it (Linux; the
    scheduler then runs the service on a core only when training leaves it idle, and a waking
    training thread preempts it at once), else ``nice`` 19."""
    os.nice(19)
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError as exc:  # a container that forbids it: nice 19 stays
            log.info("SCHED_IDLE unavailable (%s); the status service runs at nice 19", exc)


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as exc:
        raise ConfigError(
            f"the status service cannot listen on {host}:{port} ({exc.strerror or exc}); "
            "set service.port to a free port (0 picks one) or service.enabled=false"
        ) from exc
    sock.listen(64)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
