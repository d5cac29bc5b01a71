"""Rewards through the ``elborl-reward/1`` server against the same reward in-process, on
loopback: images per second for raw uint8 in msgpack, PNG in msgpack and PNG in JSON (base64),
at the world's 32 px and at 512 px (SD3.5's size).

A real uvicorn server on 127.0.0.1 in this process (a thread) serves the reward; the client is
the ``remote`` reward, one request of ``max_batch`` images at a time. The reward is cheap
(mean brightness) so the figures isolate what the protocol costs: encoding, transfer and
decoding. Figures are medians of repeated scorings of the same batches.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.common import median, parse_args, write
from rewards.remote import RemoteReward
from rewards.server.elborl_reward_server import Brightness, create_app

TOKEN = "bench-reward-token-0123456789abcdef"
WAYS = (("raw", "msgpack"), ("png", "msgpack"), ("png", "json"))


def _serve() -> tuple[Any, str]:
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = create_app([Brightness()], TOKEN, max_concurrency=1)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return server, f"http://127.0.0.1:{sock.getsockname()[1]}"


def _rate(score: Any, images: np.ndarray, prompts: list[str], repeat: int) -> list[float]:
    score(images[:2], prompts[:2])  # warm up
    rates = []
    for _ in range(repeat):
        start = time.perf_counter()
        score(images, prompts)
        rates.append(len(images) / (time.perf_counter() - start))
    return rates


def _in_process(reward: Brightness) -> Any:
    """The backend's own ``score`` as the client's signature: no server, no encoding."""

    def score(images: np.ndarray, prompts: list[str]) -> list[float]:
        return reward.score(images, prompts, None)

    return score


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args("reward_server", __doc__, argv)
    sizes, count, repeat = ((32, 64), 16, 2) if args.quick else ((32, 512), 64, 7)
    os.environ["BENCH_REWARD_TOKEN"] = TOKEN
    server, url = _serve()
    rows, summary = [], {}
    try:
        for size in sizes:
            images = np.random.default_rng(0).integers(0, 256, (count, size, size, 3), np.uint8)
            prompts = ["a prompt"] * count
            base = median(_rate(_in_process(Brightness()), images, prompts, repeat))
            rows.append(
                {"image side": size, "path": "in-process", "images/s": base, "x in-process": 1.0}
            )
            for encoding, fmt in WAYS:
                remote = RemoteReward(
                    url, token_env="BENCH_REWARD_TOKEN", encoding=encoding, format=fmt,
                    max_batch=count,
                )  # fmt: skip
                r = median(_rate(remote.score, images, prompts, repeat))
                rows.append({"image side": size, "path": f"server, {encoding} in {fmt}",
                             "images/s": r, "x in-process": r / base})  # fmt: skip
                summary[f"{size} px {encoding}/{fmt} images/s"] = r
    finally:
        server.should_exit = True
    write(
        "reward_server",
        args,
        rows,
        summary,
        notes=f"{count} random images per request (max_batch), {repeat} repeats, loopback; "
        "reward = mean brightness (cheap, so the protocol's cost shows).",
    )


if __name__ == "__main__":
    main()
