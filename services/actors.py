"""Thin Ray actors around the components: rollout workers, reward workers, learner ranks.

Each actor builds its component from the config sub-tree it needs and forwards calls. Data
moves between actors as ObjectRefs: a rollout's images go straight to a reward actor, its
samples straight to a learner rank; the driver only moves small things (rewards,
advantages, metrics) and the few images it logs.

The classes are plain Python; ``services.roles`` makes them Ray actors (``ray.remote``) when
it starts a role, so a test can start a subclass of one instead (e.g. a learner whose engine
makes a loss non-finite at a given step) without any hook in the library.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from learner.config import LearnerConfig
from policy.config import ModelConfig
from rewards.config import RewardSpec
from rollout.config import EvalConfig, SamplingConfig
from worlds.base import WorldConfig


def _threads(num: int) -> None:
    """Pin torch's intra-op threads: oversubscribed CPUs make every actor much slower."""
    os.environ["OMP_NUM_THREADS"] = str(num)
    torch.set_num_threads(num)


def hide_unassigned_gpus(gpu_ids: list[Any]) -> None:
    """An actor Ray gave no GPU sees none: Ray leaves ``CUDA_VISIBLE_DEVICES`` alone for a
    zero-GPU actor (``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO`` is off by default), so a reward
    model with ``device: auto`` on a GPU node would otherwise take GPU 0 from under the roles
    that reserved it. Call before anything initialises CUDA."""
    if not gpu_ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def _load_policy(
    model: ModelConfig, image_size: int, with_lora: bool, text_encoders: bool = True
) -> Any:
    """The configured policy on this actor's device (``model.device``)."""
    from policy.io import model_from_config
    from policy.lora import add_lora
    from policy.placement import resolve_device

    policy = model_from_config(model, image_size, text_encoders)
    if with_lora and model.lora.rank > 0:
        policy = add_lora(policy, model.lora)
    device = resolve_device(model.device, has_gpus=bool(ray.get_gpu_ids()))
    return policy.place(device, model.text_encoder_device)


class Actor:
    """What every role's actor answers: where it runs."""

    def node_id(self) -> str:
        return str(ray.get_runtime_context().get_node_id())

    def pid(self) -> int:
        return os.getpid()


class RolloutWorker(Actor):
    """Holds the sampling policy; generates K-image groups tagged with its version."""

    def __init__(
        self, model: ModelConfig, sampling: SamplingConfig, world: WorldConfig, threads: int
    ):
        from rollout.engine import RolloutEngine
        from worlds.base import make_world

        _threads(threads)
        self.engine = RolloutEngine(_load_policy(model, world.image_size, with_lora=True), sampling)
        self.world = make_world(world)

    def load_weights(self, state: dict[str, np.ndarray], version: int) -> Any:
        """Load a published weight dict (resolved from its ObjectRef, zero-copy)."""
        return self.engine.load_weights(state, version)

    @ray.method(num_returns=3)
    def generate(
        self, prompts: list[str], sample_ids: np.ndarray, group_ids: np.ndarray, seed: int
    ) -> tuple[Any, Any, Any]:
        """Three ObjectRefs: a small ``RolloutReceipt`` the driver reads to learn that the
        rollout succeeded, ``RolloutImages`` for rewards, ``RolloutSamples`` for the learner."""
        from rollout.engine import RolloutReceipt

        images, samples = self.engine.generate(prompts, sample_ids, group_ids, seed)
        metadata = [self.world.metadata(p) for p in prompts]
        if any(m is not None for m in metadata):  # for the rewards that read it (GenEval)
            images = dataclasses.replace(images, metadata=metadata)
        return RolloutReceipt(len(prompts), images.version, images.seconds), images, samples

    def evaluate(
        self, state: dict[str, np.ndarray] | None, prompts: list[str], cfg: EvalConfig, seed: int
    ) -> Any:
        """An ``EvalResult`` of ``state`` (e.g. the current weights) on held-out prompts."""
        return self.engine.evaluate(state, self.world, prompts, cfg, seed)


