"""The learner engine: one data-parallel rank of the policy update, under DeepSpeed.

Component layer: torch + DeepSpeed, no Ray. ``services.actors.LearnerWorker`` wraps one
``LearnerEngine`` per rank; the ranks form one torch.distributed group (gloo on CPU, NCCL on
GPU) that the caller sets up through the usual ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/
``MASTER_PORT`` environment variables.

One round on one rank (``train_step``):

1. for each microbatch of this rank's shard, the configured estimator
   (``learner/estimators.py``) yields one loss per term index: for the ELBO, per each of the
   K timesteps (drawn per sample from the rollout sampler's own grid, fresh eps each) one
   shared draw feeds the current (grad), old (no grad; the *version that generated the
   sample*) and reference (no grad, only when beta > 0) passes;
2. ``engine.backward`` after each (accumulating locally: DeepSpeed's unmanaged gradient
   accumulation), then one ``engine.step()`` that all-reduces (averages) gradients over the
   ranks, clips and applies AdamW;
3. the old (sampling) policy moves towards the new weights: ``old <- d old + (1 - d) current``.

Normalisation: the loss functions divide by a ``GlobalNormalizer``; we pass this rank's sample
count, and DeepSpeed *averages* over equal-sized rank shards, which gives the mean over all
(sample, timestep) pairs of the round (``algo.losses``'s contract).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from algo.losses import LossConfig
from algo.microbatch import merge_metrics
from algo.old_policy import get_schedule
from algo.samplers import get_sampler
from common.config import SamplingConfig
from learner.batch import TrainBatch
from learner.config import LearnerConfig
from learner.copies import AdapterCopies, DeepCopies, PolicyCopies, frozen_copy
from learner.estimators import ESTIMATORS
from policy.base import GuidedModel, Policy
from policy.config import LoraConfig
from policy.lora import add_lora, trainable_keys
from policy.state import StateDict, checksum, to_numpy_state

log = logging.getLogger(__name__)

__all__ = [
    "FirstRatioError",
    "LearnerEngine",
    "PublishedWeights",
    "TrainBatch",
    "deepspeed_config",
    "read_trained_weights",
]


class FirstRatioError(RuntimeError):
    """The first step's importance ratios are not 1: the likelihood passes are inconsistent."""


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


@dataclass(frozen=True)
class PublishedWeights:
    """What the driver learns of a weight publication (the weights go by ObjectRef)."""

    version: int
    checksum: str
    bytes: int


