"""Supervised flow-matching pretraining of the base policy on its world's images.

Component layer (no Ray). Each step takes a fresh batch of (caption, image) pairs from the
world (``World.pretraining_batch``: for ``shapes``, correct renders of training prompts),
draws ``t ~ U(0, 1)`` and ``eps ~ N(0, I)``, and regresses the velocity on its target:
``L = mean((v_theta(x_t, t, c) - (eps - x0))^2)`` with ``x_t = (1 - t) x0 + t eps``
(rectified flow; DESIGN.md section 1). A fraction of prompts is replaced by the empty prompt
so that classifier-free guidance is available. The saved weights are an exponential moving
average of the trained ones.

Long runs are resumable: every ``snapshot_every`` steps the model, its EMA, the optimizer and
every random state go to a snapshot directory; a rerun with the same settings continues from
the last snapshot and ends bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from policy.base import Policy
from policy.config import PretrainConfig
from worlds.base import World

log = logging.getLogger(__name__)


@dataclass
class PretrainState:
    """Where pretraining stands (returned at the end, also handed to progress callbacks)."""

    step: int = 0
    seconds: float = 0.0
    loss_ema: float = float("nan")
    evals: list[dict[str, Any]] = field(default_factory=list)


def flow_matching_loss(policy: Policy, x0: Tensor, cond: Tensor, g: torch.Generator) -> Tensor:
    """Mean squared velocity error over batch and all sample dimensions."""
    t = torch.rand(x0.shape[0], generator=g)  # (B,)
    eps = torch.randn(x0.shape, generator=g)  # (B, C, H, W)
    tb = t.view(-1, *([1] * (x0.ndim - 1)))
    x_t = (1 - tb) * x0 + tb * eps
    return (policy(x_t, t, cond) - (eps - x0)).pow(2).mean()


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` for every parameter."""
    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(pm, 1 - decay)


EvalFn = Callable[[Policy], dict[str, Any]]
"""Held-out evaluation of a policy: its summary (``accuracy``, ``mean_reward``, ...)."""


@dataclass
class Snapshots:
    """Where resume snapshots go, and what they must match to be resumed."""

    path: Path
    fingerprint: str
    """The settings a snapshot was made with (a rerun with other settings refuses it)."""


@dataclass
class _Run:
    """Everything a training step changes: what a snapshot holds."""

    policy: Policy
    ema: Policy
    opt: torch.optim.Optimizer
    rng: np.random.Generator
    g: torch.Generator
    state: PretrainState


def pretrain(
    policy: Policy,
    world: World,
    prompts: list[str],
    cfg: PretrainConfig,
    seed: int,
    evaluate: EvalFn | None = None,
    on_eval: Callable[[PretrainState], None] | None = None,
    snapshots: Snapshots | None = None,
) -> tuple[Policy, PretrainState]:
    """Train ``policy`` in place; return its EMA copy (the model to save) and the final state.

    ``evaluate`` (e.g. ``rollout.evaluate`` on the held-out prompts) runs on the EMA copy every
    ``cfg.eval_every`` steps and when the time budget ends. With ``snapshots``, training
    resumes from the snapshot there if one exists and writes a new one every
    ``cfg.snapshot_every`` steps; the caller removes it (``drop_snapshot``) once the result is
    saved.
    """
    torch.manual_seed(seed)
    run = _Run(
        policy=policy,
        ema=copy.deepcopy(policy).requires_grad_(False).eval(),
        opt=torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay),
        rng=np.random.default_rng(seed),
        g=torch.Generator().manual_seed(seed),
        state=PretrainState(),
    )
    if snapshots is not None:
        _resume(run, snapshots)
    state, start = run.state, time.monotonic() - run.state.seconds
    bar = tqdm(
        total=cfg.steps, initial=state.step, desc="pretrain", unit="step", dynamic_ncols=True
    )
    policy.train()
    while state.step < cfg.steps:
        loss = _train_step(policy, world, run.opt, prompts, cfg, run.rng, run.g, state.step)
        ema_update(run.ema, policy, min(cfg.ema_decay, (1 + state.step) / (10 + state.step)))
        state.step += 1
        state.seconds = time.monotonic() - start
        state.loss_ema = loss if state.step == 1 else 0.98 * state.loss_ema + 0.02 * loss
        bar.update(1)
        bar.set_postfix(loss=f"{state.loss_ema:.4f}")
        out_of_time = cfg.max_minutes is not None and state.seconds > 60 * cfg.max_minutes
        due = (cfg.eval_every and state.step % cfg.eval_every == 0) or out_of_time
        if due and evaluate is not None:
            _quick_eval(run.ema, evaluate, state, on_eval)
        if snapshots is not None and cfg.snapshot_every and state.step % cfg.snapshot_every == 0:
            _save_snapshot(run, snapshots)
        if out_of_time:
            log.info(
                "pretrain: time budget of %.1f min reached at step %d of %d",
                cfg.max_minutes,
                state.step,
                cfg.steps,
            )
            if snapshots is not None and state.step % max(cfg.snapshot_every, 1):
                _save_snapshot(run, snapshots)  # so that a longer budget continues from here
            break
    bar.close()
    return run.ema, state


