"""The controller: the round loop and the phases it calls, over the role groups.

One round reads, on one screen (``Controller.run``):

    generate -> score        ``Collector.collect``  (rollouts by ObjectRef to reward actors)
    advantages               ``rounds.plan_update`` (keep mask, per-group advantages, shards)
    train                    ``Controller.train``   (one step on every learner rank)
    publish                  ``Controller.publish`` (``ray.put`` once, every worker loads it)
    log                      ``Controller.finish_round`` (metrics, eval, grids, checkpoint)

each phase timed under ``timing/``. Synchronous by default; with ``train.async_rollout`` the
next round's rollouts are launched before this round's update, so they use weights one
version behind, and the learner evaluates their old-policy ELBO with the version that
generated them (``learner/lag_mean``).

Once per round the loop looks for a stop request (``services/api/control.py``) or a signal;
then it launches no further rollouts, finishes the round in flight, checkpoints it and
returns, so ``--resume`` continues exactly where it stopped. ``status.json`` is rewritten
after every round.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from tqdm.auto import tqdm

from algo.seeds import EVAL_OFFSET, LEARNER_INDEX, round_seed
from learner.engine import FirstRatioError
from rewards.diversity import group_diversity, mean_diversity
from rewards.pool import RewardScorer
from services import rounds
from services.actors import LearnerWorker, RewardWorker, RolloutWorker
from services.api.control import request_stop, stop_requested
from services.collector import Collector
from services.config import RunConfig
from services.errors import LearnerLost, RunStopped
from services.metrics import merge_ranks
from services.prompts import PromptDealer
from services.resources import check_resources
from services.roles import RoleGroup, RolloutGroup, wait_ready
from services.rounds import PendingRound
from services.run import RunDir, read_driver_state
from services.status import Pace, update_status
from services.viz import plot_curves, save_sample_grid
from services.watch import RewardHackingGuard, score_held_out
from worlds.base import make_world

log = logging.getLogger("elborl.driver")


@dataclass(frozen=True)
class RoleClasses:
    """The actor class of each role (tests pass subclasses, e.g. a learner that fails)."""

    rollout: type = RolloutWorker
    reward: type = RewardWorker
    learner: type = LearnerWorker


class PhaseTimer:
    """``with timer("learner"):`` adds the block's wall-clock seconds to ``timing/learner``."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.monotonic() - t0

    def metrics(self) -> dict[str, float]:
        out = {f"timing/{k}": v for k, v in self.seconds.items()}
        out["timing/round"] = time.monotonic() - self.start
        return out


def _due(every: int, round_: int, last: int) -> bool:
    return round_ == last or (every > 0 and round_ % every == 0)


