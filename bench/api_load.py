"""Load on the status service against training: the main job's round time with the service on
and idle, and with a 100 requests/s burst on it for the whole run (the API, its metrics history
and Prometheus' ``/metrics``, as a dashboard and scrapers would ask). The service runs in its
own process at lower priority, so the burst should cost the rounds under 10 %.

Each run is ``elborl train --config configs/shapes.yaml`` made smaller (rounds, images, no
evaluation) with ``service.enabled``; the figure is the median ``timing/round`` over rounds 2
onwards (round 1 carries start-up).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

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
    sent: list[int] = [0, 0]  # requests, non-200 answers
    if load_rps > 0:
        threading.Thread(
            target=_load, args=(runs / name, proc, load_rps, sent), daemon=True
        ).start()
    _, err = proc.communicate(timeout=3600)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{err.decode()[-3000:]}")
    lines = (runs / name / "metrics.jsonl").read_text().splitlines()
    rounds_s = [json.loads(x)["timing/round"] for x in lines if x.strip()][1:]
    return {"round_s": median(rounds_s), "rounds": len(rounds_s), "requests": sent[0],
            "errors": sent[1]}  # fmt: skip


def _load(run: Path, proc: subprocess.Popen[bytes], rps: float, sent: list[int]) -> None:
    """Requests at ``rps`` per second from the moment the service is up until the run ends."""
    url = None
    while proc.poll() is None and url is None:
        with contextlib.suppress(OSError, ValueError):
            url = json.loads((run / "status.json").read_text()).get("service_url")
        time.sleep(0.2)
    if url is None:
        return
    paths = [f"/api/v1/runs/{run.name}", f"/api/v1/runs/{run.name}/metrics", "/metrics"]
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
        start, i = time.monotonic(), 0
        while proc.poll() is None:
            due = start + i / rps
            time.sleep(max(0.0, due - time.monotonic()))
            try:
                ok = client.get(paths[i % len(paths)]).status_code == 200
            except httpx.HTTPError:
                ok = False
            sent[0] += 1
            sent[1] += 0 if ok else 1
            i += 1


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
