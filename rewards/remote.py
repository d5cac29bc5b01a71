"""The ``remote`` reward: a client of an ``elborl-reward/1`` server (docs/reward-protocol.md).

Component layer (no Ray): a ``Reward`` like any other, so the reward actors and the scorer do
not know the score came over HTTP. At construction it reads ``/v1/info`` (a wrong URL, token or
reward name fails there, before any round), then each ``score`` call splits the batch by
``max_batch``, sends up to ``concurrency`` requests at once and handles each status as the
protocol says:

- 400, 401, 403: a configuration error, never retried (``RemoteRewardError``);
- 413: the batch is halved and both halves sent (down to single images);
- 429, 503: waits ``Retry-After`` (capped backoff) while the deadline allows;
- 500, timeouts, refused connections: retried at most ``retries`` times with backoff.

A score the server could not compute (``null``), or a batch still failing past its budget or
past ``deadline_s``, becomes NaN: the scorer then marks those samples invalid and they are left
out of the update (the existing rule), counted in ``faults/invalid_scores``. The run never
hangs: every request has connect and read timeouts and each call an overall deadline.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rewards.base import Reward, RewardOutput, register
from rewards.server.elborl_reward_server import JSON, MSGPACK, PROTOCOL, dumps, encode_images, loads

log = logging.getLogger(__name__)

RETRYABLE = (500, 502, 504)
BUSY = (429, 503)


class RemoteRewardError(RuntimeError):
    """The server refused the request for a reason retrying cannot fix (400/401/403)."""


@dataclass
class _Budget:
    """One ``score`` call's overall deadline (monotonic seconds)."""

    deadline: float

    def left(self) -> float:
        return self.deadline - time.monotonic()


