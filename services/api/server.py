"""Running the app with uvicorn: in a daemon thread beside training, or in the foreground.

The socket is bound up front, so a port in use is a configuration error before any training
starts, and port 0 gives a free port whose number is known at once (the driver writes the URL
into ``status.json``). Serving shares the driver's process but not its work: the driver spends
its time waiting on Ray, and each request only reads small files.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import threading
from collections.abc import Sequence
from pathlib import Path

import uvicorn

from services.api.app import create_app
from services.config import ConfigError

log = logging.getLogger("elborl.api")


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
        config = uvicorn.Config(
            create_app(runs_dir, token, cors_origins),
            log_config=None,  # keep the caller's logging
            access_log=False,  # request lines would carry query strings; nothing to gain
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None
        if not _is_loopback(host):
            log.warning(
                "the status service listens on %s, reachable beyond this machine; keep the "
                "token secret and the port firewalled",
                host,
            )

    def start(self) -> ApiServer:
        """Serve from a daemon thread (uvicorn installs no signal handlers off the main thread)."""
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="elborl-api", daemon=True
        )
        self.thread.start()
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
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)
        self.sock.close()


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