class RewardWorker(Actor):
    """Scores rollout images with the configured weighted rewards."""

    def __init__(self, specs: list[RewardSpec], threads: int):
        from rewards.pool import RewardScorer

        _threads(threads)
        hide_unassigned_gpus(ray.get_gpu_ids())  # rewards.resources.num_gpus = 0: the CPU
        self.scorer = RewardScorer(specs)

    def score(self, images: Any) -> Any:
        """Score one ``RolloutImages`` (passed by ObjectRef from the rollout worker)."""
        return self.scorer.score(images)


class LearnerWorker(Actor):
    """One rank of the DeepSpeed learner group."""

    engine_class: Any = None  # ``learner.engine.LearnerEngine`` unless a subclass says otherwise

    def __init__(self, rank: int, world_size: int, threads: int):
        _threads(threads)
        self.rank, self.world_size = rank, world_size
        self.engine: Any = None

    def rendezvous(self) -> tuple[str, int]:
        """(address, free port) for the process group; asked of rank 0."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(
        self,
        master: tuple[str, int],
        model: ModelConfig,
        cfg: LearnerConfig,
        sampling: SamplingConfig,
        seed: int,
        image_size: int,
    ) -> bool:
        """Join the process group and build the DeepSpeed engine (all ranks call this at once);
        ``image_size`` is the world's (what a real model samples at)."""
        from learner.engine import LearnerEngine

        os.environ.update(
            {
                "RANK": str(self.rank),
                "LOCAL_RANK": "0",
                "WORLD_SIZE": str(self.world_size),
                "MASTER_ADDR": master[0],
                "MASTER_PORT": str(master[1]),
            }
        )
        torch.manual_seed(seed)
        # No text encoders on a learner rank: conditionings come with the samples.
        policy = _load_policy(model, image_size, with_lora=False, text_encoders=False)
        on_gpu = next(policy.parameters()).device.type == "cuda"
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")
        engine_class = self.engine_class or LearnerEngine
        self.engine = engine_class(
            policy,
            cfg,
            sampling,
            seed,
            lora=model.lora,
        )
        return True

    def train_step(
        self,
        sample_refs: list[ray.ObjectRef],
        advantages: np.ndarray,
        keep: np.ndarray,
        total_kept: int,
        seed: int,
    ) -> dict[str, float]:
        """Fetch this rank's rollout samples by ref, attach advantages, take one step.

        ``advantages`` and ``keep`` cover every sample of the chunks, in order; samples whose
        reward was invalid or never came (``keep`` False) are left out of the loss.
        ``total_kept`` counts the kept samples over all ranks (the loss normaliser).
        """
        from learner.batch import TrainBatch

        chunks = ray.get(sample_refs)
        for c in chunks:
            if c.conditions is not None:
                self.engine.policy.add_conditions(c.conditions)
        traj = [c.trajectory for c in chunks]
        logp = [c.log_probs for c in chunks]
        batch = TrainBatch(
            sample_ids=np.concatenate([c.sample_ids for c in chunks]),
            group_ids=np.concatenate([c.group_ids for c in chunks]),
            x0=torch.cat([c.x0 for c in chunks]),
            prompts=[p for c in chunks for p in c.prompts],
            advantages=torch.from_numpy(np.asarray(advantages, dtype=np.float32)),
            versions=np.concatenate([np.full(len(c.prompts), c.version) for c in chunks]),
            seed=seed,
            trajectory=torch.cat(traj) if traj[0] is not None else None,
            log_probs=torch.cat(logp) if logp[0] is not None else None,
            keep=np.asarray(keep, dtype=bool),
            total_kept=int(total_kept),
        )
        out: dict[str, float] = self.engine.train_step(batch)
        return out

    @ray.method(num_returns=2)
    def publish_weights(self) -> tuple[Any, dict[str, np.ndarray]]:
        """(``PublishedWeights``, state): the state becomes one object every rollout worker
        reads."""
        from learner.engine import PublishedWeights

        version, state, crc = self.engine.sampling_state()
        nbytes = sum(v.nbytes for v in state.values())
        # Under ZeRO-3 every rank takes part in the gather; only rank 0's copy is read.
        return PublishedWeights(version, crc, nbytes), state if self.rank == 0 else {}

    def current_state(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = self.engine.current_state()
        return out if self.rank == 0 else {}

    def save(self, directory: str) -> bool:
        self.engine.save(Path(directory))
        return True

    def load(self, directory: str) -> int:
        self.engine.load(Path(directory))
        return int(self.engine.version)
