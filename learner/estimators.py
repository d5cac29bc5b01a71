"""Likelihood estimators as strategies the learner engine calls (``learner.estimator``).

An estimator turns one microbatch of a ``TrainBatch`` into a sequence of losses, one per term
index (an ELBO timestep, or a trajectory step), each summed over the sampling versions in the
microbatch; the engine backpropagates each before asking for the next (gradient
accumulation). It also makes the zero loss a rank backpropagates when it has nothing to train
on (the same graph, so ZeRO-2's bucketed reductions stay in step across ranks).

- ``elbo``: the final-sample ELBO (``algo.microbatch.microbatch_loss``): K timesteps per
  sample drawn from the rollout sampler's own grid, fresh eps each, one shared draw for the
  current, old and reference passes.
- ``trajectory``: the Flow-GRPO baseline (``algo.trajectory``): the stored SDE trajectory's
  per-step log-probs, every step in a per-sample random order, with the configured loss on
  ``E = log p(x_{i+1} | x_i)``.

Adding one is a subclass plus ``@register_estimator``; nothing in the engine names them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import Tensor

from algo.elbo import NoiseDraw, flow_elbo, select_sampler_timesteps
from algo.losses import GlobalNormalizer, LossConfig
from algo.microbatch import make_noise_draw, microbatch_loss
from algo.registry import Registry
from algo.seeds import sample_seed
from algo.trajectory import flow_grpo_microbatch_loss
from learner.batch import TrainBatch

TermLoss = tuple[Tensor, list[dict[str, float]]]
"""One term index's loss (summed over versions) and its metrics (one dict per pass)."""


class LearnerView(Protocol):
    """What an estimator reads from the engine (``learner.engine.LearnerEngine``)."""

    @property
    def model(self) -> Any: ...  # the trained policy's forward under DeepSpeed
    @property
    def policy(self) -> Any: ...  # the trained ``Policy`` (prompt encoding)
    @property
    def ref(self) -> Any: ...  # the reference policy, or None when kl_beta == 0
    @property
    def sigmas(self) -> Tensor: ...  # the rollout sampler's grid (S + 1,), 1 -> 0
    @property
    def loss_cfg(self) -> LossConfig: ...
    @property
    def num_timesteps(self) -> int: ...
    @property
    def group_shared_noise(self) -> bool: ...
    @property
    def eta(self) -> float: ...
    @property
    def device(self) -> torch.device: ...  # where the rank's model, batch and draws are

    def old_for(self, version: int) -> Any: ...


class Estimator(ABC):
    """A likelihood estimator: per-term losses of a microbatch, and its stand-in zero loss."""

    name: ClassVar[str]
    needs_trajectory: ClassVar[bool] = False  # needs stochastic rollouts' states and log-probs

    @abstractmethod
    def num_terms(self, ctx: LearnerView, batch: TrainBatch) -> int:
        """Terms (timesteps, steps) per sample: the K of the loss normaliser."""

    @abstractmethod
    def losses(
        self, ctx: LearnerView, batch: TrainBatch, rows: np.ndarray, norm_samples: float
    ) -> Iterator[TermLoss]:
        """One loss per term index for the samples ``rows`` of ``batch`` (non-empty)."""

    @abstractmethod
    def zero_loss(self, ctx: LearnerView, batch: TrainBatch, row: int) -> Tensor:
        """0 x a real one-sample loss on ``row``: zero gradients from the real graph."""

    def improvement(self, ctx: LearnerView, batch: TrainBatch, rows: np.ndarray) -> float:
        """A policy-improvement check after the step on samples ``rows`` (NaN: undefined)."""
        return float("nan")


ESTIMATORS: Registry[Estimator] = Registry("likelihood estimator", "learner.estimator")


def register_estimator(cls: type[Estimator]) -> type[Estimator]:
    """Class decorator: register one instance of an ``Estimator`` under ``cls.name``."""
    ESTIMATORS.add(cls.name, cls())
    return cls


