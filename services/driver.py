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
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from learner.advantages import AdvantageConfig, compute_advantages
from services.api.control import clear_stop_request, load_token
from services.commands import resolve_prompts
from services.config import ConfigError, Resources, RunConfig
from services.loop import update_status, worker_health
from services.prompts import PromptDealer, RoundPrompts
from services.resources import check_resources
from services.run import RunDir, read_driver_state

log = logging.getLogger("elborl.driver")


@dataclass
class Chunk:
    """One rollout call: which worker, its ids, and the two result refs."""

    index: int
    sample_ids: np.ndarray
    group_ids: np.ndarray
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
    """``elborl train``: returns the process exit status."""
    prompts = [p.text for p in resolve_prompts(cfg.world.train_prompts, "world.train_prompts")]
    eval_prompts = [p.text for p in resolve_prompts(cfg.world.eval_prompts, "world.eval_prompts")]
    if not cfg.model.checkpoint or not Path(cfg.model.checkpoint, "config.json").exists():
        raise ConfigError(
            f"model.checkpoint = {cfg.model.checkpoint!r} is not a saved policy; run "
            "`elborl pretrain` or point it at one"
        )
    token = load_token(cfg.service) if cfg.service.enabled else None
    run = RunDir(cfg, resume)
    clear_stop_request(run.path)
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
        stopped = False
        trainer = Trainer(cfg, run, prompts, eval_prompts)
        try:
            with ray_session(address):
                try:
                    trainer.start(resume)
                    stopped = trainer.run()
                except BaseException as exc:
                    _record_failure(trainer, exc, health=True)
                    raise
                finally:
                    run.close()
        except BaseException as exc:  # Ray itself failed to start or stop
            _record_failure(trainer, exc, health=False)
            raise
        update_status(run, state="stopped" if stopped else "finished", eta_s=None)
    if stopped:
        log.info("stopped on request after round %d; continue with --resume", trainer.round)
    else:
        log.info("run finished: %s", run.path)
    return 0


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
        ray.init(
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
        self.nodes: dict[str, list[str]] = {}
        self.failed = False

    # ------------------------------------------------------------------ start-up
    def start(self, resume: bool) -> None:
        """Check resources, start every actor, set up the learner group, publish weights."""
        check_resources(self.cfg)
        c = self.cfg
        from services.actors import LearnerWorker, RewardWorker, RolloutWorker

        self.rollouts = [
            RolloutWorker.options(**_options(c.rollout.resources)).remote(  # type: ignore[attr-defined]
                c.model, c.rollout.sampling, _threads(c.rollout.resources)
            )
            for _ in range(c.rollout.num_workers)
        ]
        self.rewards = [
            RewardWorker.options(**_options(c.rewards.resources)).remote(  # type: ignore[attr-defined]
                c.rewards.functions, _threads(c.rewards.resources)
            )
            for _ in range(c.rewards.num_actors)
        ]
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
        log.info("resumed from %s (round %d)", ckpt, self.round)

    # ------------------------------------------------------------------ phases
    def publish(self) -> dict[str, float]:
        """Put the learner's sampling weights in the object store once; every worker loads them."""
        start = time.monotonic()
        meta_ref, state_ref = self.learners[0].publish_weights.remote()
        meta = ray.get(meta_ref, timeout=self.timeout)
        reports = ray.get(
            [w.load_weights.remote(state_ref, meta["version"]) for w in self.rollouts],
            timeout=self.timeout,
        )
        bad = [r for r in reports if r["checksum"] != meta["checksum"]]
        if bad:
            raise RuntimeError(f"rollout workers loaded weights with the wrong checksum: {bad}")
        self.version = int(meta["version"])
        seconds = time.monotonic() - start
        return {
            "weights/version": self.version,
            "weights/bytes": meta["bytes"],
            "weights/checksum": int(meta["checksum"], 16),
            "weights/seconds": seconds,
            "weights/MBps": meta["bytes"] * len(self.rollouts) / 1e6 / max(seconds, 1e-9),
            "weights/load_seconds_max": max(r["seconds"] for r in reports),
        }

    def launch(self, round_: int) -> PendingRound:
        """Deal the round's prompts into chunks and start their rollouts (non-blocking)."""
        c = self.cfg
        rp = self.dealer.deal(round_, c.rollout.prompts_per_round, c.rollout.images_per_prompt)
        dealer_after = self.dealer.state()
        num_chunks = math.lcm(c.rollout.num_workers, c.learner.num_workers)
        chunks = []
        for i, idx in enumerate(np.array_split(np.arange(len(rp.prompts)), num_chunks)):
            worker = self.rollouts[i % len(self.rollouts)]
            seed = _seed(c.seed, round_, i)
            imgs, samples = worker.generate.remote(
                [rp.prompts[j] for j in idx], rp.sample_ids[idx], rp.group_ids[idx], seed
            )
            chunks.append(Chunk(i, rp.sample_ids[idx], rp.group_ids[idx], imgs, samples))
        return PendingRound(round_, rp, chunks, time.monotonic(), dealer_after)

    def score(self, pending: PendingRound) -> tuple[Any, list[Any]]:
        """Score every chunk on the reward pool (images go rollout -> reward by ref)."""
        refs = [
            self.rewards[ch.index % len(self.rewards)].score.remote(ch.images)
            for ch in pending.chunks
        ]
        scored = ray.get(refs, timeout=self.timeout)
        ids = np.concatenate([s.sample_ids for s in scored])
        expected = pending.prompts.sample_ids
        if len(ids) != len(expected) or set(ids.tolist()) != set(expected.tolist()):
            raise RuntimeError(f"round {pending.round}: scored samples do not match the rollout")
        self.stats["scored"] += len(ids)
        return scored, refs

    def learn(self, pending: PendingRound, scored: list[Any]) -> tuple[dict[str, float], Any]:
        """Advantages per prompt group, then one optimizer step on every rank."""
        rewards = torch.from_numpy(np.concatenate([s.total for s in scored]))
        groups = torch.from_numpy(np.concatenate([s.group_ids for s in scored]))
        adv, adv_metrics = compute_advantages(rewards, groups, self.adv_cfg)
        adv_np = adv.numpy()
        offsets = np.cumsum([0] + [len(ch.sample_ids) for ch in pending.chunks])
        w = len(self.learners)
        futures = []
        for rank, learner in enumerate(self.learners):
            mine = [ch for ch in pending.chunks if ch.index % w == rank]
            a = np.concatenate([adv_np[offsets[ch.index] : offsets[ch.index + 1]] for ch in mine])
            futures.append(
                learner.train_step.remote(
                    [ch.samples for ch in mine], a, _seed(self.cfg.seed, pending.round, 10**6)
                )
            )
        per_rank = ray.get(futures, timeout=self.timeout)
        self.stats["trained"] += len(adv_np)
        return {**_rank_mean(per_rank), **adv_metrics}, adv_np

    # ------------------------------------------------------------------ loop
    def run(self) -> bool:
        """All remaining rounds, with evaluation, sample grids and checkpoints.

        Returns True when a stop request ended the run early (its last round checkpointed).
        """
        from services.loop import run_rounds

        return run_rounds(self)


def _seed(base: int, round_: int, index: int) -> int:
    return (base * 1_000_003 + round_ * 10_007 + index) % (2**62)


def _rank_mean(per_rank: list[dict[str, float]]) -> dict[str, float]:
    keys = per_rank[0].keys()
    return {k: float(np.mean([m[k] for m in per_rank if k in m])) for k in keys}
