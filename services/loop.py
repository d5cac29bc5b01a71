"""The round loop: generate -> score -> advantages -> train -> publish -> log, each timed.

Synchronous by default. With ``train.async_rollout`` the next round's rollouts are launched
before this round's update, so they use weights one version behind; the learner evaluates
those samples' old-policy ELBO with the version that generated them (``learner/lag_mean``).

Once per round the loop looks for a stop request (``services/api/control.py``); when there is
one it launches no further rollouts, finishes the round in flight, checkpoints it and returns,
so ``--resume`` continues exactly where it stopped. ``status.json`` (read by the status
service) is rewritten after every round.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
from tqdm.auto import tqdm

from services.api.control import stop_requested
from services.collect import RunStopped
from services.viz import plot_curves, save_sample_grid

if TYPE_CHECKING:
    from services.driver import PendingRound, Trainer
    from services.run import RunDir

log = logging.getLogger("elborl.driver")


def _due(every: int, round_: int, last: int) -> bool:
    return round_ == last or (every > 0 and round_ % every == 0)


def run_rounds(tr: Trainer) -> bool:
    """Run rounds ``tr.round + 1 .. train.rounds``; evaluate and checkpoint on schedule.

    Returns True when a stop request or a signal ended the run early (after checkpointing its
    last round). A ``RunStopped`` fault checkpoints the last completed round, then propagates.
    """
    try:
        return _rounds(tr)
    except RunStopped:
        if tr.last_done is not None and tr.checkpointed < tr.last_done.round:
            checkpoint(tr, tr.last_done)
        raise


def _rounds(tr: Trainer) -> bool:
    cfg, total = tr.cfg, tr.cfg.train.rounds
    bar = tqdm(total=total, initial=tr.round, desc="train", unit="round", dynamic_ncols=True)
    if tr.round == 0 and cfg.train.eval_at_start:
        start = evaluate(tr, 0)
        tr.run_dir.log_metrics(0, start)
        log.info("round 0 (initial weights): held-out acc %.3f", start["eval/accuracy"])
    pace = _Pace(tr.run_dir.history())
    pending = tr.launch(tr.round + 1) if tr.round < total else None
    stop = False
    while pending is not None:
        r = pending.round
        # Checked before the round's update: a stopping run launches no further rollouts, so
        # the prompt dealer's state in the checkpoint is exactly that after round r.
        stop = r < total and (tr.interrupted is not None or stop_requested(tr.run_dir.path))
        if stop:
            why = f"{tr.interrupted} received" if tr.interrupted else "stop requested"
            log.info("%s: finishing round %d, then checkpointing", why, r)
            update_status(tr.run_dir, state="stopping")
        metrics, nxt, grid = _one_round(tr, pending, r if stop else total)
        if _due(cfg.train.eval_every, r, total):
            metrics.update(evaluate(tr, r))
        if _due(cfg.train.sample_grid_every, r, total) and grid is not None:
            _sample_grid(tr, grid, r)
        tr.round = r
        tr.run_dir.log_metrics(r, metrics)
        _log_round(r, total, metrics)
        pace.add(r, metrics)
        bad = _count_bad(tr, metrics)
        if _due(cfg.train.checkpoint_every, r, total) or stop or bad:
            checkpoint(tr, pending)
        if bad:
            raise RunStopped(bad)
        _write_status(tr, pace, "stopping" if stop else "running" if r < total else "finished")
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}")
        pending = nxt
    bar.close()
    plot_curves(tr.run_dir.history(), tr.run_dir.path / "curves.png")
    return stop


def _count_bad(tr: Trainer, m: dict[str, Any]) -> str | None:
    """The consecutive-bad-rounds rule of ``faults``; a message once the limit is reached."""
    f = tr.cfg.faults
    invalid = m["rollout/invalid_fraction"]
    if invalid > f.max_invalid_fraction or m.get("learner/skipped_step", 0.0) > 0:
        tr.bad_rounds += 1
    else:
        tr.bad_rounds = 0
    if tr.bad_rounds < f.max_bad_rounds:
        return None
    return (
        f"{tr.bad_rounds} bad rounds in a row (the last: {invalid:.0%} of samples invalid or "
        f"dropped, learner step skipped: {bool(m.get('learner/skipped_step', 0.0))}); "
        f"faults.max_bad_rounds = {f.max_bad_rounds}. The weights were not updated by those "
        "rounds. Check the reward (NaN/inf or out-of-range scores) or lower learner.lr, then "
        "--resume"
    )


def _one_round(tr: Trainer, pending: PendingRound, total: int) -> tuple[dict[str, Any], Any, Any]:
    r, t0 = pending.round, time.monotonic()
    scored = tr.score(pending)
    t_scored = time.monotonic()
    nxt = tr.launch(r + 1) if tr.cfg.train.async_rollout and r < total else None
    learn_metrics, keep = tr.learn(pending, scored)
    tr.last_done = pending
    t_learned = time.monotonic()
    weights = tr.publish()
    if nxt is None and r < total:
        nxt = tr.launch(r + 1)
    t_end = time.monotonic()
    tr.run_dir.log_ledger(r, _ledger(pending, scored, keep))
    done = [s for s in scored if s is not None]
    rollout_busy = max((s.rollout_seconds for s in done), default=0.0)
    reward_busy = max((s.seconds for s in done), default=0.0)
    waited = t_scored - max(t0, pending.started)
    images = float(sum(len(ch.sample_ids) for ch in pending.chunks))
    metrics = {
        **_reward_metrics(done),
        **learn_metrics,
        **weights,
        "rollout/images": images,
        "rollout/images_per_s": images / max(rollout_busy, 1e-9),
        "rollout/version": float(done[0].version) if done else float("nan"),
        "rollout/lag": float(tr.version - 1 - done[0].version) if done else float("nan"),
        "rollout/invalid": float(len(keep) - keep.sum()),
        "rollout/invalid_fraction": float(1.0 - keep.mean()),
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
        **{f"faults/{k}": float(v) for k, v in sorted(tr.faults.items())},
    }
    grid = next(((ch, s) for ch, s in zip(pending.chunks, scored, strict=True) if s), None)
    return metrics, nxt, grid


def _ledger(pending: PendingRound, scored: list[Any], keep: np.ndarray) -> dict[str, Any]:
    """Per sample of the round: id, group, reward (None if dropped), status, trained or not."""
    ids: list[int] = []
    groups: list[int] = []
    rewards: list[float | None] = []
    status: list[str] = []
    for ch, s in zip(pending.chunks, scored, strict=True):
        ids += ch.sample_ids.tolist()
        groups += ch.group_ids.tolist()
        if s is None:
            rewards += [None] * len(ch.sample_ids)
            status += ["dropped"] * len(ch.sample_ids)
        else:
            rewards += [float(x) for x in s.total]
            status += ["ok" if v else "invalid" for v in s.valid]
    return {
        "sample_ids": ids,
        "group_ids": groups,
        "reward": rewards,
        "status": status,
        "trained": keep.tolist(),
    }


def _reward_metrics(scored: list[Any]) -> dict[str, float]:
    """Reward means over the valid samples of the scored chunks (NaN when none)."""
    if not scored:
        return {"reward/mean": float("nan"), "reward/std": float("nan")}
    valid = np.concatenate([s.valid for s in scored])
    total = np.concatenate([s.total for s in scored])[valid]
    out = {
        "reward/mean": float(total.mean()) if total.size else float("nan"),
        "reward/std": float(total.std()) if total.size else float("nan"),
    }
    for name in scored[0].per_reward:
        vals = np.concatenate([s.per_reward[name] for s in scored])[valid]
        out[f"reward/{name}"] = float(vals.mean()) if vals.size else float("nan")
    if scored[0].passed is not None:
        out["reward/accuracy"] = float(np.concatenate([s.passed for s in scored])[valid].mean())
    return out


def evaluate(tr: Trainer, round_: int) -> dict[str, float]:
    """Held-out accuracy of the *current* (trained) weights, on rollout worker 0."""
    start = time.monotonic()
    state_ref = tr.learners[0].current_state.remote()
    args = (state_ref, tr.eval_prompts, tr.cfg.eval, tr.cfg.seed + 1)
    try:
        result = ray.get(tr.rollouts[0].evaluate.remote(*args), timeout=tr.timeout)
    except ray.exceptions.RayActorError:
        log.warning("rollout worker 0 died during the evaluation; replacing it and retrying")
        tr.replace_rollout(0)
        result = ray.get(tr.rollouts[0].evaluate.remote(*args), timeout=tr.timeout)
    summary, images, prompts, scores = result
    k = min(32, len(prompts))
    _save_grid(
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


def _sample_grid(tr: Trainer, grid: tuple[Any, Any], round_: int) -> None:
    """The first 16 images of the round's first scored chunk, with prompts and rewards."""
    ch, scored = grid
    chunk = ray.get(ch.images, timeout=tr.timeout)
    k = min(16, len(chunk.prompts))
    _save_grid(
        tr.run_dir.path / "samples" / f"round_{round_:05d}.png",
        chunk.images[:k],
        chunk.prompts[:k],
        list(scored.total[:k]),
    )


