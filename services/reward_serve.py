"""``elborl reward-serve``: any registered reward over ``elborl-reward/1`` (the standalone
server's app, ``rewards/server/elborl_reward_server.py``, around elborl's own rewards).

Service layer: it builds the rewards of ``rewards.functions`` (or ``--reward`` names), wraps
each as a server backend and runs uvicorn, bound to 127.0.0.1 unless told otherwise, with the
bearer token from ``--token-env`` (required).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from rewards.config import RewardSpec
from services.api.hardening import HardenedHTTP
from services.config import ConfigError

log = logging.getLogger(__name__)


class RegisteredBackend:
    """A server backend around one elborl ``Reward`` (its range, name and details kept)."""

    def __init__(self, spec: RewardSpec, max_batch: int):
        from rewards.base import build_reward

        self.reward = build_reward(spec.name, spec.params)
        self.name = self.reward.name
        self.range = spec.range or self.reward.range
        self.max_batch = max_batch

    def load(self, directory: str | None) -> None:  # built when constructed
        return None

    def score(
        self, images: np.ndarray, prompts: list[str], metadata: Any
    ) -> tuple[list[float | None], list[dict[str, Any]]]:
        out = (
            self.reward.score(images, prompts)
            if metadata is None
            else self.reward.score_with_metadata(images, prompts, metadata)
        )
        scores = [float(s) if np.isfinite(s) else None for s in out.scores]
        return scores, out.details or [{} for _ in scores]


def serve_rewards(
    specs: Sequence[RewardSpec],
    host: str,
    port: int,
    token_env: str,
    max_batch: int = 64,
    max_body_mb: float = 256.0,
    max_concurrency: int = 1,
) -> int:
    """Serve ``specs`` until interrupted."""
    import uvicorn

    from rewards.server.elborl_reward_server import create_app

    token = os.environ.get(token_env, "")
    if not token:
        raise ConfigError(
            f"no token: set the environment variable {token_env} (a reward server never runs "
            "without one), or name another with --token-env"
        )
    if max_batch < 1 or max_concurrency < 1 or max_body_mb <= 0:
        raise ConfigError("--max-batch and --max-concurrency must be >= 1, --max-body-mb > 0")
    try:
        backends = [RegisteredBackend(s, max_batch) for s in specs]
    except ValueError as exc:
        raise ConfigError(f"rewards: {exc}") from exc
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving rewards on %s: reachable beyond this machine (token required)", host)
    app = create_app(backends, token, int(max_body_mb * 2**20), max_concurrency=max_concurrency)
    app.add_middleware(HardenedHTTP)  # as the status service: HEAD, security headers
    log.info("serving rewards %s on http://%s:%d", [b.name for b in backends], host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0