@register("remote")
class RemoteReward(Reward):
    """Scores from a reward server. ``params`` of a ``rewards.functions`` entry: ``url``
    (e.g. ``http://127.0.0.1:18090``), ``reward`` (the served reward's name; optional when the
    server serves one), ``token_env`` / ``token_file`` (where the bearer token is; never the
    token itself), ``timeout_s`` (read timeout per request), ``max_batch``, ``encoding``
    (``raw`` or ``png``), ``format`` (``msgpack`` or ``json``), ``concurrency``, ``retries``,
    ``deadline_s`` (per call)."""

    def __init__(
        self,
        url: str,
        reward: str | None = None,
        token_env: str = "ELBORL_REWARD_TOKEN",
        token_file: str | None = None,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        max_batch: int = 64,
        encoding: str = "raw",
        format: str = "msgpack",
        concurrency: int = 1,
        retries: int = 3,
        deadline_s: float = 300.0,
        backoff_s: float = 0.5,
    ):
        import httpx

        if encoding not in ("raw", "png"):
            raise ValueError(f"remote reward: encoding {encoding!r}; allowed: raw, png")
        if format not in ("msgpack", "json"):
            raise ValueError(f"remote reward: format {format!r}; allowed: msgpack, json")
        if max_batch < 1 or concurrency < 1 or retries < 0 or deadline_s <= 0:
            raise ValueError(
                "remote reward: max_batch, concurrency >= 1, retries >= 0, deadline_s > 0"
            )
        self.url = url.rstrip("/")
        self.encoding, self.retries, self.backoff_s = encoding, retries, backoff_s
        self.content_type = MSGPACK if format == "msgpack" else JSON
        self.concurrency, self.deadline_s = concurrency, deadline_s
        token = _read_token(token_env, token_file)
        timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self.client = httpx.Client(
            timeout=timeout, headers={"Authorization": f"Bearer {token}"}, trust_env=False
        )
        served = self._info()
        names = [r["name"] for r in served]
        if reward is None and len(served) == 1:
            reward = names[0]
        if reward not in names:
            raise ValueError(
                f"remote reward: {self.url} serves {names}; set params.reward to one of them"
            )
        entry = served[names.index(reward)]
        self.reward: str = str(reward)
        self.name = self.reward  # metrics are keyed as for the same reward in-process
        rng = entry.get("range")
        self.range = None if rng is None else (float(rng[0]), float(rng[1]))
        self.max_batch = min(max_batch, int(entry.get("max_batch") or max_batch))
        self.failed = 0  # images that got no score (cumulative)

    def _info(self) -> list[dict[str, Any]]:
        import httpx

        try:
            resp = self.client.get(f"{self.url}/v1/info")
        except httpx.HTTPError as exc:
            raise ValueError(f"remote reward: cannot reach {self.url}/v1/info: {exc}") from exc
        if resp.status_code in (401, 403):
            raise ValueError(
                f"remote reward: {self.url} refused the token ({resp.status_code}); check "
                "params.token_env / params.token_file"
            )
        if resp.status_code != 200:
            raise ValueError(f"remote reward: {self.url}/v1/info answered {resp.status_code}")
        info = resp.json()
        if info.get("protocol") != PROTOCOL:
            raise ValueError(
                f"remote reward: {self.url} speaks {info.get('protocol')!r}, not {PROTOCOL}"
            )
        rewards: list[dict[str, Any]] = info.get("rewards", [])
        return rewards

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        return self.score_with_metadata(images, prompts, [None] * len(prompts))

    def score_with_metadata(
        self,
        images: np.ndarray,
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any] | None],
    ) -> RewardOutput:
        """Scores from the server; ``metadata`` goes with the images when any is known."""
        self.check_batch(images, prompts)
        meta = None if all(m is None for m in metadata) else [m or {} for m in metadata]
        budget = _Budget(time.monotonic() + self.deadline_s)
        spans = [
            (i, min(i + self.max_batch, len(prompts)))
            for i in range(0, len(prompts), self.max_batch)
        ]
        scores = np.full(len(prompts), np.nan)
        details: list[dict[str, Any]] = [{} for _ in prompts]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            parts = pool.map(
                lambda span: self._score_span(images, list(prompts), meta, span, budget), spans
            )
            for (lo, hi), (s, d) in zip(spans, parts, strict=True):
                scores[lo:hi], details[lo:hi] = s, d
        missing = int(np.isnan(scores).sum())
        if missing:
            self.failed += missing
            log.warning(
                "remote reward %s: %d of %d images got no score", self.reward, missing, len(prompts)
            )
        return RewardOutput(scores=scores, details=details)

    def _score_span(
        self,
        images: np.ndarray,
        prompts: list[str],
        meta: list[dict[str, Any]] | None,
        span: tuple[int, int],
        budget: _Budget,
    ) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Scores of ``images[lo:hi]``: halved on 413, NaN where nothing came in time."""
        lo, hi = span
        part = None if meta is None else meta[lo:hi]
        status, answer = self._post(images[lo:hi], prompts[lo:hi], budget, part)
        if status == 413 and hi - lo > 1:
            mid = (lo + hi) // 2
            a = self._score_span(images, prompts, meta, (lo, mid), budget)
            b = self._score_span(images, prompts, meta, (mid, hi), budget)
            return np.concatenate([a[0], b[0]]), a[1] + b[1]
        if status != 200 or answer is None:
            return np.full(hi - lo, np.nan), [{"remote_error": status} for _ in range(hi - lo)]
        raw = answer.get("scores") or []
        if len(raw) != hi - lo:
            log.warning("remote reward %s: %d scores for %d images", self.reward, len(raw), hi - lo)
            return np.full(hi - lo, np.nan), [{"remote_error": "count"} for _ in range(hi - lo)]
        values = np.array([np.nan if s is None else float(s) for s in raw], dtype=np.float64)
        got = answer.get("details") or [{} for _ in raw]
        return values, [d if isinstance(d, dict) else {} for d in got]

    def _post(
        self,
        images: np.ndarray,
        prompts: list[str],
        budget: _Budget,
        metadata: list[dict[str, Any]] | None = None,
    ) -> tuple[int | str, dict[str, Any] | None]:
        """One request with its retries: (final status or "timeout"/"unreachable", answer)."""
        import httpx

        request: dict[str, Any] = {
            "protocol": PROTOCOL,
            "request_id": uuid.uuid4().hex,  # the same id on every retry: idempotent
            "reward": self.reward,
            "prompts": prompts,
            "images": encode_images(images, self.encoding),
        }
        if metadata is not None:
            request["metadata"] = metadata
        body = dumps(request, self.content_type)
        headers = {"Content-Type": self.content_type}
        failures, busy = 0, 0
        status: int | str = "unreachable"
        while budget.left() > 0:
            resp = None
            try:
                resp = self.client.post(f"{self.url}/v1/score", content=body, headers=headers)
            except httpx.TimeoutException:
                status = "timeout"
            except httpx.TransportError:
                status = "unreachable"
            else:
                status = resp.status_code
                if status == 200:
                    return status, loads(resp.content, self.content_type)
                if status == 413:
                    return status, None
                if status in (400, 401, 403):
                    raise RemoteRewardError(
                        f"remote reward {self.reward}: {status} {_error_text(resp)}"
                    )
            if status in BUSY:
                busy += 1
                wait = _retry_after(resp, self.backoff_s * 2 ** min(busy, 5))
            else:
                failures += 1
                if failures > self.retries:
                    break
                wait = self.backoff_s * 2 ** (failures - 1)
            log.warning("remote reward %s: %s; retrying in %.1f s", self.reward, status, wait)
            time.sleep(max(0.0, min(wait, budget.left())))
        log.error(
            "remote reward %s: giving up on %d images (%s)", self.reward, len(prompts), status
        )
        return status, None


def _read_token(env: str, file: str | None) -> str:
    if file:
        try:
            token = Path(file).read_text().strip()
        except OSError as exc:
            raise ValueError(
                f"remote reward: cannot read params.token_file {file!r}: {exc}"
            ) from exc
    else:
        token = os.environ.get(env, "")
    if not token:
        where = f"params.token_file {file!r}" if file else f"the environment variable {env}"
        raise ValueError(f"remote reward: no token in {where} (params.token_env / token_file)")
    return token


def _retry_after(resp: Any, default: float) -> float:
    try:
        return min(float(resp.headers.get("retry-after", default)), 30.0)
    except (TypeError, ValueError):
        return default


def _error_text(resp: Any) -> str:
    try:
        return str(resp.json().get("error", resp.text))[:300]
    except ValueError:
        return resp.text[:300]