_SNAPSHOT_FILE = "snapshot.pt"


def _save_snapshot(run: _Run, snapshots: Snapshots) -> None:
    """Write the run's whole state atomically (a crash mid-write leaves the previous one)."""
    snapshots.path.mkdir(parents=True, exist_ok=True)
    blob = {
        "fingerprint": snapshots.fingerprint,
        "policy": run.policy.state_dict(),
        "ema": run.ema.state_dict(),
        "opt": run.opt.state_dict(),
        "rng": run.rng.bit_generator.state,
        "g": run.g.get_state(),
        "torch_rng": torch.get_rng_state(),
        "state": asdict(run.state),
    }
    tmp = snapshots.path / (_SNAPSHOT_FILE + ".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, snapshots.path / _SNAPSHOT_FILE)


def _resume(run: _Run, snapshots: Snapshots) -> None:
    """Load the snapshot in ``snapshots.path`` into ``run``, if there is one."""
    file = snapshots.path / _SNAPSHOT_FILE
    if not file.exists():
        return
    blob = torch.load(file, weights_only=False)
    if blob["fingerprint"] != snapshots.fingerprint:
        raise ValueError(
            f"{snapshots.path} holds a pretraining snapshot made with other settings; rerun "
            "with the settings it was made with to continue it, or pass --fresh (or delete "
            "the directory) to start over"
        )
    run.policy.load_state_dict(blob["policy"])
    run.ema.load_state_dict(blob["ema"])
    run.opt.load_state_dict(blob["opt"])
    run.rng.bit_generator.state = blob["rng"]
    run.g.set_state(blob["g"])
    torch.set_rng_state(blob["torch_rng"])
    run.state = PretrainState(**blob["state"])
    log.info(
        "pretrain: resuming from %s at step %d (%.1f min done)",
        file,
        run.state.step,
        run.state.seconds / 60,
    )


def drop_snapshot(snapshots: Snapshots) -> None:
    """Remove the snapshot directory (after the finished checkpoint is saved)."""
    shutil.rmtree(snapshots.path, ignore_errors=True)


def _train_step(
    policy: Policy,
    world: World,
    opt: torch.optim.Optimizer,
    prompts: list[str],
    cfg: PretrainConfig,
    rng: np.random.Generator,
    g: torch.Generator,
    step: int,
) -> float:
    captions, images = world.pretraining_batch(prompts, cfg.batch_size, rng)
    x0 = policy.from_images(images)
    texts = ["" if rng.random() < cfg.prompt_dropout else c for c in captions]
    for group in opt.param_groups:
        group["lr"] = learning_rate(cfg, step)
    loss = flow_matching_loss(policy, x0, policy.encode_prompts(texts), g)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    opt.step()
    return float(loss.detach())


def learning_rate(cfg: PretrainConfig, step: int) -> float:
    """The learning rate of (0-based) ``step``: linear warm-up, then constant or half-cosine."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr_ratio
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))


def _quick_eval(
    ema: Policy,
    evaluate: EvalFn,
    state: PretrainState,
    on_eval: Callable[[PretrainState], None] | None,
) -> None:
    summary = evaluate(ema)
    state.evals.append({"step": state.step, "seconds": round(state.seconds, 1), **summary})
    log.info(
        "pretrain step %d (%.0f s): loss %.4f, held-out accuracy %.3f, mean reward %.3f",
        state.step,
        state.seconds,
        state.loss_ema,
        summary["accuracy"],
        summary["mean_reward"],
    )
    if on_eval is not None:
        on_eval(state)
