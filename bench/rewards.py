"""Reward pool scaling: the same batches scored by 1 and 2 reward actors (CPU-bound reward).

Chunks of rendered ``shapes`` images go into the object store once; each pool size scores all
of them through the real ``RewardWorker`` actors (round-robin, as the driver deals them), and
throughput is images per second of wall-clock. The reward is the ``shapes`` verifier plus
JPEG incompressibility, single-threaded numpy/PIL work: CPU-bound. Target: 2 actors >= 1.8x.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray

from bench.common import median, parse_args, write
from rollout.engine import RolloutImages
from services.actors import RewardWorker
from services.config import RewardSpec
from worlds.base import WorldConfig, make_world

SPECS = [RewardSpec(name="shapes"), RewardSpec(name="jpeg_incompressibility", weight=0.01)]


def _chunks(num: int, size: int) -> list[RolloutImages]:
    world = make_world(WorldConfig(name="shapes"))
    prompts = world.prompts("train")
    rng = np.random.default_rng(0)
    out = []
    for c in range(num):
        ps = [prompts[(c * size + i) % len(prompts)] for i in range(size)]
        ids = np.arange(c * size, (c + 1) * size)
        out.append(RolloutImages(ids, ids // 4, ps, world.render(ps, rng), 0, 0.0))
    return out


def _throughput(refs: list[ray.ObjectRef], actors: int, images: int, repeat: int) -> list[float]:
    remote: Any = ray.remote(RewardWorker).options(num_cpus=1)
    pool: list[Any] = [remote.remote(SPECS, 1) for _ in range(actors)]
    ray.get([a.pid.remote() for a in pool])
    ray.get([pool[i % actors].score.remote(r) for i, r in enumerate(refs[:actors])])  # warm up
    rates = []
    for _ in range(repeat):
        start = time.perf_counter()
        ray.get([pool[i % actors].score.remote(r) for i, r in enumerate(refs)])
        rates.append(images / (time.perf_counter() - start))
    for a in pool:
        ray.kill(a)
    return rates


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args("rewards", __doc__, argv)
    num, size, repeat = (4, 32, 1) if args.quick else (16, 256, 5)
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        refs = [ray.put(c) for c in _chunks(num, size)]
        rows, rates = [], {}
        for actors in (1, 2):
            r = _throughput(refs, actors, num * size, repeat)
            rates[actors] = median(r)
            rows.append(
                {
                    "actors": actors,
                    "images": num * size,
                    "images_per_s (median)": rates[actors],
                    "runs": len(r),
                    "min": min(r),
                    "max": max(r),
                }
            )
    finally:
        ray.shutdown()
    write(
        "rewards",
        args,
        rows,
        {"speedup_2_over_1": rates[2] / rates[1], "target": ">= 1.8"},
        notes=f"{num} chunks x {size} rendered images; reward = shapes verifier + JPEG size.",
    )


if __name__ == "__main__":
    main()
