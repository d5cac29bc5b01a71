"""The round loop: generate -> score -> advantages -> train -> publish -> log, each timed.

Synchronous by default. With ``train.async_rollout`` the next round's rollouts are launched
before this round's update, so they use weights one version behind; the learner evaluates
those samples' old-policy ELBO with the version that generated them (``learner/lag_mean``).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
from tqdm.auto import tqdm

from services.viz import plot_curves, save_sample_grid

if TYPE_CHECKING:
    from services.driver import PendingRound, Trainer

log = logging.getLogger("elborl.driver")


def _due(every: int, round_: int, last: int) -> bool:
    return round_ == last or (every > 0 and round_ % every == 0)


def run_rounds(tr: Trainer) -> None:
    """Run rounds ``tr.round + 1 .. train.rounds``; evaluate and checkpoint on schedule."""
    cfg, total = tr.cfg, tr.cfg.train.rounds
    bar = tqdm(total=total, initial=tr.round, desc="train", unit="round", dynamic_ncols=True)
    pending = tr.launch(tr.round + 1) if tr.round < total else None
    while pending is not None:
        metrics, nxt, first = _one_round(tr, pending, total)
        r = pending.round
        if _due(cfg.train.eval_every, r, total):
            metrics.update(evaluate(tr, r))
        if _due(cfg.train.sample_grid_every, r, total):
            _sample_grid(tr, pending, first, r)
        tr.round = r
        tr.run_dir.log_metrics(r, metrics)
        _log_round(r, total, metrics)
        _write_status(tr, metrics, "running" if r < total else "finished")
        if _due(cfg.train.checkpoint_every, r, total):
            checkpoint(tr, r)
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}")
        pending = nxt
    bar.close()
    plot_curves(tr.run_dir.history(), tr.run_dir.path / "curves.png")


def _one_round(tr: Trainer, pending: PendingRound, total: int) -> tuple[dict[str, Any], Any, Any]:
    r, t0 = pending.round, time.monotonic()
    scored, _ = tr.score(pending)
    t_scored = time.monotonic()
    nxt = tr.launch(r + 1) if tr.cfg.train.async_rollout and r < total else None
    learn_metrics, _ = tr.learn(pending, scored)
    t_learned = time.monotonic()
    weights = tr.publish()
    if nxt is None and r < total:
        nxt = tr.launch(r + 1)
    t_end = time.monotonic()
    rollout_busy = max(s.rollout_seconds for s in scored)
    reward_busy = max(s.seconds for s in scored)
    waited = t_scored - max(t0, pending.started)
    metrics = {
        **_reward_metrics(scored),
        **learn_metrics,
        **weights,
        "rollout/images": float(sum(len(s.sample_ids) for s in scored)),
        "rollout/images_per_s": sum(len(s.sample_ids) for s in scored) / max(rollout_busy, 1e-9),
        "rollout/version": float(scored[0].version),
        "rollout/lag": float(tr.version - 1 - scored[0].version),
        "timing/rollout": rollout_busy,
        "timing/reward": reward_busy,
        "timing/wait_rollout_and_reward": waited,
        "timing/async_saved": max(0.0, rollout_busy + reward_busy - waited)
        if tr.cfg.train.async_rollout
        else 0.0,
        "timing/learner": t_learned - t_scored,
        "timing/publish": t_end - t_learned,
        "timing/round": t_end - t0,
        "perf/samples_scored_total": float(tr.stats["scored"]),
        "perf/samples_trained_total": float(tr.stats["trained"]),
    }
    return metrics, nxt, scored[0]


def _reward_metrics(scored: list[Any]) -> dict[str, float]:
    total = np.concatenate([s.total for s in scored])
    out = {"reward/mean": float(total.mean()), "reward/std": float(total.std())}
    for name in scored[0].per_reward:
        out[f"reward/{name}"] = float(np.concatenate([s.per_reward[name] for s in scored]).mean())
    if scored[0].passed is not None:
        out["reward/accuracy"] = float(np.concatenate([s.passed for s in scored]).mean())
    return out


def evaluate(tr: Trainer, round_: int) -> dict[str, float]:
    """Held-out accuracy of the *current* (trained) weights, on rollout worker 0."""
    start = time.monotonic()
    state_ref = tr.learners[0].current_state.remote()
    summary, images, prompts, scores = ray.get(
        tr.rollouts[0].evaluate.remote(state_ref, tr.eval_prompts, tr.cfg.eval, tr.cfg.seed + 1),
        timeout=tr.timeout,
    )
    k = min(32, len(prompts))
    save_sample_grid(
        tr.run_dir.path / "samples" / f"eval_round_{round_:05d}.png",
        images[:k],
        prompts[:k],
        scores[:k],
    )
    out = {
        "eval/accuracy": summary["accuracy"],
        "eval/mean_reward": summary["mean_reward"],
        "timing/eval": time.monotonic() - start,
    }
    out.update({f"eval/clause_{k}": v for k, v in summary["clause_accuracy"].items()})
    return out


def _sample_grid(tr: Trainer, pending: PendingRound, first: Any, round_: int) -> None:
    """The first 16 images of the round's first chunk, with prompts and rewards."""
    chunk = ray.get(pending.chunks[0].images, timeout=tr.timeout)
    totals = first.total
    k = min(16, len(chunk.prompts))
    save_sample_grid(
        tr.run_dir.path / "samples" / f"round_{round_:05d}.png",
        chunk.images[:k],
        chunk.prompts[:k],
        list(totals[:k]),
    )


def checkpoint(tr: Trainer, round_: int) -> None:
    """Learner state (every rank) + driver state, committed atomically."""
    start = time.monotonic()
    tmp = tr.run_dir.new_checkpoint(round_)
    ray.get([lw.save.remote(str(tmp / "learner")) for lw in tr.learners], timeout=tr.timeout)
    final = tr.run_dir.commit_checkpoint(
        tmp,
        round_,
        {
            "round": round_,
            "version": tr.version,
            "dealer": tr.dealer.state(),
            "stats": tr.stats,
        },
    )
    log.info("checkpoint %s (%.1f s)", final, time.monotonic() - start)


def _log_round(r: int, total: int, m: dict[str, Any]) -> None:
    acc = f", held-out acc {m['eval/accuracy']:.3f}" if "eval/accuracy" in m else ""
    log.info(
        "round %d/%d: reward %.3f +- %.3f%s, %.1f img/s, rollout %.1fs reward %.2fs "
        "learner %.1fs publish %.2fs",
        r,
        total,
        m["reward/mean"],
        m["reward/std"],
        acc,
        m["rollout/images_per_s"],
        m["timing/rollout"],
        m["timing/reward"],
        m["timing/learner"],
        m["timing/publish"],
    )


def _write_status(tr: Trainer, m: dict[str, Any], state: str) -> None:
    tr.run_dir.write_status(
        {
            "state": state,
            "round": tr.round,
            "total_rounds": tr.cfg.train.rounds,
            "version": tr.version,
            "reward_mean": m.get("reward/mean"),
            "accuracy": m.get("eval/accuracy"),
            "nodes": tr.nodes,
            "updated": time.time(),
        }
    )