@register_estimator
class ElboEstimator(Estimator):
    """The final-sample ELBO with shared noise (DESIGN.md section 1)."""

    name = "elbo"

    def num_terms(self, ctx: LearnerView, batch: TrainBatch) -> int:
        return ctx.num_timesteps

    def losses(
        self, ctx: LearnerView, batch: TrainBatch, rows: np.ndarray, norm_samples: float
    ) -> Iterator[TermLoss]:
        index = torch.from_numpy(rows)
        cond = ctx.policy.encode_prompts([batch.prompts[i] for i in rows])
        adv = batch.advantages[index].float()
        x0, versions = batch.x0[index], batch.versions[rows]
        t, noise = self.draws(ctx, _noise_ids(ctx, batch)[rows], batch.seed, tuple(x0.shape[1:]))
        norm = GlobalNormalizer(num_samples=norm_samples, num_timesteps=ctx.num_timesteps)
        for j in range(ctx.num_timesteps):
            total: Tensor | None = None
            metrics = []
            for version in np.unique(versions):  # one backward per j, whatever the versions
                sub = torch.from_numpy(np.flatnonzero(versions == version))
                draw = make_noise_draw(x0[sub], t[sub, j], ctx.loss_cfg, noise=noise[sub, j])
                loss, m = microbatch_loss(
                    ctx.model,
                    ctx.old_for(int(version)),
                    ctx.ref,
                    x0[sub],
                    ctx.policy.select(cond, sub),
                    adv[sub],
                    draw,
                    ctx.loss_cfg,
                    norm,
                )
                total = loss if total is None else total + loss
                metrics.append(m)
            assert total is not None
            yield total, metrics

    def zero_loss(self, ctx: LearnerView, batch: TrainBatch, row: int) -> Tensor:
        rows = torch.tensor([row])
        cond = ctx.policy.encode_prompts([batch.prompts[row]])
        x0 = batch.x0[rows]
        t, noise = self.draws(ctx, _noise_ids(ctx, batch)[[row]], batch.seed, tuple(x0.shape[1:]))
        draw = make_noise_draw(x0, t[:, 0], ctx.loss_cfg, noise=noise[:, 0])
        loss, _ = microbatch_loss(
            ctx.model,
            ctx.old_for(int(batch.versions[row])),
            ctx.ref,
            x0,
            cond,
            torch.zeros(1, device=x0.device),
            draw,
            ctx.loss_cfg,
            GlobalNormalizer(num_samples=1, num_timesteps=1),
        )
        return loss * 0.0

    @torch.no_grad()
    def improvement(self, ctx: LearnerView, batch: TrainBatch, rows: np.ndarray) -> float:
        """``mean(A (E_new - E_old))`` on ``rows`` (the first kept microbatch) after the step,
        at timestep index 0.

        Positive when the update moved likelihood towards high-advantage samples: the
        policy-improvement signal the surrogate losses aim for (a check, not trained on).
        """
        idx = rows
        if ctx.loss_cfg.prediction != "velocity" or not idx.size:
            return float("nan")
        index = torch.from_numpy(idx)
        x0, adv = batch.x0[index], batch.advantages[index].float()
        versions = batch.versions[idx]
        cond = ctx.policy.encode_prompts([batch.prompts[i] for i in idx])
        t, noise = self.draws(ctx, _noise_ids(ctx, batch)[idx], batch.seed, tuple(x0.shape[1:]))
        total = 0.0
        for version in np.unique(versions):
            sub = torch.from_numpy(np.flatnonzero(versions == version))
            draw = make_noise_draw(x0[sub], t[sub, 0], ctx.loss_cfg, noise=noise[sub, 0])
            cs = ctx.policy.select(cond, sub)
            e_new = _elbo(ctx, ctx.model, x0[sub], cs, draw)
            e_old = _elbo(ctx, ctx.old_for(int(version)), x0[sub], cs, draw)
            total += float((adv[sub] * (e_new - e_old)).sum())
        return total / x0.shape[0]

    @staticmethod
    def draws(
        ctx: LearnerView, sample_ids: np.ndarray, seed: int, shape: tuple[int, ...]
    ) -> tuple[Tensor, Tensor]:
        """Per sample: K distinct sampler timesteps (B, K) and fresh eps (B, K, *shape)."""
        k = ctx.num_timesteps
        ts, eps = [], []
        for sid in sample_ids:
            g = torch.Generator().manual_seed(sample_seed(seed, int(sid)))
            ts.append(select_sampler_timesteps(ctx.sigmas[:-1], 1, k, generator=g)[1][0])
            eps.append(torch.randn((k, *shape), generator=g))
        # Drawn on the CPU (the same draws on any device and rank split), used where x0 is.
        return torch.stack(ts).to(ctx.device), torch.stack(eps).to(ctx.device)