class Controller:
    """Owns the role groups, the collector and the loop of one run."""

    def __init__(
        self,
        cfg: RunConfig,
        run: RunDir,
        prompts: list[str],
        eval_prompts: list[str],
        classes: RoleClasses | None = None,
    ):
        self.cfg, self.run_dir = cfg, run
        self.eval_prompts = eval_prompts
        self.classes = classes or RoleClasses()
        self.dealer = PromptDealer(prompts, cfg.seed)
        self.adv_cfg = cfg.learner.advantage_config()
        self.timeout = cfg.train.step_timeout_s
        self.round = 0
        self.version = -1
        self.stats = {"scored": 0, "trained": 0}
        self.steps_skipped = 0
        self.bad_rounds = 0  # consecutive rounds over faults.max_invalid_fraction or skipped
        self.last_done: PendingRound | None = None  # the last round whose update was applied
        self.checkpointed = 0  # the round of the newest checkpoint written by this process
        self.interrupted: str | None = None  # the signal's name once SIGTERM/SIGINT arrived
        self.groups: list[RoleGroup] = []
        # eval.rewards, scored here on the held-out images (a remote one connects now).
        self.eval_scorer = RewardScorer(cfg.eval.rewards) if cfg.eval.rewards else None
        self.world = make_world(cfg.world)  # prompt metadata for the ledger and eval rewards
        g = cfg.guard
        self.guard = (
            RewardHackingGuard(g.watch, g.train_metric, g.patience, g.min_change)
            if g.watch
            else None
        )

    # ------------------------------------------------------------------ the loop
    def run(self) -> bool:
        """Rounds ``round + 1 .. train.rounds``; True when a stop request or a signal ended the
        run early (its last round checkpointed). A ``RunStopped`` fault checkpoints the last
        completed round, then propagates."""
        try:
            return self._rounds()
        except RunStopped:
            if self.last_done is not None and self.checkpointed < self.last_done.round:
                self.checkpoint(self.last_done)
            raise

    def _rounds(self) -> bool:
        last, async_rollout = self.cfg.train.rounds, self.cfg.train.async_rollout
        self._evaluate_start()
        pace, bar = Pace(self.run_dir.history()), self._progress_bar()
        pending = self.launch(self.round + 1) if self.round < last else None
        stopping = False
        while pending is not None:
            r, timer = pending.round, PhaseTimer()
            stopping = r < last and self._stop_wanted(r)
            more = r < last and not stopping
            with timer("wait_rollout_and_reward"):  # generate -> score
                scored = self.collect(pending)
            nxt = self.launch(r + 1) if async_rollout and more else None
            with timer("advantages"):
                plan = rounds.plan_update(pending.chunks, scored, self.adv_cfg, len(self.learners))
            with timer("learner"):
                learned = self.train(pending, plan)
            with timer("publish"):
                weights = self.publish()
            nxt = nxt or (self.launch(r + 1) if more else None)
            metrics = {**learned, **weights, **self._round_metrics(pending, scored, plan, timer)}
            self.finish_round(pending, scored, plan, metrics, stopping, pace)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}")
            pending = nxt
        bar.close()
        plot_curves(self.run_dir.history(), self.run_dir.path / "curves.png")
        return stopping

    # ------------------------------------------------------------------ start-up
    def start(self, resume: bool) -> None:
        """Check resources, start every actor, set up the learner group, publish weights."""
        c, k = self.cfg, self.classes
        check_resources(c)
        budget = c.faults.max_restarts
        self.rollouts = RolloutGroup(
            "rollout",
            k.rollout,
            c.rollout.resources,
            lambda i: (c.model, c.rollout.sampling, c.world, c.rollout.resources.threads),
            c.rollout.num_workers,
            budget,
            self.timeout,
        )
        self.rewards = RoleGroup(
            "reward",
            k.reward,
            c.rewards.resources,
            lambda i: (c.rewards.functions, c.rewards.resources.threads),
            c.rewards.num_actors,
            budget,
            self.timeout,
        )
        w = c.learner.num_workers
        self.learners = RoleGroup(
            "learner",
            k.learner,
            c.learner.resources,
            lambda rank: (rank, w, c.learner.resources.threads),
            w,
            0,
            self.timeout,
        )
        self.groups = [self.rollouts, self.rewards, self.learners]
        wait_ready(self.groups, self.timeout)
        self.collector = Collector(
            self.rollouts,
            self.rewards,
            c.rewards.timeout_s,
            c.faults.reward_retries,
            self.timeout,
        )
        master = self._learner_get(self.learners[0].rendezvous.remote(), "the rendezvous")
        setup = [
            lw.setup.remote(
                master, c.model, c.learner, c.rollout.sampling, c.seed, c.world.image_size
            )
            for lw in self.learners.actors
        ]
        self._learner_get(setup, "the learner set-up")
        if resume:
            self._restore()
        self.publish()

    def _restore(self) -> None:
        ckpt = self.run_dir.latest_checkpoint()
        if ckpt is None:
            log.warning(
                "--resume: no complete checkpoint in %s; starting from round 1",
                self.run_dir.ckpt_root,
            )
            return
        state = read_driver_state(ckpt)
        loads = [lw.load.remote(str(ckpt / "learner")) for lw in self.learners.actors]
        self._learner_get(loads, "loading the checkpoint")
        self.round = int(state["round"])
        self.dealer.epoch, self.dealer.cursor = state["dealer"]["epoch"], state["dealer"]["cursor"]
        self.stats = state["stats"]
        self.run_dir.truncate_history(self.round)
        self.checkpointed = self.round
        log.info("resumed from %s (round %d)", ckpt, self.round)

    # ------------------------------------------------------------------ phases
    def launch(self, round_: int) -> PendingRound:
        """Deal the round's prompts into chunks and start their rollouts (non-blocking)."""
        c = self.cfg
        rp = self.dealer.deal(round_, c.rollout.prompts_per_round, c.rollout.images_per_prompt)
        dealer_after = self.dealer.state()
        chunks = rounds.plan_chunks(rp, len(self.rollouts), len(self.learners), c.seed, round_)
        for ch in chunks:
            ch.receipt, ch.images, ch.samples = self.rollouts[ch.worker].generate.remote(
                ch.prompts, ch.sample_ids, ch.group_ids, ch.seed
            )
        return PendingRound(round_, rp, chunks, time.monotonic(), dealer_after)

    def collect(self, pending: PendingRound) -> list[Any | None]:
        """Every chunk's rewards, exactly once (``Collector``); None for dropped chunks."""
        scored = self.collector.collect(pending)
        ids = np.concatenate([s.sample_ids for s in scored if s is not None] or [np.zeros(0)])
        expected = np.concatenate(
            [ch.sample_ids for ch, s in zip(pending.chunks, scored, strict=True) if s is not None]
            or [np.zeros(0)]
        )
        if len(ids) != len(set(ids.tolist())) or set(ids.tolist()) != set(expected.tolist()):
            raise RuntimeError(f"round {pending.round}: scored samples do not match the rollout")
        self.stats["scored"] += len(ids)
        return scored

    def train(self, pending: PendingRound, plan: rounds.UpdatePlan) -> dict[str, float]:
        """One optimizer step on every learner rank (none when a rank has no valid sample:
        ``faults/steps_skipped``)."""
        if not plan.trainable:
            self.steps_skipped += 1
            self.last_done = pending
            return {**plan.metrics, "learner/skipped_step": 1.0, "learner/samples": 0.0}
        seed = round_seed(self.cfg.seed, pending.round, LEARNER_INDEX)
        futures = [
            lw.train_step.remote(
                [pending.chunks[i].samples for i in shard.chunks],
                shard.advantages,
                shard.keep,
                plan.total_kept,
                seed,
            )
            for lw, shard in zip(self.learners.actors, plan.shards, strict=True)
        ]
        out = {**merge_ranks(self._learner_get(futures, "the learner step")), **plan.metrics}
        if out.get("learner/skipped_step", 0.0) > 0:
            self.steps_skipped += 1
        else:
            self.stats["trained"] += plan.total_kept
        self.last_done = pending
        return out

    def publish(self) -> dict[str, float]:
        """Put the learner's sampling weights in the object store once; every worker loads them.

        A rollout worker that dies while loading is replaced (the replacement loads the same
        object).
        """
        start = time.monotonic()
        refs = [lw.publish_weights.remote() for lw in self._gathering_ranks()]
        meta_ref, state_ref = refs[0]
        meta = self._learner_get(meta_ref, "publishing weights")
        self._learner_get([r[0] for r in refs[1:]], "publishing weights")
        ro = self.rollouts
        ro.state_ref, ro.version, ro.checksum = state_ref, meta.version, meta.checksum
        self.version = int(meta.version)
        loads = {i: w.load_weights.remote(state_ref, meta.version) for i, w in enumerate(ro.actors)}
        seconds: list[float] = []
        for i, ref in loads.items():
            try:
                report = ray.get(ref, timeout=self.timeout)
            except RayActorError:
                log.warning("rollout worker %d died loading weights", i)
                ro.replace(i)
                continue
            if report.checksum != meta.checksum:
                raise RuntimeError(f"rollout worker {i} loaded weights with the wrong checksum")
            seconds.append(report.seconds)
        elapsed = time.monotonic() - start
        return {
            "weights/version": self.version,
            "weights/bytes": meta.bytes,
            "weights/checksum": int(meta.checksum, 16),
            "weights/seconds": elapsed,
            "weights/MBps": meta.bytes * len(ro) / 1e6 / max(elapsed, 1e-9),
            "weights/load_seconds_max": float(max(seconds, default=0.0)),
        }

    def _gathering_ranks(self) -> list[Any]:
        """The learner ranks to ask for weights: rank 0, or all of them under ZeRO-3, where
        gathering partitioned parameters is a collective every rank must join."""
        actors = list(self.learners.actors)
        return actors if self.cfg.learner.zero_stage == 3 else actors[:1]

    def evaluate(self, round_: int) -> dict[str, float]:
        """Held-out accuracy of the *current* (trained) weights, on rollout worker 0."""
        start = time.monotonic()
        refs = [lw.current_state.remote() for lw in self._gathering_ranks()]
        state_ref = refs[0]
        args = (state_ref, self.eval_prompts, self.cfg.eval, self.cfg.seed + EVAL_OFFSET)
        try:
            result = ray.get(self.rollouts[0].evaluate.remote(*args), timeout=self.timeout)
        except RayActorError:
            log.warning("rollout worker 0 died during the evaluation; replacing it and retrying")
            self.rollouts.replace(0)
            result = ray.get(self.rollouts[0].evaluate.remote(*args), timeout=self.timeout)
        self._learner_get(refs[1:], "gathering the current weights")
        out = eval_metrics(result.summary)
        by_prompt = np.unique(np.asarray(result.prompts), return_inverse=True)[1]
        diversity = mean_diversity([group_diversity(result.images, by_prompt)])
        if np.isfinite(diversity):  # images per held-out prompt >= 2
            out["eval/diversity"] = diversity
        scores = list(result.scores)
        if self.eval_scorer is not None:  # eval.rewards: watched on the held-out images
            meta = [self.world.metadata(p) for p in result.prompts]
            watched = score_held_out(self.eval_scorer, result.images, result.prompts, meta)
            out.update(watched.metrics)
            scores = scores or list(watched.total)
        k = min(32, len(result.prompts))
        self._save_grid(
            self.run_dir.path / "samples" / f"eval_round_{round_:05d}.png",
            result.images[:k],
            result.prompts[:k],
            scores[:k] if scores else [float("nan")] * k,
        )
        out["timing/eval"] = time.monotonic() - start
        return out

    def checkpoint(self, pending: PendingRound) -> None:
        """Learner state (every rank) + driver state after ``pending``'s round, atomically.

        The prompt cursor saved is the one right after this round was dealt: the next round's
        prompts may already be dealt (and its rollouts running) when the checkpoint is written.
        """
        round_, start = pending.round, time.monotonic()
        tmp = self.run_dir.new_checkpoint(round_)
        saves = [lw.save.remote(str(tmp / "learner")) for lw in self.learners.actors]
        ray.get(saves, timeout=self.timeout)
        driver = {
            "round": round_,
            "version": self.version,
            "dealer": pending.dealer_after,
            "stats": self.stats,
        }
        final = self.run_dir.commit_checkpoint(tmp, round_, driver)
        self.checkpointed = round_
        log.info("checkpoint %s (%.1f s)", final, time.monotonic() - start)

    # ------------------------------------------------------------------ after a round
    def finish_round(
        self,
        pending: PendingRound,
        scored: list[Any | None],
        plan: rounds.UpdatePlan,
        metrics: dict[str, Any],
        stopping: bool,
        pace: Pace,
    ) -> None:
        """Ledger, evaluation, sample grid, metrics, checkpoint and status of round ``r``."""
        r, last, t = pending.round, self.cfg.train.rounds, self.cfg.train
        entry = rounds.ledger(pending.chunks, scored, plan.keep)
        groups = dict(zip(pending.prompts.group_ids.tolist(), pending.prompts.prompts, strict=True))
        meta = {g: m for g, p in groups.items() if (m := self.world.metadata(p)) is not None}
        if meta:  # what the prompt file says about each group's prompt (e.g. GenEval's tag)
            entry["metadata"] = {str(g): m for g, m in meta.items()}
        self.run_dir.log_ledger(r, entry)
        if _due(t.eval_every, r, last):
            metrics.update(self.evaluate(r))
        self._watch(r, metrics)
        if _due(t.sample_grid_every, r, last):
            self._sample_grid(pending, scored, r)
        self.round = r
        self.run_dir.log_metrics(r, metrics)
        _log_round(r, last, metrics)
        pace.add(r, metrics)
        bad = self._count_bad(metrics)
        if _due(t.checkpoint_every, r, last) or stopping or bad:
            self.checkpoint(pending)
        if bad:
            raise RunStopped(bad)
        state = "stopping" if stopping else "running" if r < last else "finished"
        self.write_status(pace, state)

    def _round_metrics(
        self,
        pending: PendingRound,
        scored: list[Any | None],
        plan: rounds.UpdatePlan,
        timer: PhaseTimer,
    ) -> dict[str, float]:
        done = [s for s in scored if s is not None]
        busy = {
            "timing/rollout": max((s.rollout_seconds for s in done), default=0.0),
            "timing/reward": max((s.seconds for s in done), default=0.0),
        }
        phases = timer.metrics()
        saved = busy["timing/rollout"] + busy["timing/reward"]
        saved -= phases["timing/wait_rollout_and_reward"]
        return {
            **rounds.reward_metrics(done),
            **rounds.rollout_metrics(pending.chunks, scored, plan.keep, self.version),
            **busy,
            **phases,
            "timing/async_saved": max(0.0, saved) if self.cfg.train.async_rollout else 0.0,
            "perf/samples_scored_total": float(self.stats["scored"]),
            "perf/samples_trained_total": float(self.stats["trained"]),
            **{f"faults/{k}": float(v) for k, v in sorted(self.fault_counters().items())},
        }

    def fault_counters(self) -> dict[str, int]:
        """Cumulative fault counters: the collector's, replacements per role, skipped steps."""
        out = dict(self.collector.counters)
        for g in self.groups:
            if g.restarts:
                out[f"{g.role}_restarts"] = g.restarts
        if self.steps_skipped:
            out["steps_skipped"] = self.steps_skipped
        return out

    def _count_bad(self, m: dict[str, Any]) -> str | None:
        """The consecutive-bad-rounds rule of ``faults``; a message once the limit is reached."""
        f = self.cfg.faults
        invalid = m["rollout/invalid_fraction"]
        if invalid > f.max_invalid_fraction or m.get("learner/skipped_step", 0.0) > 0:
            self.bad_rounds += 1
        else:
            self.bad_rounds = 0
        if self.bad_rounds < f.max_bad_rounds:
            return None
        return (
            f"{self.bad_rounds} bad rounds in a row (the last: {invalid:.0%} of samples invalid "
            f"or dropped, learner step skipped: {bool(m.get('learner/skipped_step', 0.0))}); "
            f"faults.max_bad_rounds = {f.max_bad_rounds}. The weights were not updated by those "
            "rounds. Check the reward (NaN/inf or out-of-range scores) or lower learner.lr, then "
            "--resume"
        )

    def write_status(self, pace: Pace, state: str) -> None:
        ckpt = self.run_dir.latest_checkpoint()
        update_status(
            self.run_dir,
            **pace.status(self.round, self.cfg.train.rounds, state),
            version=self.version,
            last_checkpoint=ckpt.name if ckpt else None,
            workers=self.health(),
            nodes={g.role: list(g.nodes) for g in self.groups},
            samples_scored=self.stats["scored"],
            samples_trained=self.stats["trained"],
            warnings=self.guard.alarms if self.guard is not None else [],
        )

    def _watch(self, r: int, metrics: dict[str, Any]) -> None:
        """The reward-hacking guard (``guard``) on round ``r``'s metrics."""
        if self.guard is None:
            return
        alarm = self.guard.observe(r, metrics)
        metrics["guard/alarm"] = float(alarm is not None)
        if alarm is None:
            return
        log.warning("%s (guard.action = %s)", alarm, self.cfg.guard.action)
        if self.cfg.guard.action == "stop":
            request_stop(self.run_dir.path, source="guard")

    def health(self) -> dict[str, dict[str, Any]]:
        """Per role: workers, alive, restarts and nodes, from each group's own records."""
        return {g.role: g.health() for g in self.groups}

    # ------------------------------------------------------------------ helpers
    def _evaluate_start(self) -> None:
        if self.round == 0 and self.cfg.train.eval_at_start:
            start = self.evaluate(0)
            if self.guard is not None:
                self.guard.observe(0, start)  # the base model: the guard's first point
            self.run_dir.log_metrics(0, start)
            log.info("round 0 (initial weights): %s", _eval_line(start))

    def _progress_bar(self) -> Any:
        total = self.cfg.train.rounds
        return tqdm(total=total, initial=self.round, desc="train", unit="round", dynamic_ncols=True)

    def _stop_wanted(self, r: int) -> bool:
        """Checked before round ``r``'s update: a stopping run launches no further rollouts,
        so the prompt dealer's state in the checkpoint is exactly that after round r."""
        if self.interrupted is None and not stop_requested(self.run_dir.path):
            return False
        why = f"{self.interrupted} received" if self.interrupted else "stop requested"
        log.info("%s: finishing round %d, then checkpointing", why, r)
        update_status(self.run_dir, state="stopping")
        return True

    def _learner_get(self, refs: Any, what: str) -> Any:
        """``ray.get`` on learner calls; a dead rank fails the run with how to resume."""
        try:
            return ray.get(refs, timeout=self.timeout)
        except RayActorError as exc:
            ckpt = self.run_dir.latest_checkpoint()
            where = (
                f"the latest checkpoint is {ckpt.name}; continue with `elborl train --config "
                "<same config> --resume`"
                if ckpt
                else "no checkpoint was written yet, so a rerun starts from round 1"
            )
            raise LearnerLost(f"a learner rank died during {what} ({exc}); {where}") from exc
        except GetTimeoutError as exc:
            raise RunStopped(f"{what} did not finish within {self.timeout:.0f} s") from exc
        except RayTaskError as exc:
            if isinstance(exc.cause, FirstRatioError):  # a setup mistake: say it plainly
                raise RunStopped(str(exc.cause)) from None
            raise

    def _sample_grid(self, pending: PendingRound, scored: list[Any | None], round_: int) -> None:
        """The first 16 images of the round's first scored chunk, with prompts and rewards."""
        first = next(((ch, s) for ch, s in zip(pending.chunks, scored, strict=True) if s), None)
        if first is None:
            return
        ch, s = first
        chunk = ray.get(ch.images, timeout=self.timeout)
        k = min(16, len(chunk.prompts))
        self._save_grid(
            self.run_dir.path / "samples" / f"round_{round_:05d}.png",
            chunk.images[:k],
            chunk.prompts[:k],
            list(s.total[:k]),
        )

    @staticmethod
    def _save_grid(path: Path, images: Any, prompts: list[str], scores: list[float]) -> None:
        """The grid PNG plus ``<name>.json`` with its prompts and rewards (for the status API)."""
        save_sample_grid(path, images, prompts, scores)
        captions = {"prompts": list(prompts), "rewards": [float(s) for s in scores]}
        path.with_suffix(".json").write_text(json.dumps(captions))


def eval_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """``eval/`` metrics of a world's evaluation summary (none of the verifier's for a world
    without one: its held-out metrics are the eval rewards')."""
    if "accuracy" not in summary:
        return {}
    out = {
        "eval/accuracy": summary["accuracy"],
        "eval/mean_reward": summary["mean_reward"],
    }
    out.update({f"eval/clause_{k}": v for k, v in summary["clause_accuracy"].items()})
    if "overall" in summary:  # a world with categories: GenEval's score and its parts
        out["eval/overall"] = summary["overall"]
        out.update({f"eval/category_{k}": v for k, v in summary["category_accuracy"].items()})
    return out


def _eval_line(m: dict[str, Any]) -> str:
    """The held-out figures of a log line: accuracy, else the watched rewards."""
    if "eval/accuracy" in m:
        return f"held-out acc {m['eval/accuracy']:.3f}"
    watched = [f"{k[12:]} {v:.4g}" for k, v in m.items() if k.startswith("eval/reward_")]
    return "held-out " + ", ".join(watched) if watched else "held-out evaluation done"


def _log_round(r: int, total: int, m: dict[str, Any]) -> None:
    acc = f", {_eval_line(m)}" if "timing/eval" in m else ""  # this round was evaluated
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
