"""The dashboard in a real browser (Debian's headless Chromium driven by Playwright) over a
finished short run served by ``elborl serve``; and ``elborl status`` against the same server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO
from tests.e2e.helpers import run_train, tiny_config

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]

TOKEN = "dashboard-test-token-" + "Zr4p" * 8
CHROMIUM = os.environ.get("ELBORL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A finished 3-round run (a sample grid every round, two evaluations) behind `elborl serve`."""
    tmp = tmp_path_factory.mktemp("dash")
    cfg = tiny_config(
        tmp,
        train={"rounds": 3, "eval_every": 2, "sample_grid_every": 1, "checkpoint_every": 0},
        # Two training rewards and a watched one: the per-reward panel has curves to draw.
        rewards={
            "functions": [{"name": "shapes"}, {"name": "jpeg_compressibility", "weight": 0.1}]
        },
        eval={"rewards": [{"name": "jpeg_incompressibility"}], "images_per_prompt": 2},
    )
    out = run_train(["--config", str(cfg)])
    assert out.returncode == 0, out.stderr[-4000:]
    port = _free_port()
    env = {**os.environ, "ELBORL_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", "--runs-dir", str(tmp / "runs"),
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "elborl serve did not come up"
        time.sleep(0.2)
    yield url, tmp
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err[-3000:]
    assert TOKEN not in err


def _until(ready: Callable[[], Any], timeout_s: float = 30.0) -> None:
    end = time.monotonic() + timeout_s
    while not ready():
        assert time.monotonic() < end, "the dashboard never got there"
        time.sleep(0.2)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="no Chromium; scripts/setup.sh installs it")
def test_dashboard_in_headless_chromium(served: tuple[str, Path], tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    url, _ = served
    errors: list[str] = []
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh profile
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900},
            timeout=60_000,
        )
        try:
            page = ctx.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.goto(f"{url}/?refresh=1#token={TOKEN}", timeout=30_000)
            page.wait_for_selector('#state[data-state="finished"]', timeout=30_000)
            # Polled from here: Playwright's wait_for_function evaluates its string with eval
            # inside the page, which the dashboard's CSP (no 'unsafe-eval') rightly refuses.
            _until(lambda: page.locator("#reward-chart circle.pt").count() >= 2)
            _until(
                lambda: page.locator("#samples-img").evaluate(
                    "img => img.complete && img.naturalWidth > 0"
                )
            )
            assert page.locator("#state").inner_text().lower() == "finished"
            assert page.locator("#reward-chart circle.pt").count() == 3
            assert page.locator("#accuracy-chart .eval circle.pt").count() == 2  # rounds 2, 3
            # Per reward: each training reward's rollout curve, the watched one's held-out
            # points (rounds 2, 3) and diversity, each on its own chart.
            page.wait_for_selector("#rewards-section:not([hidden])", timeout=30_000)
            charts = page.locator("#reward-charts figure")
            names = [charts.nth(i).get_attribute("data-reward") for i in range(charts.count())]
            assert names == ["jpeg_compressibility", "jpeg_incompressibility", "shapes",
                             "diversity"]  # fmt: skip
            one = '#reward-charts figure[data-reward="{}"] {}'
            assert page.locator(one.format("shapes", ".train polyline")).count() == 1
            assert page.locator(one.format("shapes", ".eval circle.pt")).count() == 0
            assert (
                page.locator(one.format("jpeg_incompressibility", ".eval circle.pt")).count() == 2
            )
            assert page.locator(one.format("diversity", ".eval circle.pt")).count() == 2
            assert page.locator("#samples-list li").count() == 16
            assert page.locator("#round").inner_text() == "3"
            assert page.locator("#workers tbody tr").count() == 3
            assert TOKEN not in page.url  # taken out of the address bar
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)

            # A new tab has no token (session storage is per tab): it asks, shows no data.
            fresh = ctx.new_page()
            fresh.goto(url, timeout=30_000)
            fresh.wait_for_selector("#login:not([hidden])", timeout=30_000)
            assert fresh.locator("#main").is_hidden()
        finally:
            ctx.close()
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    assert not errors, errors


def test_status_command_prints_the_table(served: tuple[str, Path]) -> None:
    url, _ = served
    env = {**os.environ, "ELBORL_TOKEN": TOKEN, "COLUMNS": "160"}
    cmd = [sys.executable, "-m", "services.cli", "status", "--url", url]
    listing = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    assert "finished" in listing.stdout and "3/3" in listing.stdout
    one = subprocess.run(
        [*cmd, "--run", "t"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert one.returncode == 0, one.stderr
    for text in ("held-out accuracy", "last checkpoint", "learner", "rollout", "ETA"):
        assert text in one.stdout, text
    wrong = {**env, "ELBORL_TOKEN": "not-the-token-" + "x" * 20}
    denied = subprocess.run(cmd, cwd=REPO, env=wrong, capture_output=True, text=True, timeout=60)
    assert denied.returncode == 1 and "403" in denied.stderr
    assert "not-the-token" not in denied.stderr + denied.stdout


def test_serve_and_status_fail_clearly(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ELBORL_TOKEN"}
    cli = [sys.executable, "-m", "services.cli"]
    serve = subprocess.run(
        [*cli, "serve", "--runs-dir", str(tmp_path), "--port", "0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert serve.returncode == 2 and "needs a bearer token" in serve.stderr
    env["ELBORL_TOKEN"] = TOKEN
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    status = subprocess.run(
        [*cli, "status", "--url", url],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert status.returncode == 1 and "cannot reach" in status.stderr