class LearnerEngine:
    """One rank: current policy under DeepSpeed, old (sampling) and reference copies."""

    def __init__(
        self,
        policy: Policy,
        cfg: LearnerConfig,
        sampling: SamplingConfig,
        seed: int,
        lora: LoraConfig | None = None,
        copies: Literal["adapters", "deep"] | None = None,
    ):
        """``copies`` chooses how the old, lagged and reference policies are held (None:
        adapters on the one base model for LoRA, deep copies otherwise; tests compare them).
        The rank runs where ``policy`` is (``Policy.place`` first for a GPU); every batch and
        draw moves there."""
        import deepspeed

        self.cfg, self.sampling, self.seed = cfg, sampling, seed
        self.device = next(policy.parameters()).device
        prediction = "velocity" if policy.prediction_type == "flow" else "epsilon"
        self.train_guidance, self.ref_guidance = cfg.guidance_scales(sampling.guidance)
        # The ELBO is divided by the scale its passes are guided with (DESIGN.md section 1);
        # embedded guidance (FLUX.1-dev) is an input of one pass, not a combination: scale 1.
        cfg_scale = self.train_guidance if policy.guidance_mode == "cfg" else 1.0
        self.loss_cfg: LossConfig = cfg.loss_config(prediction, cfg_scale=cfg_scale)
        self.estimator = ESTIMATORS.get(cfg.estimator)
        self.schedule = get_schedule(cfg.old_policy_schedule)
        self.lora = lora is not None and lora.rank > 0
        self.copies = self._hold_copies(policy, lora, copies)
        optimizer = torch.optim.AdamW(
            [p for p in policy.parameters() if p.requires_grad],
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
        )
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        self.engine, *_ = deepspeed.initialize(
            model=policy, optimizer=optimizer, config=deepspeed_config(cfg)
        )
        self.policy: Policy = policy
        self.version = 0  # the sampling-policy version that ``sampling_state`` returns
        self.rank = int(torch.distributed.get_rank())
        self.world_size = int(torch.distributed.get_world_size())
        # (S + 1,) the rollout sampler's own grid, 1 -> 0: the ELBO draws its timesteps from
        # it and the trajectory estimator re-scores its steps on it.
        shift, grid = policy.sampling_grid(sampling.shift, sampling.grid)
        sampler = get_sampler(sampling.sampler)
        self.sigmas = sampler.timesteps(sampling.num_steps, shift, grid=grid).to(self.device)

    def _hold_copies(
        self, policy: Policy, lora: LoraConfig | None, copies: Literal["adapters", "deep"] | None
    ) -> PolicyCopies:
        """Add the adapters (LoRA) and hold the old (sampling), lagged and reference policies:
        frozen adapters on the same base model for LoRA (the reference is the base), deep
        copies for full fine-tuning. Sets ``keys``, the trained parameters."""
        with_ref = self.cfg.kl_beta > 0
        adapters = copies == "adapters" or (copies is None and self.lora)
        if adapters and not self.lora:
            raise ValueError("adapter copies need LoRA (model.lora.rank > 0)")
        # For deep copies the reference is the base model: copied before any adapter is added.
        reference = frozen_copy(policy) if with_ref and not adapters else None
        if lora is not None and self.lora:
            add_lora(policy, lora)
        self.keys = trainable_keys(policy)  # what trains, what the EMA and broadcast cover
        if adapters and lora is not None:
            return AdapterCopies(policy, self.keys, lora, with_ref)
        return DeepCopies(policy, self.keys, reference)

    # ------------------------------------------------- what the estimators read (LearnerView)
    @property
    def model(self) -> Any:
        """The trained policy's forward under DeepSpeed, guided at the training scale."""
        return GuidedModel(self.engine, self.policy, self.train_guidance)

    @property
    def ref(self) -> Any:
        """The reference policy's forward at the reference scale, or None without a KL."""
        ref = self.copies.reference()
        if ref is None:
            return None
        return GuidedModel(ref, self.policy, self.ref_guidance)

    @property
    def num_timesteps(self) -> int:
        return self.cfg.num_timesteps

    @property
    def group_shared_noise(self) -> bool:
        return self.cfg.group_shared_noise

    @property
    def eta(self) -> float:
        return self.sampling.eta

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
        """``(version, weights, checksum)`` of the sampling (old) policy, to publish. Under
        ZeRO-3 every rank must call it (the gather of partitioned parameters is collective)."""
        with self._full_params():
            state = {k: v.detach().cpu().numpy().copy() for k, v in self.copies.old_state().items()}
        return self.version, state, checksum(state)

    def current_state(self) -> StateDict:
        """The trained (current) weights, e.g. for evaluation (every rank calls it under
        ZeRO-3, as ``sampling_state``)."""
        with self._full_params():
            return to_numpy_state(self.policy, self.keys)

    def old_for(self, version: int) -> Any:
        """The forward of the sampling policy of ``version`` (the current one, or the one
        lagged version), guided at the training scale."""
        return GuidedModel(self._old_policy(version), self.policy, self.train_guidance)

    def _old_policy(self, version: int) -> Any:
        if version == self.version:
            return self.copies.old()
        if version != self.copies.lagged_version:
            held = sorted(v for v in (self.version, self.copies.lagged_version) if v is not None)
            raise ValueError(
                f"rollout from policy version {version}, but the learner only holds versions "
                f"{held}; a rollout lagging more than one update cannot be importance-weighted"
            )
        return self.copies.lagged()

    def _update_old(self) -> float:
        step = int(self.engine.global_steps)
        with self._full_params():
            sd = self.policy.state_dict()
            decay = self.schedule(step)
            # The old policy before this update becomes the one lagged version kept.
            self.copies.update({k: sd[k].detach() for k in self.keys}, decay, self.version)
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
        batch = self._on_device(batch)
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
        first_step = self.version == 0 and int(self.engine.global_steps) == 0
        if first_step and not skipped and self.cfg.first_ratio_tol > 0:
            self._check_first_ratio(merge_metrics(metrics) if metrics else {})
        self._step(skipped)
        first = np.flatnonzero(keep)[: self.cfg.microbatch_size]
        improvement = (
            self.estimator.improvement(self, batch, first) if not skipped else float("nan")
        )
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

    def _check_first_ratio(self, metrics: dict[str, float]) -> None:
        """Before the first update current == old, so every ratio is 1 (to float noise) unless
        the passes differ from each other or from the rollouts'. All ranks agree on failing."""
        lo, hi = metrics.get("learner/ratio_min", 1.0), metrics.get("learner/ratio_max", 1.0)
        # Collectives take tensors on the rank's device (NCCL has no CPU tensors).
        off = torch.tensor([max(abs(hi - 1.0), abs(1.0 - lo))], device=self.device)
        if self.world_size > 1:
            torch.distributed.all_reduce(off, op=torch.distributed.ReduceOp.MAX)
        if not off.item() <= self.cfg.first_ratio_tol:  # (NaN fails too)
            raise FirstRatioError(
                f"the first step's importance ratios are up to {off.item():.3g} from 1 "
                f"(learner.first_ratio_tol = {self.cfg.first_ratio_tol}), though the current "
                "and old policies are the same weights; nothing was applied. Likely causes: the "
                "learner's passes guided differently from the rollouts (learner.train_guidance "
                "vs rollout.sampling.guidance for the trajectory baseline), a dtype or device "
                "difference between rollout and learner, dropout active in training mode, or "
                "an adapter left enabled/disabled between passes"
            )

    def _vote_skip(self, bad: int) -> bool:
        """True on every rank when any rank met a non-finite loss this step."""
        flag = torch.tensor([float(bad > 0)], device=self.device)
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

    def _on_device(self, batch: TrainBatch) -> TrainBatch:
        """``batch`` with its tensors on this rank's device (a no-op on the CPU)."""

        def move(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.to(self.device, non_blocking=True)

        x0, adv = batch.x0.to(self.device), batch.advantages.to(self.device)
        traj, logp = move(batch.trajectory), move(batch.log_probs)
        return replace(batch, x0=x0, advantages=adv, trajectory=traj, log_probs=logp)

    def _backward(self, loss: Tensor | None, batch: TrainBatch, stand_in: int) -> int:
        """Backpropagate ``loss``, or a zero loss (on row ``stand_in``) when it is None or
        non-finite; returns 1 if it was non-finite.

        The zero loss is 0 x a real one-sample loss: zero gradients, produced by the same graph
        as a real microbatch. ZeRO-2 reduces gradients in the order autograd produces them, so
        every rank's backward must run the same graph even where it has nothing to train on.
        """
        bad = loss is not None and not bool(torch.isfinite(loss))
        if bad:
            log.warning("non-finite loss %s: this step will be skipped", float(loss))  # type: ignore[arg-type]
        if loss is None or bad:
            loss = self.estimator.zero_loss(self, batch, stand_in)
        self.engine.backward(loss, scale_wrt_gas=False)
        return int(bad)

    def _microbatch(
        self, batch: TrainBatch, rows: np.ndarray, norm_samples: float, stand_in: int
    ) -> tuple[list[dict[str, float]], int]:
        """One backward per term index of the estimator (a zero loss for each when ``rows``,
        this microbatch's kept samples, is empty); the metrics and the non-finite count."""
        if not len(rows):
            k = self.estimator.num_terms(self, batch)
            return [], sum(self._backward(None, batch, stand_in) for _ in range(k))
        out, bad = [], 0
        for loss, metrics in self.estimator.losses(self, batch, rows, norm_samples):
            bad += self._backward(loss, batch, stand_in)
            out += metrics
        return out, bad

    # ----------------------------------------------------------------- checkpoints
    def save(self, directory: Path) -> None:
        """DeepSpeed state (model, optimizer; per rank) plus the old/lagged policies. A LoRA
        run's checkpoint holds the adapters alone: no frozen weights and no buffers (SD3.5-M's
        fixed position table alone is 0.9 GB); both come back from model.path on resume."""
        with _without_buffers(self.policy) if self.lora else contextlib.nullcontext():
            self.engine.save_checkpoint(
                str(directory / "deepspeed"), tag="state", exclude_frozen_parameters=self.lora
            )
        # Every rank gathers (a collective under ZeRO-3); rank 0 writes. The old/lagged
        # policies differ from the base only in ``keys``.
        with self._full_params():
            old, lagged = _on_cpu(self.copies.old_state()), self.copies.lagged_state()
            held = {} if lagged is None else {self.copies.lagged_version: _on_cpu(lagged)}
        extra = {"version": self.version, "old": old, "lagged": held}
        if self.rank == 0:
            torch.save(extra, directory / "learner_extra.pt")

    def load(self, directory: Path) -> None:
        """Restore what ``save`` wrote (every rank reads the shared extra file)."""
        path, _ = self.engine.load_checkpoint(
            str(directory / "deepspeed"), tag="state", load_module_strict=not self.lora
        )
        if path is None:
            raise ValueError(f"no DeepSpeed checkpoint under {directory / 'deepspeed'}")
        extra = torch.load(directory / "learner_extra.pt", weights_only=True)
        self.version = int(extra["version"])
        lagged = [(int(v), sd) for v, sd in extra["lagged"].items()]
        with self._full_params():
            self.copies.load(
                extra["old"], lagged[0][1] if lagged else None, lagged[0][0] if lagged else None
            )


@contextmanager
def _without_buffers(module: torch.nn.Module) -> Iterator[None]:
    """``module.state_dict()`` leaves out every buffer while inside (what DeepSpeed saves as
    the module's state)."""
    names = {name for name, _ in module.named_buffers()}

    def drop(_: torch.nn.Module, state: dict[str, Any], prefix: str, meta: Any) -> None:
        for key in [k for k in state if k.removeprefix(prefix) in names]:
            del state[key]

    handle = module.register_state_dict_post_hook(drop)
    try:
        yield
    finally:
        handle.remove()


def _on_cpu(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def read_trained_weights(directory: Path) -> dict[str, Tensor]:
    """The current (trained) policy's parameters from a learner checkpoint that
    ``LearnerEngine.save`` wrote into ``directory``: every trained tensor (for a LoRA run the
    adapters alone), gathered from the ranks' partitions under ZeRO-3."""
    root = directory / "deepspeed"
    states = root / "state" / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise ValueError(f"{directory} holds no learner checkpoint ({states} is missing)")
    # DeepSpeed's own file, written by this run: it pickles its config alongside the tensors.
    data = torch.load(states, map_location="cpu", weights_only=False)
    if int(data["ds_config"]["zero_optimization"]["stage"]) == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        full: dict[str, Tensor] = get_fp32_state_dict_from_zero_checkpoint(
            str(root), tag="state", exclude_frozen_parameters=True
        )
        return full
    buffers = set(data.get("buffer_names") or [])
    return {k: v for k, v in data["module"].items() if k not in buffers}
