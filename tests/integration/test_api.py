"""The status API through FastAPI's TestClient over a run directory written by the real writers
(``RunDir``, the loop's grid and status writers): endpoints, auth, Prometheus, schemathesis."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from services.api import reader as reader_module
from services.api.app import MAX_IN_FLIGHT, create_app
from services.api.control import STOP_FILE, load_token
from services.api.hardening import LimitInFlight
from services.api.reader import RunsReader
from services.api.server import ApiServer
from services.config import ConfigError, RunConfig, ServiceConfig
from services.controller import Controller
from services.run import RunDir
from services.status import update_status

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TOKEN = "test-token-" + "k3Jx9" * 6
AUTH = {"Authorization": f"Bearer {TOKEN}"}
API_RUNS = "/api/v1/runs"


def _write_run(root: Path, name: str, state: str, rounds: int = 3, **status: Any) -> Path:
    """A run directory as the driver leaves it after ``rounds`` rounds of a 5-round run."""
    cfg = RunConfig.model_validate(
        {"runs_dir": str(root), "name": name, "train": {"rounds": 5, "eval_every": 2}}
    )
    run = RunDir(cfg, resume=False)
    for r in range(1, rounds + 1):
        m: dict[str, Any] = {
            "reward/mean": 0.2 + 0.1 * r,
            "reward/std": 0.05,
            "reward/accuracy": 0.1 * r,
            "rollout/images": 16.0,
            "timing/round": 2.0,
            "weights/version": r,
            "perf/samples_scored_total": 16.0 * r,
            "learner/kl": float("nan"),  # non-finite values must come back as null
        }
        if r % 2 == 0:
            m["eval/accuracy"] = 0.25
        run.log_metrics(r, m)
    run.close()
    images = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    prompts = ["a red circle", "two blue squares", "a green triangle above a red circle", "x"]
    Controller._save_grid(
        run.path / "samples" / f"round_{rounds:05d}.png", images, prompts, [1, 0.5, 0, 1]
    )
    run.commit_checkpoint(run.new_checkpoint(2), 2, {"round": 2})
    fields: dict[str, Any] = {"pid": os.getpid(), "hostname": socket.gethostname(), **status}
    update_status(
        run,
        state=state,
        round=rounds,
        total_rounds=5,
        version=rounds,
        reward_mean=0.5,
        reward_std=0.05,
        accuracy=0.25,
        accuracy_round=2,
        images_per_s=7.5,
        seconds_per_round=2.0,
        eta_s=4.0,
        workers={
            "rollout": {"num_workers": 2, "alive": 2, "restarts": 0, "nodes": ["n1", "n1"]},
            "learner": {"num_workers": 1, "alive": 0, "restarts": 1, "nodes": ["n1"]},
        },
        **fields,
    )
    return run.path


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    _write_run(tmp_path, "live", "running")
    _write_run(tmp_path, "done", "finished", rounds=5)
    return tmp_path


@pytest.fixture
def client(runs: Path) -> TestClient:
    return TestClient(create_app(runs, TOKEN))


def _concrete(path: str) -> str:
    return path.replace("{run_id}", "live").replace("{file_name}", "round_00003.png")


def test_healthz_needs_no_token_and_everything_else_does(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    paths = client.app.openapi()["paths"]  # type: ignore[attr-defined]
    guarded = [("GET", "/openapi.json")] + [
        (method.upper(), path)
        for path, ops in paths.items()
        for method in ops
        if path != "/healthz"
    ]
    assert ("POST", "/api/v1/runs/{run_id}/stop") in guarded and ("GET", "/metrics") in guarded
    for method, path in guarded:
        url = _concrete(path)
        missing = client.request(method, url)
        assert missing.status_code == 401, url
        assert missing.headers["www-authenticate"] == "Bearer"
        basic = client.request(method, url, headers={"Authorization": "Basic abc"})
        assert basic.status_code == 401
        wrong = client.request(method, url, headers={"Authorization": "Bearer " + "x" * 40})
        assert wrong.status_code == 403, url


def test_token_never_appears_in_responses_or_logs(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-" + TOKEN[::-1]
    seen = []
    for headers in (AUTH, {"Authorization": f"Bearer {wrong}"}):
        for url in ("/api/v1/runs", "/api/v1/runs/live", "/metrics", "/openapi.json", "/readyz"):
            resp = client.get(url, headers=headers)
            seen.append(resp.text + str(resp.headers))
        seen.append(client.post("/api/v1/runs/done/stop", headers=headers).text)
    assert "rejected GET /api/v1/runs: wrong token" in caplog.text
    for secret in (TOKEN, wrong):
        assert secret not in caplog.text
        assert not any(secret in text for text in seen)


def test_run_list_and_detail(client: TestClient) -> None:
    runs = client.get("/api/v1/runs", headers=AUTH).json()["runs"]
    assert {r["run_id"]: r["state"] for r in runs} == {"live": "running", "done": "finished"}
    d = client.get("/api/v1/runs/live", headers=AUTH).json()
    assert d["state"] == "running" and d["error"] is None
    assert (d["round"], d["total_rounds"], d["policy_version"]) == (3, 5, 3)
    assert (d["reward_mean"], d["accuracy"], d["accuracy_round"]) == (0.5, 0.25, 2)
    assert (d["images_per_s"], d["eta_s"]) == (7.5, 4.0)
    assert d["last_checkpoint"] == "checkpoints/round_00002" and d["last_checkpoint_round"] == 2
    workers = {w["role"]: w for w in d["workers"]}
    assert workers["rollout"]["alive"] == 2 and workers["learner"]["restarts"] == 1
    assert d["config"]["train.rounds"] == 5 and d["config"]["learner.loss"]
    assert not any(k.startswith("service") for k in d["config"])
    assert client.get("/api/v1/runs/nope", headers=AUTH).status_code == 404
    assert client.get("/api/v1/runs/..", headers=AUTH).status_code == 404


def test_metrics_history_since_and_keys(client: TestClient) -> None:
    full = client.get("/api/v1/runs/live/metrics", headers=AUTH).json()
    assert [r["round"] for r in full["records"]] == [1, 2, 3]
    assert "reward/mean" in full["keys"] and "eval/accuracy" in full["keys"]
    assert full["records"][0]["values"]["learner/kl"] is None
    part = client.get(
        "/api/v1/runs/live/metrics",
        params={"since": 1, "keys": "reward/mean,eval/accuracy"},
        headers=AUTH,
    ).json()
    assert [r["round"] for r in part["records"]] == [2, 3]
    first = part["records"][0]["values"]
    assert first == {"reward/mean": pytest.approx(0.4), "eval/accuracy": 0.25}
    assert set(part["records"][1]["values"]) == {"reward/mean"}
    repeated = client.get(
        "/api/v1/runs/live/metrics?keys=reward/std&keys=timing/round", headers=AUTH
    ).json()
    assert set(repeated["records"][0]["values"]) == {"reward/std", "timing/round"}
    assert client.get("/api/v1/runs/live/metrics?since=-1", headers=AUTH).status_code == 422


def test_history_follows_appends_and_rewrites(client: TestClient, runs: Path) -> None:
    url = "/api/v1/runs/live/metrics"
    assert len(client.get(url, headers=AUTH).json()["records"]) == 3
    path = runs / "live" / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"round": 4, "time": 1.0, "reward/mean": 0.9}\n{"round": 5, "rew')  # mid-write
    assert [r["round"] for r in client.get(url, headers=AUTH).json()["records"]][-1] == 4
    # A resume truncates the history by replacing the file: the reader starts over.
    tmp = path.with_suffix(".tmp")
    tmp.write_text('{"round": 1, "time": 1.0, "reward/mean": 0.1}\n')
    tmp.replace(path)
    assert [r["round"] for r in client.get(url, headers=AUTH).json()["records"]] == [1]


def test_latest_samples_and_png(client: TestClient) -> None:
    grid = client.get("/api/v1/runs/live/samples/latest", headers=AUTH).json()
    assert grid["round"] == 3 and grid["kind"] == "train"
    assert grid["prompts"][1] == "two blue squares" and grid["rewards"] == [1, 0.5, 0, 1]
    png = client.get(grid["image_url"], headers=AUTH)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG")
    assert client.get(grid["image_url"]).status_code == 401
    assert client.get("/api/v1/runs/live/samples/latest?kind=eval", headers=AUTH).status_code == 404
    for bad in ("config.yaml", "..%2Fconfig.yaml", "round_00099.png"):
        assert client.get(f"/api/v1/runs/live/samples/{bad}", headers=AUTH).status_code == 404


def test_stop_request(client: TestClient, runs: Path) -> None:
    resp = client.post("/api/v1/runs/live/stop", headers=AUTH)
    assert resp.status_code == 202 and resp.json()["state"] == "stopping"
    assert (runs / "live" / STOP_FILE).exists()
    d = client.get("/api/v1/runs/live", headers=AUTH).json()
    assert d["state"] == "stopping" and d["stop_requested"]
    assert client.post("/api/v1/runs/live/stop", headers=AUTH).status_code == 202  # idempotent
    assert client.post("/api/v1/runs/done/stop", headers=AUTH).status_code == 409
    assert not (runs / "done" / STOP_FILE).exists()
    assert client.post("/api/v1/runs/nope/stop", headers=AUTH).status_code == 404


def test_a_driver_that_died_is_reported_failed(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True, check=True)  # fmt: skip
    _write_run(tmp_path, "crashed", "running", pid=int(gone.stdout))
    _write_run(tmp_path, "failed", "failed", error="RayActorError: the learner died")
    client = TestClient(create_app(tmp_path, TOKEN))
    d = client.get("/api/v1/runs/crashed", headers=AUTH).json()
    assert d["state"] == "failed" and "exited without" in d["error"] and d["eta_s"] is None
    d = client.get("/api/v1/runs/failed", headers=AUTH).json()
    assert d["state"] == "failed" and d["error"] == "RayActorError: the learner died"


def test_a_cached_detail_follows_the_run_files_and_a_driver_death(
    runs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Repeated reads are served from the cache, a status write is seen by the next read, and
    a driver that dies (writing nothing) turns the run failed once the cache's TTL passes."""
    monkeypatch.setattr(reader_module, "DETAIL_TTL_S", 2.0)
    status_file = runs / "live" / "status.json"
    driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        status = {**json.loads(status_file.read_text()), "pid": driver.pid}
        status_file.write_text(json.dumps(status))
        reader = RunsReader(runs)
        first = reader.detail("live")
        assert first.state == "running" and reader.detail("live") is first  # cached
        status_file.write_text(json.dumps({**status, "round": 4}))
        assert reader.detail("live").round == 4  # the file changed: read again at once
        driver.kill()
        driver.wait()
        assert reader.detail("live").state == "running"  # within the TTL: the cached detail
        time.sleep(2.1)
        assert reader.detail("live").state == "failed"  # past it: the dead driver is seen
    finally:
        driver.kill()
    (runs / "live" / STOP_FILE).write_text("{}")
    assert reader.detail("live").stop_requested
    assert reader.path("live") == runs / "live"
    for name in ("", ".", "..", "../live", "nope", "live/samples", "a" * 300):
        assert reader.path(name) is None, name