def _save_grid(path: Path, images: Any, prompts: list[str], scores: list[float]) -> None:
    """The grid PNG plus ``<name>.json`` with its prompts and rewards (for the status API)."""
    save_sample_grid(path, images, prompts, scores)
    captions = {"prompts": list(prompts), "rewards": [float(s) for s in scores]}
    path.with_suffix(".json").write_text(json.dumps(captions))


def checkpoint(tr: Trainer, pending: PendingRound) -> None:
    """Learner state (every rank) + driver state after ``pending``'s round, committed atomically.

    The prompt cursor saved is the one right after this round was dealt: the next round's
    prompts may already be dealt (and its rollouts running) when the checkpoint is written.
    """
    round_ = pending.round
    start = time.monotonic()
    tmp = tr.run_dir.new_checkpoint(round_)
    ray.get([lw.save.remote(str(tmp / "learner")) for lw in tr.learners], timeout=tr.timeout)
    final = tr.run_dir.commit_checkpoint(
        tmp,
        round_,
        {
            "round": round_,
            "version": tr.version,
            "dealer": pending.dealer_after,
            "stats": tr.stats,
        },
    )
    tr.checkpointed = round_
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


class _Pace:
    """Wall-clock pace over the last ``window`` rounds (evaluation and checkpoints included)."""

    def __init__(self, history: list[dict[str, Any]], window: int = 10):
        self.done: deque[tuple[float, float]] = deque(maxlen=window)  # (seconds, images)
        self.last_tick = time.time()
        self.metrics: dict[str, Any] = {}
        self.accuracy: tuple[int, float] | None = None
        for rec in history:
            if "eval/accuracy" in rec:
                self.accuracy = (int(rec["round"]), float(rec["eval/accuracy"]))

    def add(self, round_: int, metrics: dict[str, Any]) -> None:
        now = time.time()
        self.done.append((now - self.last_tick, float(metrics.get("rollout/images", 0.0))))
        self.last_tick, self.metrics = now, metrics
        if "eval/accuracy" in metrics:
            self.accuracy = (round_, float(metrics["eval/accuracy"]))

    def seconds_per_round(self) -> float | None:
        return sum(d for d, _ in self.done) / len(self.done) if self.done else None

    def images_per_s(self) -> float | None:
        seconds = sum(d for d, _ in self.done)
        return sum(n for _, n in self.done) / seconds if seconds > 0 else None


