"""The ``elborl-reward/1`` server (``rewards/server/elborl_reward_server.py``) and its client
(the ``remote`` reward), against a real uvicorn server on 127.0.0.1 with test backends: auth,
encodings, the body limit and the client's halving, bounded retries on errors and timeouts,
``null`` scores as invalid samples. Every test is bounded in time."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import numpy as np
import pytest

from rewards.config import RewardSpec
from rewards.pool import RewardScorer
from rewards.remote import RemoteReward, RemoteRewardError
from rewards.server.elborl_reward_server import (
    MSGPACK,
    PROTOCOL,
    Brightness,
    create_app,
    dumps,
    encode_images,
)

pytestmark = pytest.mark.integration

TOKEN = "test-token-0123456789"


class Recorder(Brightness):
    """Brightness that records the batch sizes it scores."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def score(self, images: np.ndarray, prompts: list[str], metadata: Any) -> list[float]:
        self.batches.append(len(prompts))
        return super().score(images, prompts, metadata)


class Failing(Brightness):
    name = "failing"

    def __init__(self) -> None:
        self.calls = 0

    def score(self, images: np.ndarray, prompts: list[str], metadata: Any) -> list[float]:
        self.calls += 1
        raise RuntimeError("the model fell over")


class Hanging(Brightness):
    name = "hanging"

    def score(self, images: np.ndarray, prompts: list[str], metadata: Any) -> list[float]:
        time.sleep(1.5)
        return super().score(images, prompts, metadata)


class HalfNull(Brightness):
    name = "half_null"

    def score(
        self, images: np.ndarray, prompts: list[str], metadata: Any
    ) -> tuple[list[float | None], list[dict[str, Any]]]:
        scores = super().score(images, prompts, metadata)
        kept = [s if i % 2 == 0 else None for i, s in enumerate(scores)]
        return kept, [{"index": np.int64(i)} for i in range(len(scores))]