def test_prometheus_metrics(client: TestClient) -> None:
    client.get("/api/v1/runs", headers=AUTH)
    resp = client.get("/metrics", headers=AUTH)
    assert resp.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(resp.text)
        for s in fam.samples
    }
    assert samples[("elborl_round", (("run", "live"),))] == 3
    assert samples[("elborl_round", (("run", "done"),))] == 5
    assert samples[("elborl_reward_mean", (("run", "live"),))] == 0.5
    assert samples[("elborl_eval_accuracy", (("run", "live"),))] == 0.25
    assert samples[("elborl_eta_seconds", (("run", "live"),))] == 4.0
    assert samples[("elborl_run_state", (("run", "live"), ("state", "running")))] == 1
    assert samples[("elborl_run_state", (("run", "live"), ("state", "failed")))] == 0
    assert samples[("elborl_workers_alive", (("role", "learner"), ("run", "live")))] == 0
    assert samples[("elborl_samples_scored_total", (("run", "live"),))] == 48
    key = ("elborl_api_requests_total", (("method", "GET"), ("route", "/api/v1/runs"),
                                         ("status", "200")))  # fmt: skip
    assert samples[key] >= 1


def test_openapi_schema_lists_the_versioned_endpoints(client: TestClient) -> None:
    schema = client.get("/openapi.json", headers=AUTH).json()
    paths = set(schema["paths"])
    assert {
        "/healthz",
        "/readyz",
        "/metrics",
        "/api/v1/runs",
        "/api/v1/runs/{run_id}",
        "/api/v1/runs/{run_id}/metrics",
        "/api/v1/runs/{run_id}/samples/latest",
        "/api/v1/runs/{run_id}/stop",
    } <= paths
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    assert client.get("/docs").status_code == 404  # no CDN-backed pages