def update_status(run_dir: RunDir, **fields: Any) -> None:
    """Merge ``fields`` into ``status.json`` (the driver sets state and identity through this)."""
    path = run_dir.path / "status.json"
    try:
        status = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        status = {}
    run_dir.write_status({**status, **fields, "updated": time.time()})


def worker_health(tr: Trainer) -> dict[str, dict[str, Any]]:
    """Per role: workers, how many are alive, restarts, nodes; from Ray's actor table.

    The actor table lives in the GCS, so the query neither waits on busy actors nor needs
    Ray's dashboard (off in local mode). ``ray._private.state`` is the only way there without
    the dashboard; if it fails, ``alive`` is None (unknown) rather than a guess.
    """
    roles = {
        "rollout": getattr(tr, "rollouts", []),
        "reward": getattr(tr, "rewards", []),
        "learner": getattr(tr, "learners", []),
    }
    out: dict[str, dict[str, Any]] = {}
    for role, actors in roles.items():
        alive: int | None = 0
        restarts = 0
        try:
            from ray._private import state as ray_state

            for actor in actors:
                info = ray_state.actors(actor_id=actor._actor_id.hex())
                alive = (alive or 0) + (info.get("State") == "ALIVE")
                restarts += int(info.get("NumRestarts", 0))
        except Exception as exc:  # a private API: never let health reporting stop training
            log.debug("actor table query failed: %s", exc)
            alive = None
        nodes = tr.nodes.get(role, [])
        out[role] = {
            "num_workers": len(actors),
            "alive": alive,
            "restarts": restarts,
            "nodes": sorted(set(nodes)),
        }
    return out


def _write_status(tr: Trainer, pace: _Pace, state: str) -> None:
    m = pace.metrics
    spr = pace.seconds_per_round()
    remaining = tr.cfg.train.rounds - tr.round
    ckpt = tr.run_dir.latest_checkpoint()
    update_status(
        tr.run_dir,
        state=state,
        error=None,
        round=tr.round,
        total_rounds=tr.cfg.train.rounds,
        version=tr.version,
        reward_mean=m.get("reward/mean"),
        reward_std=m.get("reward/std"),
        accuracy=pace.accuracy[1] if pace.accuracy else None,
        accuracy_round=pace.accuracy[0] if pace.accuracy else None,
        images_per_s=pace.images_per_s(),
        rollout_images_per_s=m.get("rollout/images_per_s"),
        seconds_per_round=spr,
        eta_s=0.0 if state == "finished" else remaining * spr if spr is not None else None,
        last_checkpoint=ckpt.name if ckpt else None,
        workers=worker_health(tr),
        nodes=tr.nodes,
        samples_scored=tr.stats["scored"],
        samples_trained=tr.stats["trained"],
    )