@register_estimator
class TrajectoryEstimator(Estimator):
    """Per-step SDE log-probs of the stored trajectory (the Flow-GRPO baseline)."""

    name = "trajectory"
    needs_trajectory = True

    def num_terms(self, ctx: LearnerView, batch: TrainBatch) -> int:
        return batch.log_probs.shape[1] if batch.log_probs is not None else 1

    def losses(
        self, ctx: LearnerView, batch: TrainBatch, rows: np.ndarray, norm_samples: float
    ) -> Iterator[TermLoss]:
        if batch.trajectory is None or batch.log_probs is None:
            raise ValueError("the trajectory estimator needs SDE rollouts with log-probs")
        index = torch.from_numpy(rows)
        cond = ctx.policy.encode_prompts([batch.prompts[i] for i in rows])
        adv = batch.advantages[index].float()
        traj, logp = batch.trajectory[index], batch.log_probs[index]
        steps = logp.shape[1]
        norm = GlobalNormalizer(num_samples=norm_samples, num_timesteps=steps)
        order = torch.stack(
            [
                torch.randperm(
                    steps, generator=torch.Generator().manual_seed(sample_seed(batch.seed, int(s)))
                )
                for s in batch.sample_ids[rows]
            ]
        )
        for j in range(steps):
            yield self._loss(ctx, traj, logp, order[:, j], cond, adv, norm)

    def zero_loss(self, ctx: LearnerView, batch: TrainBatch, row: int) -> Tensor:
        assert batch.trajectory is not None and batch.log_probs is not None
        rows = torch.tensor([row])
        cond = ctx.policy.encode_prompts([batch.prompts[row]])
        loss, _ = self._loss(
            ctx,
            batch.trajectory[rows],
            batch.log_probs[rows],
            torch.zeros(1, dtype=torch.long),
            cond,
            torch.zeros(1, device=batch.trajectory.device),
            GlobalNormalizer(num_samples=1, num_timesteps=1),
        )
        return loss * 0.0

    @staticmethod
    def _loss(
        ctx: LearnerView,
        traj: Tensor,
        logp: Tensor,
        step_index: Tensor,
        cond: Any,
        adv: Tensor,
        norm: GlobalNormalizer,
    ) -> TermLoss:
        cfg = ctx.loss_cfg
        loss, m = flow_grpo_microbatch_loss(
            ctx.model,
            ctx.ref,
            traj,
            ctx.sigmas,
            logp,
            step_index,
            cond,
            adv,
            norm,
            eta=ctx.eta,
            clip_eps=cfg.clip_eps,
            adv_clip_max=cfg.adv_clip_max,
            beta=cfg.beta,
            loss=cfg.loss,
        )
        return loss, [m]


def _noise_ids(ctx: LearnerView, batch: TrainBatch) -> np.ndarray:
    """What keys the ELBO draws: each sample, or (``group_shared_noise``) its prompt group."""
    return batch.group_ids if ctx.group_shared_noise else batch.sample_ids


def _elbo(ctx: LearnerView, model: Any, x0: Tensor, cond: Any, draw: NoiseDraw) -> Tensor:
    return flow_elbo(
        model,
        x0,
        cond,
        draw,
        weighting=ctx.loss_cfg.weighting,
        cfg_scale=ctx.loss_cfg.cfg_scale,
    ).elbo