def test_dashboard_shell_is_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and 'id="reward-chart"' in page.text
    assert client.get("/static/dashboard.js").status_code == 200
    assert client.get("/static/dashboard.css").status_code == 200


def test_cors_is_off_unless_configured(runs: Path) -> None:
    origin = {"Origin": "http://elsewhere.example", "Access-Control-Request-Method": "GET"}
    off = TestClient(create_app(runs, TOKEN))
    assert "access-control-allow-origin" not in off.get("/healthz", headers=origin).headers
    on = TestClient(create_app(runs, TOKEN, cors_origins=["http://elsewhere.example"]))
    pre = on.options("/api/v1/runs", headers=origin)
    assert pre.headers["access-control-allow-origin"] == "http://elsewhere.example"


def test_readyz(runs: Path, tmp_path: Path) -> None:
    ok = TestClient(create_app(runs, TOKEN)).get("/readyz", headers=AUTH)
    assert ok.status_code == 200 and ok.json()["num_runs"] == 2
    missing = TestClient(create_app(tmp_path / "absent", TOKEN)).get("/readyz", headers=AUTH)
    assert missing.status_code == 503 and missing.json()["ready"] is False


def test_token_from_env_or_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ELBORL_TEST_TOKEN", TOKEN)
    assert load_token(ServiceConfig(token_env="ELBORL_TEST_TOKEN")) == TOKEN
    monkeypatch.delenv("ELBORL_TEST_TOKEN")
    file = tmp_path / "token"
    file.write_text(TOKEN + "\n")
    assert load_token(ServiceConfig(token_env="ELBORL_TEST_TOKEN", token_file=str(file))) == TOKEN
    with pytest.raises(ConfigError, match="needs a bearer token"):
        load_token(ServiceConfig(token_env="ELBORL_TEST_TOKEN"))
    file.write_text("short")
    with pytest.raises(ConfigError, match="at least 16") as err:
        load_token(ServiceConfig(token_env="ELBORL_TEST_TOKEN", token_file=str(file)))
    assert "short" not in str(err.value)


