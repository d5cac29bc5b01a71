"""Load on the status service against training: the main job's round time with the service on
and idle, and with a 100 requests/s burst on it for the whole run (the API, its metrics history
and Prometheus' ``/metrics``, as a dashboard and scrapers would ask). The service runs in its
own process at the lowest priority and answers from cached reads, so the burst should cost
the rounds under 10 %. The load generator is a keep-alive raw-socket client in this process
(it shares the two cores with training, as a real dashboard on another machine would not);
its own CPU per request, the achieved rate and the latencies are reported beside the rounds.

Each run is ``elborl train --config configs/shapes.yaml`` made smaller (rounds, images, no
evaluation) with ``service.enabled``; the figure is the median ``timing/round`` over rounds 2
onwards (round 1 carries start-up).
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


def _train(runs: Path, name: str, rounds: int, images: int, load_rps: float) -> dict[str, Any]:
    sets = {
        "name": name,
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
    sent: dict[str, Any] = {"requests": 0, "errors": 0, "latency_s": [], "load_s": 0.0,
                            "client_cpu_s": 0.0}  # fmt: skip
    load = threading.Thread(target=_load, args=(runs / name, proc, load_rps, sent), daemon=True)
    if load_rps > 0:
        load.start()
    _, err = proc.communicate(timeout=3600)
    if load_rps > 0:
        load.join(30)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{err.decode()[-3000:]}")
    lines = (runs / name / "metrics.jsonl").read_text().splitlines()
    rounds_s = [json.loads(x)["timing/round"] for x in lines if x.strip()][1:]
    lat = sorted(sent["latency_s"]) or [math.nan]
    n = max(sent["requests"], 1)
    return {
        "round_s": median(rounds_s),
        "rounds": len(rounds_s),
        "requests": sent["requests"],
        "errors (not 200)": sent["errors"],
        "requests/s achieved": sent["requests"] / sent["load_s"] if sent["load_s"] else 0.0,
        "latency ms p50": 1000 * lat[len(lat) // 2],
        "latency ms p99": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "client CPU ms/request": 1000 * sent["client_cpu_s"] / n,
    }


def _load(run: Path, proc: subprocess.Popen[bytes], rps: float, sent: dict[str, Any]) -> None:
    """Requests at ``rps`` per second from the moment the service is up until the run ends."""
    url = None
    while proc.poll() is None and url is None:
        with contextlib.suppress(OSError, ValueError):
            url = json.loads((run / "status.json").read_text()).get("service_url")
        time.sleep(0.2)
    if url is None:
        return
    paths = [f"/api/v1/runs/{run.name}", f"/api/v1/runs/{run.name}/metrics", "/metrics"]
    client = _Client(url, TOKEN)
    start, i, cpu0 = time.monotonic(), 0, time.thread_time()
    while proc.poll() is None:
        due = start + i / rps
        time.sleep(max(0.0, due - time.monotonic()))
        t0 = time.monotonic()
        status = client.get(paths[i % len(paths)])
        sent["latency_s"].append(time.monotonic() - t0)
        sent["requests"] += 1
        sent["errors"] += status != 200
        i += 1
    sent["load_s"] = time.monotonic() - start
    sent["client_cpu_s"] = time.thread_time() - cpu0
    client.close()


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


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args("api_load", __doc__, argv)
    rounds, images = (3, 16) if args.quick else (8, 64)  # 4 prompts x images: 64k
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, name, rps in (
            ("service idle", "idle", 0.0),
            ("100 requests/s", "loaded", 100.0),
        ):
            r = _train(Path(tmp), name, rounds, images, rps)
            rows.append({"load": label, "round s (median)": r["round_s"], **r})
    ratio = rows[1]["round_s"] / rows[0]["round_s"]
    write(
        "api_load",
        args,
        rows,
        {"round time ratio, loaded / idle": ratio, "target": "< 1.10"},
        notes=f"configs/shapes.yaml with {rounds} rounds of 4 prompts x {images} images, no "
        "evaluation; the load cycles over the run's detail, its metrics history and /metrics.",
    )


if __name__ == "__main__":
    main()
