"""The DeepSpeed learner step vs a plain torch step doing the same math, in one process.

Both start from the shipped base model and train on the same batch (64 samples, microbatches
of 16, K = 2 ELBO timesteps, pepg + KL to the reference, AdamW, gradient clipping, then the
old-policy EMA). The plain step calls the same pure functions (``algo.microbatch``) with
``torch.optim.AdamW`` and ``clip_grad_norm_``; the DeepSpeed one is ``LearnerEngine.train_step``
(world size 1, ZeRO stage 0), which also computes one diagnostic (``learner/improvement``,
one extra forward pair on a microbatch) timed separately here. A check that the math is the
same: the weights after the first step of each agree (max abs difference reported).
Target: learner step <= 1.15x plain torch.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import socket
from collections.abc import Sequence

import numpy as np
import torch

from algo.losses import GlobalNormalizer
from algo.microbatch import make_noise_draw, microbatch_loss
from algo.old_policy import ema_update_, get_schedule
from bench.common import BASE, median, parse_args, timed, write
from learner.engine import LearnerEngine, TrainBatch
from learner.estimators import ElboEstimator
from policy.io import load_policy
from services.config import LearnerConfig, SamplingConfig


class PlainStep:
    """The learner's update without DeepSpeed: same losses, AdamW, clip, EMA."""

    def __init__(self, cfg: LearnerConfig, sampling: SamplingConfig, engine: LearnerEngine):
        self.cfg, self.engine_ref = cfg, engine
        self.policy = load_policy(BASE)
        self.ref = copy.deepcopy(self.policy).requires_grad_(False).eval()
        self.old = copy.deepcopy(self.policy).requires_grad_(False).eval()
        self.opt = torch.optim.AdamW(
            self.policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.schedule, self.steps = get_schedule(cfg.old_policy_schedule), 0

    def step(self, b: TrainBatch) -> None:
        n, k, mb = b.x0.shape[0], self.cfg.num_timesteps, self.cfg.microbatch_size
        norm = GlobalNormalizer(num_samples=n, num_timesteps=k)
        for lo in range(0, n, mb):
            idx = slice(lo, lo + mb)
            x0, adv = b.x0[idx], b.advantages[idx]
            cond = self.policy.encode_prompts(b.prompts[idx])
            # The same per-sample draws (keyed by seed and sample id) as the engine's.
            t, noise = ElboEstimator.draws(
                self.engine_ref, b.sample_ids[idx], b.seed, tuple(x0.shape[1:])
            )
            for j in range(k):
                draw = make_noise_draw(x0, t[:, j], self.engine_ref.loss_cfg, noise=noise[:, j])
                loss, _ = microbatch_loss(
                    self.policy,
                    self.old,
                    self.ref,
                    x0,
                    cond,
                    adv,
                    draw,
                    self.engine_ref.loss_cfg,
                    norm,
                )
                loss.backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.steps += 1
        with torch.no_grad():
            ema_update_(self.old.state_dict(), self.policy.state_dict(), self.schedule(self.steps))


def _current(batch: TrainBatch, engine: LearnerEngine) -> TrainBatch:
    """The batch as if sampled by the learner's current sampling version (no lag)."""
    return dataclasses.replace(batch, versions=np.full(len(batch.versions), engine.version))


def _batch(n: int, seed: int) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    prompts = ["two red circles", "a blue square left of a red circle"] * (n // 2)
    ids = np.arange(n)
    return TrainBatch(
        sample_ids=ids,
        group_ids=ids // 4,
        x0=torch.rand((n, 3, 32, 32), generator=g) * 2 - 1,
        prompts=prompts,
        advantages=torch.linspace(-1, 1, n),
        versions=np.zeros(n, dtype=np.int64),
        seed=seed,
    )


def _init_dist() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args("learner", __doc__, argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    n, repeat = (16, 1) if args.quick else (64, 7)
    cfg = LearnerConfig(microbatch_size=16, num_timesteps=2, lr=1e-4, kl_beta=0.01, loss="pepg")
    sampling = SamplingConfig(sampler="dpm2", num_steps=10)
    _init_dist()
    torch.manual_seed(0)
    engine = LearnerEngine(load_policy(BASE), cfg, sampling, seed=0)
    plain = PlainStep(cfg, sampling, engine)
    batch = _batch(n, 1)
    engine.train_step(_current(batch, engine))
    plain.step(batch)
    diff = max(
        float((a - b).abs().max())
        for a, b in zip(
            engine.policy.state_dict().values(), plain.policy.state_dict().values(), strict=True
        )
    )
    ds = timed(lambda: engine.train_step(_current(batch, engine)), repeat)
    pt = timed(lambda: plain.step(batch), repeat)
    first = np.arange(min(n, cfg.microbatch_size))
    diag = timed(
        lambda: engine.estimator.improvement(engine, _current(batch, engine), first), repeat
    )
    rows = [
        {"step": "DeepSpeed LearnerEngine.train_step", "median_s": median(ds), "min_s": min(ds)},
        {
            "step": "  of which the improvement diagnostic",
            "median_s": median(diag),
            "min_s": min(diag),
        },
        {"step": "plain torch (same math)", "median_s": median(pt), "min_s": min(pt)},
    ]
    write(
        "learner",
        args,
        rows,
        {
            "ratio_deepspeed_over_plain": median(ds) / median(pt),
            "ratio_without_diagnostic": (median(ds) - median(diag)) / median(pt),
            "max_abs_weight_difference_after_step_1": diff,
            "samples_per_step": n,
            "target": "<= 1.15",
        },
        notes=f"{n} samples per step, microbatch 16, K = 2; {repeat} timed steps after a warm-up.",
    )


if __name__ == "__main__":
    main()