def test_server_on_a_free_loopback_port_and_a_busy_port(runs: Path) -> None:
    server = ApiServer(runs, TOKEN, "127.0.0.1", 0).start()
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", server.url)
        with httpx.Client(base_url=server.url, timeout=10) as http:
            for _ in range(50):  # the thread needs a moment to start serving
                try:
                    if http.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
            assert http.get("/api/v1/runs/live", headers=AUTH).json()["round"] == 3
        port = int(server.url.rsplit(":", 1)[1])
        with pytest.raises(ConfigError, match="cannot listen"):
            ApiServer(runs, TOKEN, "127.0.0.1", port)
    finally:
        server.stop()


def test_the_service_runs_at_idle_priority_and_idle_connections_do_not_block_it(
    runs: Path,
) -> None:
    """The service's process runs at the lowest priority; idle keep-alive connections (a few
    dashboards' worth, more than the requests-in-flight bound) leave it answering."""
    server = ApiServer(runs, TOKEN, "127.0.0.1", 0).start()
    host, port = "127.0.0.1", int(server.url.rsplit(":", 1)[1])
    held: list[socket.socket] = []
    try:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            _wait_healthy(http)
            assert server.process is not None and server.process.pid is not None
            assert os.getpriority(os.PRIO_PROCESS, server.process.pid) == 19
            if hasattr(os, "SCHED_IDLE"):
                assert os.sched_getscheduler(server.process.pid) == os.SCHED_IDLE
            held = [socket.create_connection((host, port)) for _ in range(2 * MAX_IN_FLIGHT)]
            for _ in range(3):
                assert http.get("/api/v1/runs/live", headers=AUTH).status_code == 200
    finally:
        for sock in held:
            sock.close()
        server.stop()


