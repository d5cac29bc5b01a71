"""Weight broadcast through the Ray object store vs a plain memcpy of the same bytes.

The learner publishes a weight dict with one ``ray.put`` and every rollout actor copies it into
its model (``policy.state.load_numpy_state`` does the same per-tensor copy). Measured here:
the wall-clock from the ``ray.put`` until 1, 2 or 4 actors have all copied the weights into
preallocated tensors. The baseline is one ``np.copyto`` of the same bytes in this process.

Payloads:

- the tiny policy's LoRA adapter (r = 8) and its full weights, as shipped;
- a LoRA-sized payload (64 MB, about an SD3.5-M LoRA at r = 64 in fp32);
- a full-model-sized payload (512 MB; a 2.5B-parameter model in bf16 is 5 GB, which this
  24 GB machine cannot hold once per actor).

Bandwidth = bytes x actors / seconds. Targets: >= 50% of memcpy bandwidth and flat in the
number of actors.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
import torch

from bench.common import BASE, median, parse_args, write


@ray.remote(num_cpus=0.25)
class Sink:
    """Holds preallocated tensors shaped like the payload, as a rollout worker's model does."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        torch.set_num_threads(1)
        self.params = {k: torch.empty(s) for k, s in shapes.items()}

    def load(self, state: dict[str, np.ndarray]) -> int:
        with torch.no_grad():
            for k, v in state.items():
                self.params[k].copy_(torch.from_numpy(v))
        return sum(v.nbytes for v in state.values())


def tiny_payloads(with_lora: bool = True) -> dict[str, dict[str, np.ndarray]]:
    from policy.io import load_policy
    from policy.lora import add_lora, trainable_keys
    from policy.state import to_numpy_state
    from services.config import LoraConfig

    base = str(BASE)
    full = load_policy(base)
    out = {}
    if with_lora:
        lora = add_lora(load_policy(base), LoraConfig(rank=8))
        out["tiny LoRA r=8"] = to_numpy_state(lora, trainable_keys(lora))
    out["tiny full"] = to_numpy_state(full, trainable_keys(full))
    return out


def synthetic(megabytes: int) -> dict[str, np.ndarray]:
    """``megabytes`` of fp32 in 64 tensors (a model's weights are many tensors)."""
    per = megabytes * 2**20 // 4 // 64
    rng = np.random.default_rng(0)
    return {f"w{i}": rng.standard_normal(per, dtype=np.float32) for i in range(64)}


def _memcpy(state: dict[str, np.ndarray], repeat: int) -> float:
    dst = {k: np.empty_like(v) for k, v in state.items()}

    def once() -> float:
        start = time.perf_counter()
        for k, v in state.items():
            np.copyto(dst[k], v)
        return time.perf_counter() - start

    once()
    return median([once() for _ in range(repeat)])


def _broadcast(state: dict[str, np.ndarray], actors: int, repeat: int) -> float:
    shapes = {k: v.shape for k, v in state.items()}
    sinks = [Sink.remote(shapes) for _ in range(actors)]  # type: ignore[attr-defined]

    def once() -> float:
        start = time.perf_counter()
        ref = ray.put(state)
        ray.get([s.load.remote(ref) for s in sinks])
        seconds = time.perf_counter() - start
        del ref
        return seconds

    once()
    out = median([once() for _ in range(repeat)])
    for s in sinks:
        ray.kill(s)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args("broadcast", __doc__, argv)
    payloads: dict[str, Any] = tiny_payloads(with_lora=not args.quick)
    counts: tuple[int, ...] = (1, 2)
    repeat = 2
    if not args.quick:
        payloads.update({"LoRA-sized 64 MB": synthetic(64), "full-sized 512 MB": synthetic(512)})
        counts, repeat = (1, 2, 4), 5
    store = 3 * 2**30 if not args.quick else 256 * 2**20
    ray.init(
        address="local",
        num_cpus=os.cpu_count(),
        object_store_memory=store,
        include_dashboard=False,
        log_to_driver=False,
    )
    rows, ratios = [], {}
    try:
        for name, state in payloads.items():
            nbytes = sum(v.nbytes for v in state.values())
            copy_s = _memcpy(state, repeat)
            for n in counts:
                seconds = _broadcast(state, n, repeat)
                ratio = (nbytes * n / seconds) / (nbytes / copy_s)
                ratios[f"{name}, {n} actors"] = ratio
                rows.append(
                    {
                        "payload": name,
                        "MB": nbytes / 1e6,
                        "actors": n,
                        "broadcast_ms": seconds * 1e3,
                        "per_actor_ms": seconds * 1e3 / n,
                        "broadcast_GBps": nbytes * n / seconds / 1e9,
                        "memcpy_GBps": nbytes / copy_s / 1e9,
                        "fraction_of_memcpy": ratio,
                    }
                )
    finally:
        ray.shutdown()
    biggest = list(payloads)[-1]
    summary = {
        f"fraction of memcpy, {biggest}, {n} actors": ratios[f"{biggest}, {n} actors"]
        for n in counts
    }
    summary["target"] = ">= 0.5 and flat in actors"
    write("broadcast", args, rows, summary, notes="Median of repeated broadcasts per row.")


if __name__ == "__main__":
    main()
