"""What the training process and the API share without importing the web stack.

* **Stop requests.** ``POST /api/v1/runs/{run_id}/stop`` writes ``<run>/STOP``; the round loop
  looks for it once per round (one ``stat``), finishes the round in flight, checkpoints and
  exits 0. The driver removes a stale one when a run starts or resumes. Creating the file by
  hand (``touch runs/NAME/STOP``) does the same.
* **The bearer token**, read from the environment variable named by ``service.token_env`` or
  from ``service.token_file``. It is returned to the caller only and never logged.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from services.config import ConfigError, ServiceConfig

STOP_FILE = "STOP"
MIN_TOKEN_CHARS = 16


def request_stop(run_path: Path, source: str) -> float:
    """Ask the run in ``run_path`` to stop after its current round; returns the request time."""
    now = time.time()
    tmp = run_path / f".{STOP_FILE}.tmp"
    tmp.write_text(json.dumps({"requested_at": now, "source": source}))
    tmp.replace(run_path / STOP_FILE)
    return now


def stop_requested(run_path: Path) -> bool:
    """Whether a stop request is waiting (checked by the loop once per round)."""
    return (run_path / STOP_FILE).exists()


def clear_stop_request(run_path: Path) -> None:
    """Forget a request left by an earlier session of the run (on start and resume)."""
    (run_path / STOP_FILE).unlink(missing_ok=True)


def load_token(cfg: ServiceConfig) -> str:
    """The bearer token: ``$<token_env>`` if set and non-empty, else ``token_file``'s content.

    Raises ``ConfigError`` (never naming the value) when neither gives a usable token.
    """
    token = os.environ.get(cfg.token_env, "").strip()
    source = f"${cfg.token_env}"
    if not token and cfg.token_file:
        source = f"service.token_file ({cfg.token_file})"
        try:
            token = Path(cfg.token_file).expanduser().read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read {source}: {exc.strerror}") from exc
    if not token:
        raise ConfigError(
            f"the status service needs a bearer token: set ${cfg.token_env} or "
            "service.token_file (e.g. `export "
            f"{cfg.token_env}=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')`)"
        )
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ConfigError(
            f"the token from {source} must be at least {MIN_TOKEN_CHARS} characters with no "
            "whitespace"
        )
    return token
