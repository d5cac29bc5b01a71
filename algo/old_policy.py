"""The sampling ("old") policy: a lagged EMA of the trained weights.

After each round's optimizer step(s), with ``step`` the number of optimizer steps taken so far,

    old <- d(step) * old + (1 - d(step)) * current,
    d(step) = 0                                        if step < flat_steps
            = min(rate * (step - flat_steps), max_decay)  otherwise.

The paper's main recipe (official ``DECAY_TYPE=1``) is ``d = min(0.001 step, 0.5)``: the old
policy starts as a copy of the current one and lags more as training goes on, up to an even mix.
The other official schedules are kept by name in ``OLD_POLICY_SCHEDULES``.

The update runs on a state dict, so it serves full fine-tuning and LoRA alike: pass only the
adapter tensors (a few MB) and only those are mixed; the caller then publishes them.

Source: DESIGN.md s.1; checked against ``jaemoo-choi/rethinking-diffusion-rl``
``src/utils/__init__.py:return_decay`` and ``src/train.py`` (update after each epoch, with the
already-incremented ``global_step``; old initialised as a copy of current).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from algo.registry import Registry


@dataclass(frozen=True)
class DecaySchedule:
    """``d(step)``: 0 for ``step < flat_steps``, then ``min(rate (step - flat_steps), max_decay)``.

    Attributes:
        flat_steps: optimizer steps during which the old policy tracks the current one exactly.
        rate: growth of d per optimizer step after the flat phase.
        max_decay: the cap on d, in [0, 1).
    """

    flat_steps: int = 0
    rate: float = 0.001
    max_decay: float = 0.5

    def __post_init__(self) -> None:
        if self.flat_steps < 0 or not self.rate >= 0 or not 0.0 <= self.max_decay < 1.0:
            raise ValueError(f"invalid decay schedule {self}")

    def __call__(self, step: int) -> float:
        """The decay d in [0, max_decay] after ``step`` optimizer steps (step >= 0)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.flat_steps:
            return 0.0
        return min(self.rate * (step - self.flat_steps), self.max_decay)


OLD_POLICY_SCHEDULES: Registry[DecaySchedule] = Registry(
    "old-policy schedule", "learner.old_policy_schedule"
)
"""Named schedules; ``linear`` is the default (``d = min(0.001 step, 0.5)``)."""
OLD_POLICY_SCHEDULES.add("copy", DecaySchedule(flat_steps=0, rate=0.0, max_decay=0.0))  # official 0
OLD_POLICY_SCHEDULES.add("linear", DecaySchedule(0, rate=0.001, max_decay=0.5))  # 1: the recipe
OLD_POLICY_SCHEDULES.add("delayed_slow", DecaySchedule(75, rate=0.0075, max_decay=0.999))  # 2
OLD_POLICY_SCHEDULES.add("delayed_fast", DecaySchedule(10, rate=0.01, max_decay=0.5))  # 3


def get_schedule(name: str) -> DecaySchedule:
    """The named schedule from ``OLD_POLICY_SCHEDULES`` (``ValueError`` if unknown)."""
    return OLD_POLICY_SCHEDULES.get(name)


@torch.no_grad()
def ema_update_(old: Mapping[str, Tensor], current: Mapping[str, Tensor], decay: float) -> None:
    """In place: ``old[k] <- decay * old[k] + (1 - decay) * current[k]`` for every key.

    ``decay = 0`` copies exactly. Both mappings must have the same keys and shapes
    (``ValueError`` otherwise). Non-floating tensors (e.g. integer buffers) are copied.
    The arithmetic runs in at least float32 and is written back in each old tensor's dtype,
    so bf16 weights do not lose the small ``(1 - d)`` increments to round-off twice.
    """
    if not (math.isfinite(decay) and 0.0 <= decay < 1.0):
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    if set(old) != set(current):
        missing, extra = set(old) - set(current), set(current) - set(old)
        raise ValueError(
            f"state dicts differ: only in old {sorted(missing)[:5]}, "
            f"only in current {sorted(extra)[:5]}"
        )
    for key, target in old.items():
        source = current[key].detach()
        if source.shape != target.shape:
            raise ValueError(f"{key}: shape {tuple(source.shape)} != old {tuple(target.shape)}")
        if decay == 0.0 or not target.is_floating_point():
            target.copy_(source)
            continue
        dtype = torch.promote_types(target.dtype, torch.float32)
        mixed = torch.lerp(
            target.to(dtype), source.to(device=target.device, dtype=dtype), 1.0 - decay
        )
        target.copy_(mixed)


def update_old_policy_(
    old: Mapping[str, Tensor],
    current: Mapping[str, Tensor],
    step: int,
    schedule: DecaySchedule | str = "linear",
) -> float:
    """Apply the schedule's EMA after ``step`` optimizer steps; returns the decay d used.

    ``step`` counts optimizer steps taken so far, including this round's (the official code
    updates with the already-incremented ``global_step``, so the first update uses d(1)).
    """
    sched = get_schedule(schedule) if isinstance(schedule, str) else schedule
    decay = sched(step)
    ema_update_(old, current, decay)
    return decay
