"""Load on the status service against training: the main job's rounds with the service
idle and with a 100 requests/s burst on it (the API, its metrics history and Prometheus'
``/metrics``, as a dashboard and scrapers would ask). The service runs in its own process at
the lowest priority and answers from cached reads, so the burst should cost the rounds under
10 %.

One ``elborl train --config configs/shapes.yaml`` run, made smaller (images, no evaluation)
with ``service.enabled``, alternates by round: even rounds under the burst, odd rounds idle,
so both halves share the process, its warm caches and the machine's state (separate runs
differ by ~20 % on their own here). The figure is the ratio of the median ``timing/round`` of
the loaded rounds to the idle ones (round 1, which carries start-up, excluded). The load
generator is 4 keep-alive raw-socket clients in this process. It shares the two cores with
training, as a dashboard on another machine would not, so the headline case runs it at idle
priority (``SCHED_IDLE``, like the service); a second run keeps it at normal priority, where
its own CPU (about as much per request as the service's) counts against the rounds too. The
rate it achieved, the answers and the latencies are reported beside the rounds.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import REPO, median, parse_args, write

TOKEN = "bench-api-load-token-0123456789abcdef"
CLIENTS = 4  # concurrent keep-alive connections sharing the request rate


def _train(runs: Path, rounds: int, images: int, rps: float, idle: bool) -> dict[str, Any]:
    """The run, loaded on even rounds; its per-round times and the load's figures."""
    sets = {
        "name": "load",
        "runs_dir": str(runs),
        "train.rounds": rounds,
        "train.eval_every": 0,
        "train.eval_at_start": "false",
        "train.checkpoint_every": 0,
        "train.sample_grid_every": 0,
        "rollout.prompts_per_round": 4,
        "rollout.images_per_prompt": images,
        "service.enabled": "true",
        "service.port": 0,
    }
    cmd = [sys.executable, "-m", "services.cli", "train", "--config", "configs/shapes.yaml"]
    cmd += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    env = {**os.environ, "ELBORL_TOKEN": TOKEN}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    load = _Load(runs / "load", proc, rps, rounds, idle)
    thread = threading.Thread(target=load.run, daemon=True)
    thread.start()
    _, err = proc.communicate(timeout=3600)
    thread.join(30)
    if proc.returncode:
        raise RuntimeError(f"the run failed:\n{err.decode()[-3000:]}")
    lines = (runs / "load" / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines if x.strip()]
    return {"rounds": {r["round"]: r["timing/round"] for r in recs}, "load": load}


