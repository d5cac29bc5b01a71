"""Learner cost per sample: the ELBO estimator (K timesteps) vs the trajectory estimator
(every sampler step, Flow-GRPO), and the peak memory of each.

Each estimator runs in its own fresh process (so that peak RSS is its own): the shipped base
model, SDE rollouts of 10 steps (the trajectory estimator needs their log-probs; the ELBO
uses only the final samples), then timed ``LearnerEngine.train_step`` calls. Peak memory is
the process's peak RSS minus its RSS just before the first step.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Sequence

import numpy as np
import torch

from bench.common import median, parse_args, timed, write

STEPS = 10


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(estimator: str, k: int, n: int, repeat: int) -> dict[str, float]:
    """One estimator's timing and memory (run in a fresh process)."""
    from bench.common import BASE
    from bench.learner import _current, _init_dist
    from learner.engine import LearnerEngine, TrainBatch
    from policy.io import load_policy
    from rollout.generate import generate
    from services.config import LearnerConfig, SamplingConfig

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    _init_dist()
    sampling = SamplingConfig(sampler="sde", num_steps=STEPS, eta=0.7)
    prompts = ["two red circles", "a blue square left of a red circle"] * (n // 2)
    policy = load_policy(BASE)
    out = generate(policy, prompts, sampling, seed=0, batch_size=n, keep_trajectory=True)
    cfg = LearnerConfig(
        microbatch_size=16,
        num_timesteps=k,
        estimator="elbo" if estimator == "elbo" else "trajectory",
        loss="pepg" if estimator == "elbo" else "grpo",
        advantage="exact" if estimator == "elbo" else "standard",
        advantage_std="round",
        kl_beta=0.01,
        lr=1e-4,
    )
    engine = LearnerEngine(policy, cfg, sampling, seed=0)
    ids = np.arange(n)
    batch = TrainBatch(
        sample_ids=ids,
        group_ids=ids // 4,
        x0=out.x0,
        prompts=prompts,
        advantages=torch.linspace(-1, 1, n),
        versions=np.zeros(n, dtype=np.int64),
        seed=1,
        trajectory=out.trajectory,
        log_probs=out.log_probs,
    )
    before = _rss_mb()
    seconds = timed(lambda: engine.train_step(_current(batch, engine)), repeat)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": median(seconds), "peak_rss_mb": peak, "peak_over_start_mb": peak - before}


def main(argv: Sequence[str] | None = None) -> None:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--child":
        est, k, n, repeat = sys.argv[2], *map(int, sys.argv[3:6])
        print(json.dumps(child(est, k, n, repeat)))
        return
    args = parse_args("estimator", __doc__, argv)
    n, repeat = (16, 1) if args.quick else (64, 5)
    cases = [("elbo", 2), ("elbo", 4)] if not args.quick else [("elbo", 2)]
    cases.append(("trajectory", STEPS))
    rows, per_sample = [], {}
    for est, k in cases:
        cmd = [sys.executable, "-m", "bench.estimator", "--child", est, str(k), str(n), str(repeat)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise RuntimeError(f"{est} child failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        label = f"ELBO, K = {k}" if est == "elbo" else f"trajectory, {k} SDE steps"
        per_sample[label] = r["seconds"] / n
        rows.append(
            {
                "estimator": label,
                "model_passes_per_sample": k * (3 if est == "elbo" else 2),
                "step_s": r["seconds"],
                "ms_per_sample": r["seconds"] / n * 1e3,
                "peak_rss_MB": r["peak_rss_mb"],
                "peak_over_start_MB": r["peak_over_start_mb"],
            }
        )
    traj = per_sample[f"trajectory, {STEPS} SDE steps"]
    write(
        "estimator",
        args,
        rows,
        {f"trajectory / ({label})": traj / v for label, v in per_sample.items() if "ELBO" in label},
        notes=f"{n} samples per step, microbatch 16, KL beta 0.01 (a reference pass per pair).",
    )


if __name__ == "__main__":
    main()
