"""The training driver: a Ray job that runs generate -> score -> advantages -> train -> publish.

``train`` validates everything it can before any actor starts (config, prompt files, run
directory, resources), then runs the rounds. Without an address it starts a local
single-node Ray cluster sized to the machine; with ``--address`` or ``RAY_ADDRESS`` (as under
``ray job submit``) it joins that cluster.

With ``service.enabled`` the status API (``services/api``) is served from a background thread
of this process for as long as the run lasts. ``status.json`` carries the run's state:
starting -> running -> finished, or -> stopping -> stopped after a stop request (the round in
flight is finished and checkpointed, the exit status is 0), or failed with the error.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError

from learner.advantages import AdvantageConfig, compute_advantages
from services.api.control import clear_stop_request, load_token
from services.collect import RunStopped, collect_round, get_or_stop
from services.commands import resolve_prompts
from services.config import ConfigError, Resources, RunConfig
from services.loop import update_status, worker_health
from services.prompts import PromptDealer, RoundPrompts
from services.resources import busy_cpu_warning, check_resources, missing_for
from services.run import RunDir, read_driver_state, verify_checkpoint

log = logging.getLogger("elborl.driver")


@dataclass
class Chunk:
    """One rollout call: its worker, ids, seed and result refs (replaced if regenerated)."""

    index: int
    worker: int
    prompts: list[str]
    sample_ids: np.ndarray
    group_ids: np.ndarray
    seed: int
    receipt: ray.ObjectRef
    images: ray.ObjectRef
    samples: ray.ObjectRef


@dataclass
class PendingRound:
    """A round whose rollouts have been launched."""

    round: int
    prompts: RoundPrompts
    chunks: list[Chunk]
    started: float
    dealer_after: dict[str, int]  # the dealer's state once this round was dealt (checkpoints)


def train(cfg: RunConfig, address: str | None, resume: bool, config_path: str | None) -> int:
    """``elborl train``: returns the process exit status.

    0: finished, or stopped on request; 1: stopped by a fault (``RunStopped``, ``LearnerLost``,
    with a checkpoint where one could be written); 128 + signal number after SIGTERM/SIGINT
    (the round in flight is finished and checkpointed first).
    """
    prompts, eval_prompts = _preflight(cfg)
    token = load_token(cfg.service) if cfg.service.enabled else None
    run = RunDir(cfg, resume)
    if resume and (ckpt := run.latest_checkpoint()) is not None:
        verify_checkpoint(ckpt)  # before any actor starts: a damaged file is named here
    clear_stop_request(run.path)
    hint = f"elborl train --config {config_path or '<the same config>'} --resume"
    with _serving(cfg, token) as service_url:
        update_status(
            run,
            state="starting",
            error=None,
            total_rounds=cfg.train.rounds,
            eta_s=None,
            started=time.time(),
            pid=os.getpid(),
            hostname=socket.gethostname(),
            service_url=service_url,
        )
        trainer = Trainer(cfg, run, prompts, eval_prompts)
        try:
            with ray_session(address), _signals(trainer):  # after ray.init: it sets its own
                try:
                    trainer.start(resume)
                    stopped = trainer.run()
                except (RunStopped, LearnerLost) as exc:
                    _record_failure(trainer, exc, health=True)
                    log.error("run stopped: %s", exc)
                    print(f"elborl train: run stopped: {exc}\nresume with: {hint}", file=sys.stderr)
                    return 1
                except BaseException as exc:
                    _record_failure(trainer, exc, health=True)
                    raise
                finally:
                    run.close()
        except BaseException as exc:  # Ray itself failed to start or stop
            _record_failure(trainer, exc, health=False)
            raise
        return _finish(trainer, stopped, hint)


def _finish(trainer: Trainer, stopped: bool, hint: str) -> int:
    run = trainer.run_dir
    if trainer.interrupted and stopped:  # (a signal during the last round lets it finish)
        message = f"interrupted by {trainer.interrupted} after round {trainer.round}"
        update_status(run, state="stopped", error=message, eta_s=None)
        print(f"elborl train: {message}; checkpointed. Resume with: {hint}", file=sys.stderr)
        return 128 + int(getattr(signal, trainer.interrupted))
    update_status(run, state="stopped" if stopped else "finished", eta_s=None)
    if stopped:
        log.info("stopped on request after round %d; continue with: %s", trainer.round, hint)
    else:
        log.info("run finished: %s", run.path)
    return 0


def _preflight(cfg: RunConfig) -> tuple[list[str], list[str]]:
    """Validate every input file before anything is written or started; errors name the file."""
    prompts = [p.text for p in resolve_prompts(cfg.world.train_prompts, "world.train_prompts")]
    eval_prompts = [p.text for p in resolve_prompts(cfg.world.eval_prompts, "world.eval_prompts")]
    if not cfg.model.checkpoint or not Path(cfg.model.checkpoint, "config.json").exists():
        raise ConfigError(
            f"model.checkpoint = {cfg.model.checkpoint!r} is not a saved policy; run "
            "`elborl pretrain` or point it at one"
        )
    from policy.io import load_policy

    try:
        policy = load_policy(cfg.model.checkpoint)
    except Exception as exc:  # corrupted weights or a config.json from something else
        raise ConfigError(f"model.checkpoint = {cfg.model.checkpoint!r}: {exc}") from exc
    if policy.image_size != cfg.world.image_size:
        raise ConfigError(
            f"model.checkpoint {cfg.model.checkpoint!r} was trained on "
            f"{policy.image_size}px images but world.image_size = {cfg.world.image_size}; use "
            "the checkpoint's size or a checkpoint made for this config"
        )
    return prompts, eval_prompts


@contextmanager
def _signals(trainer: Trainer) -> Iterator[None]:
    """First SIGTERM/SIGINT: finish the round in flight, checkpoint, exit 128+n. Second: abort."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if trainer.interrupted:
            raise KeyboardInterrupt(f"second {name}: aborting without a checkpoint")
        trainer.interrupted = name
        log.warning("%s: finishing the round in flight, then checkpointing (again to abort)", name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def _serving(cfg: RunConfig, token: str | None) -> Iterator[str | None]:
    """The status service in a background thread for the block's duration (its URL or None)."""
    if token is None:
        yield None
        return
    from services.api.server import ApiServer

    svc = cfg.service
    server = ApiServer(cfg.runs_dir, token, svc.host, svc.port, svc.cors_origins).start()
    try:
        yield server.url
    finally:
        server.stop()


def _record_failure(trainer: Trainer, exc: BaseException, health: bool) -> None:
    """``failed`` with the error in ``status.json`` (once), and which workers are alive."""
    if trainer.failed:
        return
    trainer.failed = True
    message = f"{type(exc).__name__}: {exc}"[:2000] if str(exc) else type(exc).__name__
    fields: dict[str, Any] = {"state": "failed", "error": message, "eta_s": None}
    if health and ray.is_initialized():
        try:
            fields["workers"] = worker_health(trainer)
        except Exception as health_exc:
            log.debug("no worker health after the failure: %s", health_exc)
    update_status(trainer.run_dir, **fields)


@contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Join ``address``/``RAY_ADDRESS`` or start a local cluster; shut down what we started."""
    if ray.is_initialized():
        yield
        return
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        ray.init(address=target, log_to_driver=True)
    else:
        import psutil

        busy = busy_cpu_warning(psutil.cpu_percent(interval=0.3), os.cpu_count() or 1)
        if busy:
            log.warning(busy)
        ray.init(  # "local": a new cluster even when `ray start` runs on this machine
            address="local",
            num_cpus=os.cpu_count(),
            object_store_memory=int(os.environ.get("ELBORL_OBJECT_STORE_BYTES", 512 * 2**20)),
            include_dashboard=False,
            log_to_driver=True,
        )
    try:
        yield
    finally:
        ray.shutdown()


def _options(res: Resources) -> dict[str, Any]:
    opts: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
    if res.custom:
        opts["resources"] = dict(res.custom)
    return opts


def _threads(res: Resources) -> int:
    return res.torch_threads or max(1, math.ceil(res.num_cpus))


class Trainer:
    """Owns the actors and the loop; each method is one phase of a round."""

    def __init__(self, cfg: RunConfig, run: RunDir, prompts: list[str], eval_prompts: list[str]):
        self.cfg, self.run_dir = cfg, run
        self.eval_prompts = eval_prompts
        self.dealer = PromptDealer(prompts, cfg.seed)
        self.round = 0
        self.version = -1
        self.timeout = cfg.train.step_timeout_s
        self.adv_cfg = AdvantageConfig(
            method=cfg.learner.advantage,
            scale=cfg.learner.advantage_scale,
            std_scope=cfg.learner.advantage_std,
        )
        self.stats = {"scored": 0, "trained": 0}
        self.faults: Counter[str] = Counter()  # cumulative fault counters (faults/ metrics)
        self.nodes: dict[str, list[str]] = {}
        self.failed = False
        self.interrupted: str | None = None  # the signal's name once SIGTERM/SIGINT arrived
        self.state_ref: Any = None  # the published weights, kept for replacement workers
        self.last_done: PendingRound | None = None  # the last round whose update was applied
        self.checkpointed = 0  # the round of the newest checkpoint written by this process
        self.bad_rounds = 0  # consecutive rounds over faults.max_invalid_fraction or skipped

    # ------------------------------------------------------------------ start-up
    def start(self, resume: bool) -> None:
        """Check resources, start every actor, set up the learner group, publish weights."""
        check_resources(self.cfg)
        c = self.cfg
        self.rollouts = [self._new_rollout() for _ in range(c.rollout.num_workers)]
        self.rewards = [self._new_reward() for _ in range(c.rewards.num_actors)]
        from services.actors import LearnerWorker

        w = c.learner.num_workers
        self.learners = [
            LearnerWorker.options(**_options(c.learner.resources)).remote(  # type: ignore[attr-defined]
                rank, w, _threads(c.learner.resources)
            )
            for rank in range(w)
        ]
        self.nodes = self._wait_ready()
        master = ray.get(self.learners[0].rendezvous.remote(), timeout=self.timeout)
        ray.get(
            [
                lw.setup.remote(master, c.model, c.learner, c.rollout.sampling, c.seed)
                for lw in self.learners
            ],
            timeout=self.timeout,
        )
        if resume:
            self._restore()
        self.publish()

    def _new_rollout(self) -> Any:
        from services.actors import RolloutWorker

        res = self.cfg.rollout.resources
        return RolloutWorker.options(**_options(res)).remote(  # type: ignore[attr-defined]
            self.cfg.model, self.cfg.rollout.sampling, _threads(res)
        )

    def _new_reward(self) -> Any:
        from services.actors import RewardWorker

        res = self.cfg.rewards.resources
        return RewardWorker.options(**_options(res)).remote(  # type: ignore[attr-defined]
            self.cfg.rewards.functions, _threads(res)
        )

    def _replacement(self, role: str, res: Resources, make: Any) -> Any:
        """A new actor for ``role`` once the restart budget and the live nodes allow it."""
        key = f"{role}_restarts"
        if self.faults[key] >= self.cfg.faults.max_restarts:
            raise RunStopped(
                f"{role} actors died {self.faults[key] + 1} times, more than "
                f"faults.max_restarts = {self.cfg.faults.max_restarts}"
            )
        missing = missing_for(role, res)
        if missing:
            raise RunStopped(missing)
        actor = make()
        node = get_or_stop(actor.node_id.remote(), self.timeout, f"a replacement {role} actor")
        self.faults[key] += 1
        self.nodes.setdefault(role, []).append(node)
        return actor

    def replace_rollout(self, i: int) -> None:
        """Replace dead rollout worker ``i``; it loads the latest published weights."""
        actor = self._replacement("rollout", self.cfg.rollout.resources, self._new_rollout)
        report = get_or_stop(
            actor.load_weights.remote(self.state_ref, self.version), self.timeout, "weight load"
        )
        if report["checksum"] != self.published_checksum:
            raise RuntimeError("a replacement rollout worker loaded weights with a wrong checksum")
        self.rollouts[i] = actor
        log.warning("rollout worker %d replaced (weights version %d)", i, self.version)

    def replace_reward(self, i: int) -> None:
        """Replace dead or hung reward actor ``i``."""
        self.rewards[i] = self._replacement("reward", self.cfg.rewards.resources, self._new_reward)
        log.warning("reward actor %d replaced", i)

    def regenerate(self, pending: PendingRound, ch: Chunk) -> None:
        """Generate chunk ``ch`` again (same prompts and seed) on its worker's current actor."""
        self.faults["chunks_regenerated"] += 1
        ch.receipt, ch.images, ch.samples = self.rollouts[ch.worker].generate.remote(
            ch.prompts, ch.sample_ids, ch.group_ids, ch.seed
        )

    def _wait_ready(self) -> dict[str, list[str]]:
        """Every actor alive (its node id), or a clear error after a bounded wait."""
        roles = {"rollout": self.rollouts, "reward": self.rewards, "learner": self.learners}
        try:
            return {
                name: ray.get([a.node_id.remote() for a in actors], timeout=self.timeout)
                for name, actors in roles.items()
            }
        except ray.exceptions.GetTimeoutError as exc:
            raise ConfigError(
                f"actors did not start within {self.timeout:.0f} s; the cluster has "
                f"{ray.available_resources()} free. Lower the roles' resources in the config"
            ) from exc

    def _restore(self) -> None:
        ckpt = self.run_dir.latest_checkpoint()
        if ckpt is None:
            log.warning(
                "--resume: no complete checkpoint in %s; starting from round 1",
                self.run_dir.ckpt_root,
            )
            return
        state = read_driver_state(ckpt)
        ray.get(
            [lw.load.remote(str(ckpt / "learner")) for lw in self.learners], timeout=self.timeout
        )
        self.round = int(state["round"])
        self.dealer.epoch, self.dealer.cursor = state["dealer"]["epoch"], state["dealer"]["cursor"]
        self.stats = state["stats"]
        self.run_dir.truncate_history(self.round)
        self.checkpointed = self.round
        log.info("resumed from %s (round %d)", ckpt, self.round)

    # ------------------------------------------------------------------ phases
    def publish(self) -> dict[str, float]:
        """Put the learner's sampling weights in the object store once; every worker loads them.

        A rollout worker that dies while loading is replaced (the replacement loads the same
        object).
        """
        start = time.monotonic()
        meta_ref, state_ref = self.learners[0].publish_weights.remote()
        meta = self._learner_get(meta_ref, "publishing weights")
        self.state_ref, self.published_checksum = state_ref, meta["checksum"]
        self.version = int(meta["version"])
        loads = {
            i: w.load_weights.remote(state_ref, meta["version"])
            for i, w in enumerate(self.rollouts)
        }
        reports = []
        for i, ref in loads.items():
            try:
                reports.append(ray.get(ref, timeout=self.timeout))
            except RayActorError:
                log.warning("rollout worker %d died loading weights", i)
                self.replace_rollout(i)
                reports.append({"checksum": meta["checksum"], "seconds": float("nan")})
        bad = [r for r in reports if r["checksum"] != meta["checksum"]]
        if bad:
            raise RuntimeError(f"rollout workers loaded weights with the wrong checksum: {bad}")
        seconds = time.monotonic() - start
        return {
            "weights/version": self.version,
            "weights/bytes": meta["bytes"],
            "weights/checksum": int(meta["checksum"], 16),
            "weights/seconds": seconds,
            "weights/MBps": meta["bytes"] * len(self.rollouts) / 1e6 / max(seconds, 1e-9),
            "weights/load_seconds_max": float(np.nanmax([r["seconds"] for r in reports] + [0.0])),
        }

    def launch(self, round_: int) -> PendingRound:
        """Deal the round's prompts into chunks and start their rollouts (non-blocking)."""
        c = self.cfg
        rp = self.dealer.deal(round_, c.rollout.prompts_per_round, c.rollout.images_per_prompt)
        dealer_after = self.dealer.state()
        num_chunks = math.lcm(c.rollout.num_workers, c.learner.num_workers)
        chunks = []
        for i, idx in enumerate(np.array_split(np.arange(len(rp.prompts)), num_chunks)):
            worker = i % len(self.rollouts)
            seed = _seed(c.seed, round_, i)
            prompts = [rp.prompts[j] for j in idx]
            receipt, imgs, samples = self.rollouts[worker].generate.remote(
                prompts, rp.sample_ids[idx], rp.group_ids[idx], seed
            )
            chunks.append(
                Chunk(
                    i,
                    worker,
                    prompts,
                    rp.sample_ids[idx],
                    rp.group_ids[idx],
                    seed,
                    receipt,
                    imgs,
                    samples,
                )
            )
        return PendingRound(round_, rp, chunks, time.monotonic(), dealer_after)

    def score(self, pending: PendingRound) -> list[Any | None]:
        """Every chunk's rewards (images go rollout -> reward by ref); None for dropped chunks."""
        scored = collect_round(self, pending)
        ids = np.concatenate([s.sample_ids for s in scored if s is not None] or [np.zeros(0)])
        expected = np.concatenate(
            [ch.sample_ids for ch, s in zip(pending.chunks, scored, strict=True) if s is not None]
            or [np.zeros(0)]
        )
        if len(ids) != len(set(ids.tolist())) or set(ids.tolist()) != set(expected.tolist()):
            raise RuntimeError(f"round {pending.round}: scored samples do not match the rollout")
        self.stats["scored"] += len(ids)
        return scored

    def learn(
        self, pending: PendingRound, scored: list[Any | None]
    ) -> tuple[dict[str, float], np.ndarray]:
        """Advantages per prompt group over the valid samples, then one step on every rank.

        Returns the metrics and the per-sample keep mask (in chunk order). When a rank would
        get no valid sample, no rank steps (``faults/steps_skipped``).
        """
        keep, rewards, groups = _valid_samples(pending, scored)
        adv_np = np.zeros(len(keep))
        metrics: dict[str, float] = {}
        if keep.any():
            adv, metrics = compute_advantages(
                torch.from_numpy(rewards[keep]), torch.from_numpy(groups[keep]), self.adv_cfg
            )
            adv_np[keep] = adv.numpy()
        offsets = np.cumsum([0] + [len(ch.sample_ids) for ch in pending.chunks])
        w = len(self.learners)
        shards = [[ch for ch in pending.chunks if ch.index % w == r] for r in range(w)]
        masks = [
            np.concatenate([keep[offsets[ch.index] : offsets[ch.index + 1]] for ch in mine])
            for mine in shards
        ]
        if not all(m.any() for m in masks):
            self.faults["steps_skipped"] += 1
            return {**metrics, "learner/skipped_step": 1.0, "learner/samples": 0.0}, keep
        seed = _seed(self.cfg.seed, pending.round, 10**6)
        futures = [
            learner.train_step.remote(
                [ch.samples for ch in mine],
                np.concatenate([adv_np[offsets[ch.index] : offsets[ch.index + 1]] for ch in mine]),
                mask,
                int(keep.sum()),
                seed,
            )
            for learner, mine, mask in zip(self.learners, shards, masks, strict=True)
        ]
        per_rank = self._learner_get(futures, "the learner step")
        out = {**_rank_mean(per_rank), **metrics}
        if out.get("learner/skipped_step", 0.0) > 0:
            self.faults["steps_skipped"] += 1
        else:
            self.stats["trained"] += int(keep.sum())
        return out, keep

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

    # ------------------------------------------------------------------ loop
    def run(self) -> bool:
        """All remaining rounds, with evaluation, sample grids and checkpoints.

        Returns True when a stop request ended the run early (its last round checkpointed).
        """
        from services.loop import run_rounds

        return run_rounds(self)


class LearnerLost(RuntimeError):
    """A learner rank died: its state is gone, so the run fails; ``--resume`` continues it."""


def _valid_samples(
    pending: PendingRound, scored: list[Any | None]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sample in chunk order: kept (scored and valid), total reward, group id."""
    keep, rewards, groups = [], [], []
    for ch, s in zip(pending.chunks, scored, strict=True):
        n = len(ch.sample_ids)
        keep.append(s.valid if s is not None else np.zeros(n, dtype=bool))
        rewards.append(s.total if s is not None else np.zeros(n))
        groups.append(ch.group_ids)
    return np.concatenate(keep), np.concatenate(rewards), np.concatenate(groups)


def _seed(base: int, round_: int, index: int) -> int:
    return (base * 1_000_003 + round_ * 10_007 + index) % (2**62)


def _rank_mean(per_rank: list[dict[str, float]]) -> dict[str, float]:
    keys = per_rank[0].keys()
    return {k: float(np.mean([m[k] for m in per_rank if k in m])) for k in keys}