def test_requests_past_the_in_flight_bound_get_a_503_at_once() -> None:
    """``LimitInFlight``: with ``limit`` requests in progress the next is answered 503 with
    Retry-After (no queue), and once they finish requests are served again."""
    import asyncio

    async def scenario() -> None:
        release, started = asyncio.Event(), [0]

        async def slow(scope: Any, receive: Any, send: Any) -> None:
            started[0] += 1
            await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        transport = httpx.ASGITransport(app=LimitInFlight(slow, limit=3))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            tasks = [asyncio.create_task(client.get("/")) for _ in range(3)]
            while started[0] < 3:
                await asyncio.sleep(0.01)
            busy = await client.get("/")
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert "busy" in busy.json()["detail"]
            release.set()
            assert [(await t).status_code for t in tasks] == [200, 200, 200]
            assert (await client.get("/")).status_code == 200

    asyncio.run(scenario())


def test_a_503_from_the_bound_carries_the_security_headers(runs: Path) -> None:
    client = TestClient(create_app(runs, TOKEN, max_in_flight=0))
    resp = client.get("/healthz")
    assert resp.status_code == 503 and resp.headers["x-frame-options"] == "DENY"


def _wait_healthy(http: httpx.Client) -> None:
    for _ in range(100):  # the child process needs a moment to start serving
        try:
            if http.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
    pytest.fail("the status service never answered /healthz")


# ---------------------------------------------------------------------- schemathesis
def test_schemathesis_finds_no_server_errors(runs: Path) -> None:
    """Generated requests for every operation of the app's own schema: no 5xx, responses
    conform to their models. (Driven directly: the schemathesis pytest plugin's lazy fixture
    loader does not work with this pytest.)"""
    api = schemathesis.openapi.from_asgi("/openapi.json", create_app(runs, TOKEN), headers=AUTH)
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 9
    for op in operations:
        # Generated run names almost never exist; use the real ones too, to reach the 200s.
        @given(case=op.as_strategy(), run_id=st.sampled_from(["live", "done", None]))
        @settings(
            max_examples=20,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any, run_id: str | None) -> None:
            if run_id and case.path_parameters and "run_id" in case.path_parameters:
                case.path_parameters["run_id"] = run_id
            case.call_and_validate(headers=AUTH)

        check()


def test_made_up_methods_do_not_grow_the_metrics(client: TestClient) -> None:
    for i in range(30):
        client.request(f"ZZPROBE{i}", "/healthz")
    text = client.get("/metrics", headers=AUTH).text
    methods = set(re.findall(r'elborl_api_requests_total\{method="([^"]*)"', text))
    assert "OTHER" in methods and methods <= {"GET", "HEAD", "POST", "OTHER"}
    assert "ZZPROBE" not in text


def test_head_is_answered_where_get_is(client: TestClient) -> None:
    for path, headers in (("/healthz", {}), (f"{API_RUNS}", AUTH), ("/", {})):
        get, head = client.get(path, headers=headers), client.head(path, headers=headers)
        assert head.status_code == get.status_code == 200, path
        assert head.content == b"" and head.headers["content-length"] == str(len(get.content))


def test_every_response_carries_the_security_headers(client: TestClient) -> None:
    for resp in (client.get("/"), client.get("/healthz"), client.get(API_RUNS)):  # 200 and 401
        assert resp.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in resp.headers["content-security-policy"]
        assert "script-src 'self'" in resp.headers["content-security-policy"]
        assert resp.headers["x-content-type-options"] == "nosniff"


def test_a_symlink_in_samples_is_not_served(client: TestClient, runs: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG not for you")
    (runs / "live" / "samples" / "round_00099.png").symlink_to(secret)
    resp = client.get(f"{API_RUNS}/live/samples/round_00099.png", headers=AUTH)
    assert resp.status_code == 404
    assert client.get(f"{API_RUNS}/live/samples/round_00003.png", headers=AUTH).status_code == 200


def test_terminal_escapes_in_a_request_never_reach_the_log(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="elborl.api"):
        resp = client.get(f"{API_RUNS}/%1b%5b31mred%1b%5b0m", headers={"Authorization": "Bearer x"})
    assert resp.status_code == 403
    assert caplog.records and all("\x1b" not in r.getMessage() for r in caplog.records)
    assert "\\x1b[31mred" in caplog.records[-1].getMessage()
