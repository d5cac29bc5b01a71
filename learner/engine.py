"""The learner engine: one data-parallel rank of the policy update, under DeepSpeed.

Component layer: torch + DeepSpeed, no Ray. ``services.actors.LearnerWorker`` wraps one
``LearnerEngine`` per rank; the ranks form one torch.distributed group (gloo on CPU, NCCL on
GPU) that the caller sets up through the usual ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/
``MASTER_PORT`` environment variables.

One round on one rank (``train_step``):

1. for each microbatch of this rank's shard and each of the K ELBO timesteps (drawn per
   sample from the rollout sampler's own grid, fresh eps each), one shared draw feeds the
   current (grad), old (no grad; the *version that generated the sample*) and reference
   (no grad, only when beta > 0) passes: ``learner.microbatch.microbatch_loss``;
2. ``engine.backward`` after each (accumulating locally: DeepSpeed's unmanaged gradient
   accumulation), then one ``engine.step()`` that all-reduces (averages) gradients over the
   ranks, clips and applies AdamW;
3. the old (sampling) policy moves towards the new weights: ``old <- d old + (1 - d) current``.

Normalisation: the loss functions divide by a ``GlobalNormalizer``; we pass this rank's sample
count, and DeepSpeed *averages* over equal-sized rank shards, which gives the mean over all
(sample, timestep) pairs of the round (``learner.losses``'s contract).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from learner.elbo import FlowWeighting, NoiseDraw, flow_elbo, select_sampler_timesteps
from learner.losses import GlobalNormalizer, LossConfig
from learner.microbatch import make_noise_draw, merge_metrics, microbatch_loss
from learner.old_policy import ema_update_, get_schedule
from learner.trajectory import flow_grpo_microbatch_loss
from policy.base import Policy
from policy.lora import add_lora, trainable_keys
from policy.state import StateDict, checksum, to_numpy_state
from rollout.samplers import flow_timesteps
from services.config import LearnerConfig, LoraConfig, SamplingConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainBatch:
    """One rank's share of a round: samples, their prompts, advantages and provenance.

    Every random draw of the update (ELBO timesteps, noise) derives from ``(seed, sample_id)``
    alone, so the update does not depend on how samples are split over ranks or microbatches.

    ``x0`` (B, *sample_shape) final samples; ``advantages`` (B,); ``versions`` (B,) the
    sampling-policy version that generated each sample; ``trajectory`` (B, S+1, ...) and
    ``log_probs`` (B, S) only for the trajectory estimator.
    """

    sample_ids: np.ndarray
    group_ids: np.ndarray
    x0: Tensor
    prompts: list[str]
    advantages: Tensor
    versions: np.ndarray
    seed: int
    trajectory: Tensor | None = None
    log_probs: Tensor | None = None
    keep: np.ndarray | None = None  # (B,) bool: samples in the loss (None: all)
    total_kept: int | None = None  # kept samples over all ranks (None: B x world size)


def deepspeed_config(cfg: LearnerConfig) -> dict[str, Any]:
    """The DeepSpeed config for one learner: ZeRO stage, clip, caller-managed accumulation."""
    return {
        "train_micro_batch_size_per_gpu": cfg.microbatch_size,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class LearnerEngine:
    """One rank: current policy under DeepSpeed, old (sampling) and reference copies."""

    def __init__(
        self,
        policy: Policy,
        cfg: LearnerConfig,
        sampling: SamplingConfig,
        seed: int,
        lora: LoraConfig | None = None,
    ):
        import deepspeed

        self.cfg, self.sampling, self.seed = cfg, sampling, seed
        self.loss_cfg = LossConfig(
            loss=cfg.loss,
            weighting=cfg.elbo_weighting,
            prediction="velocity" if policy.prediction_type == "flow" else "epsilon",
            clip_eps=cfg.clip_eps,
            adv_clip_max=cfg.adv_clip,
            beta=cfg.kl_beta,
            cfg_scale=sampling.guidance,
        )
        self.schedule = get_schedule(cfg.old_policy_schedule)
        # The reference is the base model: copied before any adapter is added.
        self.ref = copy.deepcopy(policy).requires_grad_(False).eval() if cfg.kl_beta > 0 else None
        if lora is not None and lora.rank > 0:
            add_lora(policy, lora)
        self.keys = trainable_keys(policy)  # what trains, what the EMA and broadcast cover
        self.old = copy.deepcopy(policy).requires_grad_(False).eval()
        # The sampling weights of earlier versions, for rollouts that lag (one-step async).
        self.lagged: dict[int, Policy] = {}
        optimizer = torch.optim.AdamW(
            [p for p in policy.parameters() if p.requires_grad],
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
        )
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.engine, *_ = deepspeed.initialize(
            model=policy, optimizer=optimizer, config=deepspeed_config(cfg)
        )
        self.policy: Policy = policy
        self.version = 0  # the sampling-policy version that ``sampling_state`` returns
        self.rank = int(torch.distributed.get_rank())
        self.world_size = int(torch.distributed.get_world_size())
        sigmas = flow_timesteps(sampling.num_steps, sampling.shift)
        self.sigmas = sigmas  # (S + 1,) the rollout sampler's grid, 1 -> 0

    # ----------------------------------------------------------------- weights
    @contextmanager
    def _full_params(self) -> Iterator[None]:
        """Gather ZeRO-3 partitioned parameters for reading (no-op for stages 0-2)."""
        if self.cfg.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.policy.parameters())):
                yield
        else:
            yield

    def sampling_state(self) -> tuple[int, StateDict, str]:
        """``(version, weights, checksum)`` of the sampling (old) policy, to publish."""
        state = to_numpy_state(self.old, self.keys)
        return self.version, state, checksum(state)

    def current_state(self) -> StateDict:
        """The trained (current) weights, e.g. for evaluation."""
        with self._full_params():
            return to_numpy_state(self.policy, self.keys)

    def _old_for(self, version: int) -> Policy:
        if version == self.version:
            return self.old
        if version not in self.lagged:
            raise ValueError(
                f"rollout from policy version {version}, but the learner only holds versions "
                f"{sorted([self.version, *self.lagged])}; a rollout lagging more than one "
                "update cannot be importance-weighted"
            )
        return self.lagged[version]

    def _update_old(self) -> float:
        step = int(self.engine.global_steps)
        self.lagged = {self.version: copy.deepcopy(self.old)}  # keep exactly one lagged version
        with self._full_params():
            sd, old_sd = self.policy.state_dict(), self.old.state_dict()
            decay = self.schedule(step)
            ema_update_(
                {k: old_sd[k] for k in self.keys}, {k: sd[k].detach() for k in self.keys}, decay
            )
        self.version += 1
        return decay

    # ----------------------------------------------------------------- training
    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step on this rank's shard; returns this rank's metrics.

        Every rank makes the same sequence of collective calls whatever its data: one backward
        per (microbatch, timestep index), a zero loss where nothing is kept, then one vote on
        whether any rank met a non-finite loss. If one did, no rank backpropagates it and the
        step is applied with learning rate 0 (weights unchanged, ``learner/skipped_step`` = 1).
        """
        start = time.monotonic()
        n = batch.x0.shape[0]
        keep = batch.keep if batch.keep is not None else np.ones(n, dtype=bool)
        total = batch.total_kept if batch.total_kept is not None else n * self.world_size
        if keep.shape != (n,):
            raise ValueError(f"keep mask of shape {keep.shape} for {n} samples")
        self.policy.train()
        norm_samples = max(total, 1) / self.world_size
        metrics: list[dict[str, float]] = []
        bad = 0
        for lo in range(0, n, self.cfg.microbatch_size):
            rows = np.arange(lo, min(lo + self.cfg.microbatch_size, n))
            m, b = self._microbatch(batch, rows[keep[rows]], norm_samples, stand_in=lo)
            metrics += m
            bad += b
        skipped = self._vote_skip(bad)
        self._step(skipped)
        improvement = self._improvement(batch, keep) if not skipped else float("nan")
        decay = self._update_old() if not skipped else float("nan")
        out = merge_metrics(metrics) if metrics else {}
        out["learner/improvement"] = improvement
        kept_versions = batch.versions[keep]
        out.update(
            {
                "learner/old_decay": decay,
                "learner/version": float(self.version),
                "learner/lag_mean": float(np.mean(self.version - 1 + skipped - kept_versions))
                if kept_versions.size
                else 0.0,
                "learner/skipped_step": float(skipped),
                "learner/nonfinite_losses": float(bad),
                "learner/samples": float(keep.sum()),
                "timing/learner_step": time.monotonic() - start,
            }
        )
        return out

    def _vote_skip(self, bad: int) -> bool:
        """True on every rank when any rank met a non-finite loss this step."""
        flag = torch.tensor([float(bad > 0)])
        if self.world_size > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def _step(self, skipped: bool) -> None:
        """``engine.step()``; with learning rate 0 when the step is skipped."""
        groups = self.engine.optimizer.param_groups
        saved = [g["lr"] for g in groups]
        if skipped:
            for g in groups:
                g["lr"] = 0.0
        try:
            self.engine.step()
        finally:
            for g, lr in zip(groups, saved, strict=True):
                g["lr"] = lr

    def _zero_loss(self, batch: TrainBatch, row: int) -> Tensor:
        """0 x a real one-sample loss: zero gradients, produced by the same graph as a real
        microbatch. ZeRO-2 reduces gradients in the order autograd produces them, so every
        rank's backward must run the same graph even where it has nothing to train on."""
        rows = torch.tensor([row])
        cond = self.policy.encode_prompts([batch.prompts[row]])
        adv = torch.zeros(1)
        if self.cfg.estimator == "trajectory":
            assert batch.trajectory is not None and batch.log_probs is not None
            loss, _ = flow_grpo_microbatch_loss(
                self.engine,
                self.ref,
                batch.trajectory[rows],
                self.sigmas,
                batch.log_probs[rows],
                torch.zeros(1, dtype=torch.long),
                cond,
                adv,
                GlobalNormalizer(num_samples=1, num_timesteps=1),
                eta=self.sampling.eta,
                clip_eps=self.cfg.clip_eps,
                adv_clip_max=self.cfg.adv_clip,
                beta=self.cfg.kl_beta,
            )
            return loss * 0.0
        x0 = batch.x0[rows]
        t, noise = self._draws(self._noise_ids(batch)[[row]], batch.seed, tuple(x0.shape[1:]))
        draw = make_noise_draw(x0, t[:, 0], self.loss_cfg, noise=noise[:, 0])
        loss, _ = microbatch_loss(
            self.engine,
            self._old_for(int(batch.versions[row])),
            self.ref,
            x0,
            cond,
            adv,
            draw,
            self.loss_cfg,
            GlobalNormalizer(num_samples=1, num_timesteps=1),
        )
        return loss * 0.0

    def _backward(self, loss: Tensor | None, batch: TrainBatch, stand_in: int) -> int:
        """Backpropagate ``loss``, or a zero loss (on row ``stand_in``) when it is None or
        non-finite; returns 1 if it was non-finite."""
        bad = loss is not None and not bool(torch.isfinite(loss))
        if bad:
            log.warning("non-finite loss %s: this step will be skipped", float(loss))  # type: ignore[arg-type]
        if loss is None or bad:
            loss = self._zero_loss(batch, stand_in)
        self.engine.backward(loss, scale_wrt_gas=False)
        return int(bad)

    def _microbatch(
        self, batch: TrainBatch, rows_np: np.ndarray, norm_samples: float, stand_in: int
    ) -> tuple[list[dict[str, float]], int]:
        k = self.cfg.num_timesteps if self.cfg.estimator == "elbo" else None
        if self.cfg.estimator == "trajectory":
            assert batch.log_probs is not None or not len(rows_np)
            k = batch.log_probs.shape[1] if batch.log_probs is not None else 1
        assert k is not None
        if not len(rows_np):
            return [], sum(self._backward(None, batch, stand_in) for _ in range(k))
        rows = torch.from_numpy(rows_np)
        cond = self.policy.encode_prompts([batch.prompts[i] for i in rows_np])
        adv = batch.advantages[rows].float()
        if self.cfg.estimator == "trajectory":
            return self._trajectory_microbatch(batch, rows, cond, adv, norm_samples, stand_in)
        x0, versions = batch.x0[rows], batch.versions[rows_np]
        t, noise = self._draws(self._noise_ids(batch)[rows_np], batch.seed, tuple(x0.shape[1:]))
        norm = GlobalNormalizer(num_samples=norm_samples, num_timesteps=k)
        out, bad = [], 0
        for j in range(k):
            total: Tensor | None = None
            for version in np.unique(versions):  # one backward per j, whatever the versions
                sub = torch.from_numpy(np.flatnonzero(versions == version))
                draw = make_noise_draw(x0[sub], t[sub, j], self.loss_cfg, noise=noise[sub, j])
                loss, m = microbatch_loss(
                    self.engine,
                    self._old_for(int(version)),
                    self.ref,
                    x0[sub],
                    self.policy.select(cond, sub),
                    adv[sub],
                    draw,
                    self.loss_cfg,
                    norm,
                )
                _inject_nan(self, loss)
                total = loss if total is None else total + loss
                out.append(m)
            bad += self._backward(total, batch, stand_in)
        return out, bad

    @torch.no_grad()
    def _improvement(self, batch: TrainBatch, keep: np.ndarray) -> float:
        """``mean(A (E_new - E_old))`` on the first kept microbatch after the step (timestep 0).

        Positive when the update moved likelihood towards high-advantage samples: the
        policy-improvement signal the surrogate losses aim for (a check, not trained on).
        """
        if self.cfg.estimator != "elbo" or self.loss_cfg.prediction != "velocity":
            return float("nan")
        idx = np.flatnonzero(keep)[: self.cfg.microbatch_size]
        if not idx.size:
            return float("nan")
        rows = torch.from_numpy(idx)
        x0, adv = batch.x0[rows], batch.advantages[rows].float()
        versions = batch.versions[idx]
        cond = self.policy.encode_prompts([batch.prompts[i] for i in idx])
        t, noise = self._draws(self._noise_ids(batch)[idx], batch.seed, tuple(x0.shape[1:]))
        total = 0.0
        for version in np.unique(versions):
            sub = torch.from_numpy(np.flatnonzero(versions == version))
            draw = make_noise_draw(x0[sub], t[sub, 0], self.loss_cfg, noise=noise[sub, 0])
            cs = self.policy.select(cond, sub)
            e_new = self._elbo(self.engine, x0[sub], cs, draw)
            e_old = self._elbo(self._old_for(int(version)), x0[sub], cs, draw)
            total += float((adv[sub] * (e_new - e_old)).sum())
        return total / x0.shape[0]

    def _elbo(self, model: Any, x0: Tensor, cond: Any, draw: NoiseDraw) -> Tensor:
        return flow_elbo(
            model,
            x0,
            cond,
            draw,
            weighting=cast(FlowWeighting, self.loss_cfg.weighting),
            cfg_scale=self.loss_cfg.cfg_scale,
        ).elbo

    def _noise_ids(self, batch: TrainBatch) -> np.ndarray:
        """What keys the ELBO draws: each sample, or (``group_shared_noise``) its prompt group."""
        return batch.group_ids if self.cfg.group_shared_noise else batch.sample_ids

    def _draws(
        self, sample_ids: np.ndarray, seed: int, shape: tuple[int, ...]
    ) -> tuple[Tensor, Tensor]:
        """Per sample: K distinct sampler timesteps (B, K) and fresh eps (B, K, *shape)."""
        k = self.cfg.num_timesteps
        ts, eps = [], []
        for sid in sample_ids:
            g = torch.Generator().manual_seed(_mix(seed, int(sid)))
            ts.append(select_sampler_timesteps(self.sigmas[:-1], 1, k, generator=g)[1][0])
            eps.append(torch.randn((k, *shape), generator=g))
        return torch.stack(ts), torch.stack(eps)

    def _trajectory_microbatch(
        self,
        batch: TrainBatch,
        rows: Tensor,
        cond: Any,
        adv: Tensor,
        norm_samples: float,
        stand_in: int,
    ) -> tuple[list[dict[str, float]], int]:
        if batch.trajectory is None or batch.log_probs is None:
            raise ValueError("the trajectory estimator needs SDE rollouts with log-probs")
        traj, logp = batch.trajectory[rows], batch.log_probs[rows]
        steps = logp.shape[1]
        norm = GlobalNormalizer(num_samples=norm_samples, num_timesteps=steps)
        order = torch.stack(
            [
                torch.randperm(
                    steps, generator=torch.Generator().manual_seed(_mix(batch.seed, int(s)))
                )
                for s in batch.sample_ids[rows.numpy()]
            ]
        )
        out, bad = [], 0
        for j in range(steps):
            loss, m = flow_grpo_microbatch_loss(
                self.engine,
                self.ref,
                traj,
                self.sigmas,
                logp,
                order[:, j],
                cond,
                adv,
                norm,
                eta=self.sampling.eta,
                clip_eps=self.cfg.clip_eps,
                adv_clip_max=self.cfg.adv_clip,
                beta=self.cfg.kl_beta,
            )
            _inject_nan(self, loss)
            bad += self._backward(loss, batch, stand_in)
            out.append(m)
        return out, bad

    # ----------------------------------------------------------------- checkpoints
    def save(self, directory: Path) -> None:
        """DeepSpeed state (model, optimizer; per rank) plus the old/lagged policies."""
        self.engine.save_checkpoint(str(directory / "deepspeed"), tag="state")
        if self.rank == 0:
            extra = {
                "version": self.version,
                "old": self.old.state_dict(),
                "lagged": {v: m.state_dict() for v, m in self.lagged.items()},
            }
            torch.save(extra, directory / "learner_extra.pt")

    def load(self, directory: Path) -> None:
        """Restore what ``save`` wrote (every rank reads the shared extra file)."""
        path, _ = self.engine.load_checkpoint(str(directory / "deepspeed"), tag="state")
        if path is None:
            raise ValueError(f"no DeepSpeed checkpoint under {directory / 'deepspeed'}")
        extra = torch.load(directory / "learner_extra.pt", weights_only=True)
        self.version = int(extra["version"])
        self.old.load_state_dict(extra["old"])
        self.lagged = {}
        for v, sd in extra["lagged"].items():
            m = copy.deepcopy(self.old)
            m.load_state_dict(sd)
            self.lagged[int(v)] = m


def _mix(seed: int, sample_id: int) -> int:
    """A 63-bit seed for one sample of one round (splitmix-style integer hash)."""
    z = (seed * 0x9E3779B97F4A7C15 + sample_id + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def _inject_nan(engine: LearnerEngine, loss: Tensor) -> None:
    """Fault injection for the reliability tests: ``ELBORL_FAULT_NAN_LOSS`` lists learner
    steps (1-based, comma-separated, or ``all``) whose losses become NaN. Unset: nothing."""
    spec = os.environ.get("ELBORL_FAULT_NAN_LOSS")
    if not spec:
        return
    step = int(engine.engine.global_steps) + 1
    if spec == "all" or str(step) in spec.split(","):
        with torch.no_grad():
            loss.mul_(float("nan"))