@contextmanager
def serving(backends: list[Any], **kw: Any) -> Iterator[str]:
    """A uvicorn server on a free 127.0.0.1 port in a thread; its URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(backends, TOKEN, **kw)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture
def token_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("TEST_REWARD_TOKEN", TOKEN)
    return "TEST_REWARD_TOKEN"


def _images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_health_needs_no_token_and_everything_else_does() -> None:
    with serving([Brightness()]) as url:
        assert httpx.get(f"{url}/v1/health").json() == {"status": "ok", "protocol": PROTOCOL}
        assert httpx.get(f"{url}/v1/info").status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert httpx.get(f"{url}/v1/info", headers=wrong).status_code == 403
        assert httpx.post(f"{url}/v1/score", content=b"{}", headers=wrong).status_code == 403
        good = {"Authorization": f"Bearer {TOKEN}"}
        info = httpx.get(f"{url}/v1/info", headers=good).json()
        assert info["protocol"] == PROTOCOL
        assert info["rewards"][0]["name"] == "brightness"
        assert info["rewards"][0]["range"] == [0.0, 1.0]


@pytest.mark.parametrize(("encoding", "fmt"), [("raw", "msgpack"), ("png", "json")])
def test_remote_scores_equal_the_in_process_ones(token_env: str, encoding: str, fmt: str) -> None:
    images, prompts = _images(10), [f"prompt {i}" for i in range(10)]
    with serving([Brightness()]) as url:
        remote = RemoteReward(url, token_env=token_env, encoding=encoding, format=fmt, max_batch=4)
        out = remote.score(images, prompts)
    assert remote.name == "brightness" and remote.range == (0.0, 1.0)
    expected = Brightness().score(images, prompts, None)
    np.testing.assert_array_equal(out.scores, np.array(expected))  # lossless both ways


def test_an_oversize_body_gets_413_and_the_client_halves_it(token_env: str) -> None:
    recorder = Recorder()
    images = _images(16)  # 3 KB each raw: 16 exceed the limit, 8 fit
    with serving([recorder], max_body_bytes=40_000) as url:
        body = dumps(
            {"protocol": PROTOCOL, "prompts": ["p"] * 16, "images": encode_images(images)},
            MSGPACK,
        )
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": MSGPACK}
        assert httpx.post(f"{url}/v1/score", content=body, headers=headers).status_code == 413
        out = RemoteReward(url, token_env=token_env, max_batch=16).score(images, ["p"] * 16)
    assert np.isfinite(out.scores).all() and recorder.batches == [8, 8]


def test_more_images_than_max_batch_is_413_naming_the_limit() -> None:
    small = Brightness()
    small.max_batch = 2
    with serving([small]) as url:
        body = dumps(
            {"protocol": PROTOCOL, "prompts": ["p"] * 3, "images": encode_images(_images(3))},
            MSGPACK,
        )
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": MSGPACK}
        resp = httpx.post(f"{url}/v1/score", content=body, headers=headers)
    assert resp.status_code == 413 and resp.json()["max_batch"] == 2


def test_a_failing_backend_is_retried_a_bounded_number_of_times(token_env: str) -> None:
    failing = Failing()
    with serving([failing]) as url:
        remote = RemoteReward(url, token_env=token_env, retries=2, backoff_s=0.01)
        start = time.monotonic()
        out = remote.score(_images(4), ["p"] * 4)
    assert np.isnan(out.scores).all() and failing.calls == 3  # 1 + 2 retries, then given up
    assert out.details[0]["remote_error"] == 500 and time.monotonic() - start < 10
    assert remote.failed == 4


def test_a_hung_backend_times_out_and_the_call_returns(token_env: str) -> None:
    with serving([Hanging()], max_concurrency=2) as url:
        remote = RemoteReward(url, token_env=token_env, timeout_s=0.3, retries=1, backoff_s=0.01)
        start = time.monotonic()
        out = remote.score(_images(2), ["p"] * 2)
        took = time.monotonic() - start
    assert np.isnan(out.scores).all() and out.details[0]["remote_error"] == "timeout"
    assert took < 1.4  # two 0.3 s attempts, not the backend's 1.5 s


def test_null_scores_become_invalid_samples_in_the_scorer(token_env: str) -> None:
    with serving([HalfNull()]) as url:
        spec = RewardSpec(name="remote", params={"url": url, "token_env": token_env})
        scorer = RewardScorer([spec])

        class Batch:
            sample_ids = group_ids = np.arange(6)
            prompts = ["p"] * 6
            images = _images(6)
            version, seconds = 0, 0.0

        scored = scorer.score(Batch())
    assert scored.valid.tolist() == [True, False] * 3
    assert np.isfinite(scored.per_reward["half_null"][::2]).all()


def test_client_errors_name_what_to_fix(token_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with serving([Brightness()]) as url:
        with pytest.raises(ValueError, match=r"set params\.reward to one of them"):
            RemoteReward(url, reward="pickscore", token_env=token_env)
        monkeypatch.setenv("WRONG_TOKEN", "not-it")
        with pytest.raises(ValueError, match="refused the token"):
            RemoteReward(url, token_env="WRONG_TOKEN")
        with pytest.raises(ValueError, match="no token in the environment variable UNSET_X"):
            RemoteReward(url, token_env="UNSET_X")
        remote = RemoteReward(url, token_env=token_env)
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        bad = httpx.post(f"{url}/v1/score", content=b'{"protocol": "v0"}', headers=headers)
        assert bad.status_code == 400 and "elborl-reward/1" in bad.json()["error"]
        remote.content_type = "application/json"  # a schema error is never retried
        with pytest.raises(RemoteRewardError, match="400"):
            remote._post(np.zeros((1, 8, 8, 3), np.uint8), [], _budget())
    with pytest.raises(ValueError, match="cannot reach"):
        RemoteReward(url, token_env=token_env, connect_timeout_s=0.5)


def _budget() -> Any:
    from rewards.remote import _Budget

    return _Budget(time.monotonic() + 5)


def test_schemathesis_finds_no_server_errors_for_a_valid_token() -> None:
    """Generated requests against the server's own OpenAPI schema (the score body's JSON
    schema included): whatever they hold, 4xx at worst, never a 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    headers = {"Authorization": f"Bearer {TOKEN}"}
    app = create_app([Brightness(), Failing()], TOKEN)
    api = schemathesis.openapi.from_asgi("/openapi.json", app, headers=headers)
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.path for op in operations} == {"/v1/health", "/v1/info", "/v1/score"}
    for op in operations:

        @given(case=op.as_strategy())
        @settings(
            max_examples=40,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            if case.body is not None and isinstance(case.body, dict):
                case.body.pop("reward", None)  # "failing" raises by design: a 500 is its job
                case.body["reward"] = "brightness"
            # The protocol's own rules (data length = prod(shape), one image per prompt) are
            # beyond JSON schema, so a schema-valid body may rightly get 400: every other
            # check (no 5xx above all, documented statuses and content types) applies.
            case.call_and_validate(headers=headers, excluded_checks=[positive_data_acceptance])

        check()