class _Load:
    """Requests at ``rps`` per second while an even round of the ``rounds`` is in progress
    (the run's ``metrics.jsonl`` says which round that is), none during odd ones."""

    def __init__(
        self, run: Path, proc: subprocess.Popen[bytes], rps: float, rounds: int, idle: bool
    ):
        self.run_dir, self.proc, self.rps, self.rounds = run, proc, rps, rounds
        self.idle_client = idle
        self.requests = self.errors = 0
        self.statuses: dict[int, int] = {}  # status code (0: no answer) -> count
        self.lock = threading.Lock()
        self._checked = (0.0, False)  # (when, loading then)
        self.latency_s: list[float] = []
        self.loaded_s = self.client_cpu_s = 0.0

    def loading(self) -> bool:
        """An even round is in progress (not the shutdown after the last round, when the
        service is gone while the driver stops Ray). Read from the run's files at most every
        50 ms, so that the generator's own CPU stays small."""
        with self.lock:
            if time.monotonic() - self._checked[0] > 0.05:
                now = self.current_round()
                on = self.proc.poll() is None and now <= self.rounds and now % 2 == 0
                self._checked = (time.monotonic(), on)
            return self._checked[1]

    def current_round(self) -> int:
        """The round in progress: one after the last complete record's."""
        try:
            lines = (self.run_dir / "metrics.jsonl").read_bytes().splitlines(keepends=True)
            done = [x for x in lines if x.endswith(b"\n") and x.strip()]
            return 1 + int(json.loads(done[-1])["round"]) if done else 1
        except (OSError, ValueError, KeyError):
            return 1

    def run(self) -> None:
        """``CLIENTS`` connections, each at ``rps / CLIENTS``: a dashboard's and scrapers'
        requests arrive side by side, not one after another."""
        url = self._wait_for_service()
        if url is None:
            return
        threads = [
            threading.Thread(target=self._client_loop, args=(url, k), daemon=True)
            for k in range(CLIENTS)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _client_loop(self, url: str, k: int) -> None:
        if self.idle_client and hasattr(os, "SCHED_IDLE"):  # this thread only (Linux: 0 is it)
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        paths = ["/api/v1/runs/load", "/api/v1/runs/load/metrics", "/metrics"]
        client, rate = _Client(url, TOKEN), self.rps / CLIENTS
        cpu0, i = time.thread_time(), k
        while self.proc.poll() is None:
            if not self.loading():  # an odd round, or the run is ending: idle
                time.sleep(0.05)
                continue
            start, n = time.monotonic(), 0
            while self.loading():
                time.sleep(max(0.0, start + n / rate - time.monotonic()))
                t0 = time.monotonic()
                status = client.get(paths[i % len(paths)])
                with self.lock:
                    self.latency_s.append(time.monotonic() - t0)
                    self.requests, self.errors = self.requests + 1, self.errors + (status != 200)
                    self.statuses[status] = self.statuses.get(status, 0) + 1
                n, i = n + 1, i + 1
            if k == 0:
                self.loaded_s += time.monotonic() - start
        with self.lock:
            self.client_cpu_s += time.thread_time() - cpu0
        client.close()

    def _wait_for_service(self) -> str | None:
        while self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                url = json.loads((self.run_dir / "status.json").read_text()).get("service_url")
                if url:
                    return str(url)
            time.sleep(0.2)
        return None


class _Client:
    """A keep-alive HTTP/1.1 GET client on a raw socket, the way load generators (wrk, hey) are
    built: a prepared request and a Content-Length read, so the generator's own CPU, which
    shares this machine's two cores with training, stays a small part of what is measured
    (httpx spends about as much per request as the service does). Reconnects after any error;
    an error or a timeout counts as status 0."""

    def __init__(self, url: str, token: str, timeout: float = 10.0):
        parts = urllib.parse.urlsplit(url)
        self.addr = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.token, self.timeout = token, timeout
        self.sock: socket.socket | None = None
        self.buf = b""

    def get(self, path: str) -> int:
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {self.addr[0]}\r\n"
            f"Authorization: Bearer {self.token}\r\n\r\n"
        ).encode()
        try:
            if self.sock is None:
                self.sock = socket.create_connection(self.addr, timeout=self.timeout)
                self.buf = b""
            self.sock.sendall(request)
            head = self._read_until(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            fields = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
            self._read_exactly(int(fields.get("content-length", "0")))
            if fields.get("connection") == "close":
                self.close()
            return status
        except (OSError, ValueError, IndexError):
            self.close()
            return 0

    def _read_until(self, marker: bytes) -> bytes:
        assert self.sock is not None
        while marker not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        head, self.buf = self.buf.split(marker, 1)
        return head

    def _read_exactly(self, n: int) -> None:
        assert self.sock is not None
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        self.buf = self.buf[n:]

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


CASES = (
    ("load generator at idle priority (as from another machine)", True),
    ("load generator at normal priority (its CPU shared with training)", False),
)


def _case(label: str, times: dict[int, float], load: _Load) -> dict[str, Any]:
    idle = [t for r, t in times.items() if r > 1 and r % 2]
    loaded = [t for r, t in times.items() if r % 2 == 0]
    lat = sorted(load.latency_s) or [math.nan]
    return {
        "case": label,
        "idle rounds s (median)": median(idle),
        "loaded rounds s (median)": median(loaded),
        "ratio": median(loaded) / median(idle),
        "rounds idle / loaded": f"{len(idle)} / {len(loaded)}",
        "requests/s achieved": load.requests / load.loaded_s if load.loaded_s else 0.0,
        "answers by status": ", ".join(f"{k}: {v}" for k, v in sorted(load.statuses.items())),
        "latency ms p50": 1000 * lat[len(lat) // 2],
        "latency ms p99": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "client CPU ms/request": 1000 * load.client_cpu_s / max(load.requests, 1),
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args("api_load", __doc__, argv)
    rounds, images = (3, 16) if args.quick else (15, 64)  # 4 prompts x images
    rows = []
    for label, idle_client in CASES[:1] if args.quick else CASES:
        with tempfile.TemporaryDirectory() as tmp:
            out = _train(Path(tmp), rounds, images, 100.0, idle_client)
        rows.append(_case(label, out["rounds"], out["load"]))
    summary = {
        "round time ratio, loaded / idle": rows[0]["ratio"],
        "target": "< 1.10",
        **({"ratio, generator at normal priority": rows[1]["ratio"]} if len(rows) > 1 else {}),
    }
    write(
        "api_load",
        args,
        rows,
        summary,
        notes=f"configs/shapes.yaml, one run per case of {rounds} rounds of 4 prompts x {images} "
        "images, no evaluation; even rounds under the load (100 requests/s from "
        f"{CLIENTS} keep-alive connections), odd rounds idle (round 1 excluded); the load "
        "cycles over the run's detail, its metrics history and /metrics.",
    )


if __name__ == "__main__":
    main()
