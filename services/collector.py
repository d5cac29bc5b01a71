"""Collecting one round's rollouts and rewards exactly once, surviving dead and hung actors.

Ray's defaults are at-most-once tasks and no actor restarts; turning retries on gives
at-least-once, so a sample could be scored twice. Instead the collector owns recovery and
keeps exactly-once by construction: each chunk of a round has one slot for its rollout and
one for its rewards, and a result is accepted only into an empty slot.

- A rollout worker that dies: the worker is replaced (loading the latest published weights)
  and every chunk it held is generated again, with the same seed, by the replacement.
- A reward actor that dies, or does not answer within ``rewards.timeout_s``, or whose reward
  raises: the chunk is retried (on a replacement for a dead or hung actor) up to
  ``faults.reward_retries`` times, then dropped and counted. Its samples are never trained on.
- A role that can no longer be placed (its node died and no other node has the resources)
  raises ``RunStopped``; the controller then checkpoints the last completed round.

The counters (``counters``) become the ``faults/`` metrics.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

from services.errors import RunStopped
from services.roles import RoleGroup, RolloutGroup
from services.rounds import Chunk, PendingRound

log = logging.getLogger("elborl.driver")


@dataclass
class _Call:
    """One in-flight remote call of a chunk."""

    kind: str  # "rollout" or "reward"
    chunk: Chunk
    actor: Any
    deadline: float
    attempt: int = 1


@dataclass
class _State:
    calls: dict[ray.ObjectRef, _Call] = field(default_factory=dict)
    scored: dict[int, Any] = field(default_factory=dict)
    dropped: set[int] = field(default_factory=set)
    killed: set[Any] = field(default_factory=set)  # actor ids we killed for hanging


class Collector:
    """Exactly-once generate -> score of a round over a rollout and a reward group.

    Args:
        rollouts, rewards: the role groups.
        reward_timeout: ``rewards.timeout_s``, per call and per call queued before it.
        reward_retries: ``faults.reward_retries``.
        timeout: ``train.step_timeout_s``, the longest a round's rollouts may take.
    """

    def __init__(
        self,
        rollouts: RolloutGroup,
        rewards: RoleGroup,
        reward_timeout: float,
        reward_retries: int,
        timeout: float,
    ):
        self.rollouts, self.rewards = rollouts, rewards
        self.reward_timeout, self.reward_retries = reward_timeout, reward_retries
        self.timeout = timeout
        self.counters: Counter[str] = Counter()

    def regenerate(self, ch: Chunk) -> None:
        """Generate chunk ``ch`` again (same prompts and seed) on its worker's current actor."""
        self.counters["chunks_regenerated"] += 1
        ch.receipt, ch.images, ch.samples = self.rollouts[ch.worker].generate.remote(
            ch.prompts, ch.sample_ids, ch.group_ids, ch.seed
        )

    def collect(self, pending: PendingRound) -> list[Any | None]:
        """Every chunk's ``ScoredBatch`` in chunk order, ``None`` for a chunk that was dropped."""
        st = _State()
        limit = time.monotonic() + self.timeout
        for ch in pending.chunks:
            st.calls[ch.receipt] = _Call("rollout", ch, self.rollouts[ch.worker], limit)
        while st.calls:
            now = time.monotonic()
            wait = max(0.0, min(c.deadline for c in st.calls.values()) - now)
            ready, _ = ray.wait(list(st.calls), num_returns=1, timeout=wait)
            if not ready:
                self._expire(st, time.monotonic())
                continue
            call = st.calls.pop(ready[0])
            if call.kind == "rollout":
                self._rollout_done(st, ready[0], call, pending)
            else:
                self._reward_done(st, ready[0], call)
        return [st.scored.get(ch.index) for ch in pending.chunks]

    def _rollout_done(
        self, st: _State, ref: ray.ObjectRef, call: _Call, pending: PendingRound
    ) -> None:
        ch = call.chunk
        try:
            ray.get(ref)
        except RayActorError as exc:
            log.warning("rollout worker %d died during round %d: %s", ch.worker, pending.round, exc)
            if self.rollouts[ch.worker] is call.actor:
                self.rollouts.replace(ch.worker)
            self.regenerate(ch)
            st.calls[ch.receipt] = _Call("rollout", ch, self.rollouts[ch.worker], call.deadline)
            return
        self._submit_reward(st, ch, attempt=1)

    def _submit_reward(self, st: _State, ch: Chunk, attempt: int) -> None:
        actor = self.rewards[ch.index % len(self.rewards)]
        queued = sum(1 for c in st.calls.values() if c.kind == "reward" and c.actor is actor)
        deadline = time.monotonic() + self.reward_timeout * (queued + 1)
        st.calls[actor.score.remote(ch.images)] = _Call("reward", ch, actor, deadline, attempt)

    def _reward_done(self, st: _State, ref: ray.ObjectRef, call: _Call) -> None:
        ch = call.chunk
        try:
            scored = ray.get(ref)
            invalid = int((~scored.valid).sum())
            if invalid:  # NaN / out-of-range / a remote reward's null: left out of the update
                self.counters["invalid_scores"] += invalid
            st.scored[ch.index] = scored
            return
        except ObjectLostError as exc:  # the rollout's images went with their node
            log.warning("chunk %d's images were lost (%s); generating them again", ch.index, exc)
            self.regenerate(ch)
            st.calls[ch.receipt] = _Call(
                "rollout", ch, self.rollouts[ch.worker], time.monotonic() + self.timeout
            )
        except RayActorError as exc:
            slot = ch.index % len(self.rewards)
            ours = call.actor._actor_id.hex() in st.killed
            if not ours:
                log.warning("reward actor %d died scoring chunk %d: %s", slot, ch.index, exc)
                self.counters["reward_actor_deaths"] += 1
            if self.rewards[slot] is call.actor:
                self.rewards.replace(slot)
            # A call that died with an actor we killed for another chunk's hang costs no attempt.
            self._retry(st, ch, call.attempt if ours else call.attempt + 1)
        except RayTaskError as exc:
            log.warning("reward failed on chunk %d (attempt %d): %s", ch.index, call.attempt, exc)
            self.counters["reward_errors"] += 1
            self._retry(st, ch, call.attempt + 1)

    def _retry(self, st: _State, ch: Chunk, attempt: int) -> None:
        if attempt > self.reward_retries + 1:
            log.error(
                "chunk %d: no reward after %d attempts; its %d samples are dropped",
                ch.index,
                attempt - 1,
                len(ch.sample_ids),
            )
            st.dropped.add(ch.index)
            self.counters["samples_dropped"] += len(ch.sample_ids)
            return
        self.counters["reward_retries"] += 1
        self._submit_reward(st, ch, attempt)

    def _expire(self, st: _State, now: float) -> None:
        """Deal with every call past its deadline: a hung reward actor is killed and replaced."""
        for ref, call in list(st.calls.items()):
            if call.deadline > now:
                continue
            if call.kind == "rollout":
                raise RunStopped(
                    f"rollout of chunk {call.chunk.index} did not finish within "
                    f"train.step_timeout_s = {self.timeout:.0f} s"
                )
            slot = call.chunk.index % len(self.rewards)
            log.warning(
                "reward actor %d did not answer chunk %d within rewards.timeout_s = %.1f s; "
                "replacing it",
                slot,
                call.chunk.index,
                self.reward_timeout,
            )
            self.counters["reward_timeouts"] += 1
            del st.calls[ref]
            if self.rewards[slot] is call.actor:
                st.killed.add(call.actor._actor_id.hex())
                ray.kill(call.actor, no_restart=True)
                self.rewards.replace(slot)
            self._retry(st, call.chunk, call.attempt + 1)
