"""Every seed of a run derives from the run's base seed here, and nowhere else.

- ``round_seed(base, round, index)``: one seed per (round, chunk) of rollouts, and the
  learner's per-round seed (index ``LEARNER_INDEX``);
- ``sample_seed(seed, sample_id)``: the learner's per-sample generator (ELBO timesteps and
  noise, the trajectory step order), so an update does not depend on how samples are split
  over ranks or microbatches;
- ``image_seed(seed, i)``: the initial noise of image ``i`` of one ``generate`` call, so the
  same seed gives the same images whatever the batch size;
- ``sde_seed(seed)``: the per-step noise of stochastic samplers in that call.
"""

from __future__ import annotations

LEARNER_INDEX = 10**6
"""The ``index`` of the learner's per-round seed (far above any chunk index)."""
EVAL_OFFSET = 1
"""Held-out evaluations sample with ``base + EVAL_OFFSET``."""


def round_seed(base: int, round_: int, index: int) -> int:
    """Seed of chunk ``index`` of round ``round_`` (``LEARNER_INDEX``: the learner's)."""
    return (base * 1_000_003 + round_ * 10_007 + index) % (2**62)


def sample_seed(seed: int, sample_id: int) -> int:
    """A 63-bit seed for one sample of one round (splitmix-style integer hash)."""
    z = (seed * 0x9E3779B97F4A7C15 + sample_id + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def image_seed(seed: int, i: int) -> int:
    """Seed of image ``i``'s initial noise in a ``generate`` call seeded ``seed``."""
    return seed * 1_000_003 + i


def sde_seed(seed: int) -> int:
    """Seed of the stochastic sampler's step noise in a ``generate`` call seeded ``seed``."""
    return seed + 7
