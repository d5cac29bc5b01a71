"""Collecting one round's rollouts and rewards, surviving dead and hung actors.

Ray's defaults are at-most-once tasks and no actor restarts; turning retries on gives
at-least-once, so a sample could be scored twice. Instead the driver owns recovery and keeps
exactly-once by construction: each chunk of a round has one slot for its rollout and one for
its rewards, and a result is accepted only into an empty slot.

- A rollout worker that dies: the worker is replaced (loading the latest published weights)
  and every chunk it held is generated again, with the same seed, by the replacement.
- A reward actor that dies, or does not answer within ``rewards.timeout_s``, or whose reward
  raises: the chunk is retried (on a replacement for a dead or hung actor) up to
  ``faults.reward_retries`` times, then dropped and counted. Its samples are never trained on.
- A role that can no longer be placed (its node died and no other node has the resources)
  raises ``RunStopped``; ``services.loop`` then checkpoints the last completed round.

Counters go to ``Trainer.faults`` and from there to the ``faults/`` metrics.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError, RayTaskError

if TYPE_CHECKING:
    from services.driver import Chunk, PendingRound, Trainer

log = logging.getLogger("elborl.driver")


class RunStopped(RuntimeError):
    """The run cannot go on; the loop checkpoints what is complete and the driver exits 1."""


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


def collect_round(tr: Trainer, pending: PendingRound) -> list[Any | None]:
    """Every chunk's ``ScoredBatch`` in chunk order, ``None`` for a chunk that was dropped."""
    st = _State()
    limit = time.monotonic() + tr.timeout
    for ch in pending.chunks:
        st.calls[ch.receipt] = _Call("rollout", ch, tr.rollouts[ch.worker], limit)
    while st.calls:
        now = time.monotonic()
        wait = max(0.0, min(c.deadline for c in st.calls.values()) - now)
        ready, _ = ray.wait(list(st.calls), num_returns=1, timeout=wait)
        if not ready:
            _expire(tr, st, time.monotonic())
            continue
        call = st.calls.pop(ready[0])
        if call.kind == "rollout":
            _rollout_done(tr, st, ready[0], call, pending)
        else:
            _reward_done(tr, st, ready[0], call, pending)
    return [st.scored.get(ch.index) for ch in pending.chunks]


def _rollout_done(
    tr: Trainer, st: _State, ref: ray.ObjectRef, call: _Call, pending: PendingRound
) -> None:
    ch = call.chunk
    try:
        ray.get(ref)
    except RayActorError as exc:
        log.warning("rollout worker %d died during round %d: %s", ch.worker, pending.round, exc)
        if tr.rollouts[ch.worker] is call.actor:
            tr.replace_rollout(ch.worker)
        tr.regenerate(pending, ch)
        st.calls[ch.receipt] = _Call("rollout", ch, tr.rollouts[ch.worker], call.deadline)
        return
    _submit_reward(tr, st, ch, attempt=1)


def _submit_reward(tr: Trainer, st: _State, ch: Chunk, attempt: int) -> None:
    slot = ch.index % len(tr.rewards)
    actor = tr.rewards[slot]
    queued = sum(1 for c in st.calls.values() if c.kind == "reward" and c.actor is actor)
    deadline = time.monotonic() + tr.cfg.rewards.timeout_s * (queued + 1)
    st.calls[actor.score.remote(ch.images)] = _Call("reward", ch, actor, deadline, attempt)


def _reward_done(
    tr: Trainer, st: _State, ref: ray.ObjectRef, call: _Call, pending: PendingRound
) -> None:
    ch = call.chunk
    try:
        st.scored[ch.index] = ray.get(ref)
        return
    except ObjectLostError as exc:  # the rollout's images went with their node: make them again
        log.warning("chunk %d's images were lost (%s); generating them again", ch.index, exc)
        tr.regenerate(pending, ch)
        st.calls[ch.receipt] = _Call(
            "rollout", ch, tr.rollouts[ch.worker], time.monotonic() + tr.timeout
        )
    except RayActorError as exc:
        slot = ch.index % len(tr.rewards)
        ours = call.actor._actor_id.hex() in st.killed
        if not ours:
            log.warning("reward actor %d died scoring chunk %d: %s", slot, ch.index, exc)
            tr.faults["reward_actor_deaths"] += 1
        if tr.rewards[slot] is call.actor:
            tr.replace_reward(slot)
        # A call that died with an actor we killed for another chunk's hang costs no attempt.
        _retry(tr, st, ch, call.attempt if ours else call.attempt + 1)
    except RayTaskError as exc:
        log.warning("reward failed on chunk %d (attempt %d): %s", ch.index, call.attempt, exc)
        tr.faults["reward_errors"] += 1
        _retry(tr, st, ch, call.attempt + 1)


def _retry(tr: Trainer, st: _State, ch: Chunk, attempt: int) -> None:
    if attempt > tr.cfg.faults.reward_retries + 1:
        log.error(
            "chunk %d: no reward after %d attempts; its %d samples are dropped",
            ch.index,
            attempt - 1,
            len(ch.sample_ids),
        )
        st.dropped.add(ch.index)
        tr.faults["samples_dropped"] += len(ch.sample_ids)
        return
    tr.faults["reward_retries"] += 1
    _submit_reward(tr, st, ch, attempt)


def _expire(tr: Trainer, st: _State, now: float) -> None:
    """Deal with every call past its deadline: a hung reward actor is killed and replaced."""
    for ref, call in list(st.calls.items()):
        if call.deadline > now:
            continue
        if call.kind == "rollout":
            raise RunStopped(
                f"rollout of chunk {call.chunk.index} did not finish within "
                f"train.step_timeout_s = {tr.timeout:.0f} s"
            )
        slot = call.chunk.index % len(tr.rewards)
        log.warning(
            "reward actor %d did not answer chunk %d within rewards.timeout_s = %.1f s; "
            "replacing it",
            slot,
            call.chunk.index,
            tr.cfg.rewards.timeout_s,
        )
        tr.faults["reward_timeouts"] += 1
        del st.calls[ref]
        if tr.rewards[slot] is call.actor:
            st.killed.add(call.actor._actor_id.hex())
            ray.kill(call.actor, no_restart=True)
            tr.replace_reward(slot)
        _retry(tr, st, call.chunk, call.attempt + 1)


def get_or_stop(ref: Any, timeout: float, what: str) -> Any:
    """``ray.get`` that turns a timeout into ``RunStopped`` naming what was awaited."""
    try:
        return ray.get(ref, timeout=timeout)
    except GetTimeoutError as exc:
        raise RunStopped(f"{what} did not answer within {timeout:.0f} s") from exc
