"""Dealing prompts into rounds of K-repeat groups, resumably.

The dealer walks a fixed, seeded permutation of the prompt list (a new permutation each epoch)
and hands out ``prompts_per_round`` distinct prompts per round, each repeated ``K`` times. Its
whole state is ``(epoch, cursor)``, saved in every checkpoint, so a resumed run sees exactly
the prompts an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.config import ConfigError
from worlds.base import World


@dataclass
class RoundPrompts:
    """One round: ``prompts[i]`` is image i's prompt, ``group_ids[i]`` its group (prompt)."""

    prompts: list[str]
    group_ids: np.ndarray
    sample_ids: np.ndarray


class PromptDealer:
    """Seeded epoch-wise shuffling of a prompt list."""

    def __init__(self, prompts: list[str], seed: int, epoch: int = 0, cursor: int = 0):
        if not prompts:
            raise ValueError("the prompt list is empty")
        self.prompts, self.seed = list(prompts), seed
        self.epoch, self.cursor = epoch, cursor

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.prompts))

    def deal(self, round_: int, num_prompts: int, group_size: int) -> RoundPrompts:
        """The next ``num_prompts`` prompts, each repeated ``group_size`` times."""
        chosen: list[str] = []
        while len(chosen) < num_prompts:
            order = self._order()
            take = min(num_prompts - len(chosen), len(order) - self.cursor)
            chosen += [self.prompts[i] for i in order[self.cursor : self.cursor + take]]
            self.cursor += take
            if self.cursor == len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
        n = num_prompts * group_size
        base = round_ * n
        return RoundPrompts(
            prompts=[p for p in chosen for _ in range(group_size)],
            group_ids=np.repeat(np.arange(num_prompts) + round_ * num_prompts, group_size),
            sample_ids=np.arange(base, base + n, dtype=np.int64),
        )

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}


def resolve_prompts(world: World, spec: str, field: str) -> list[str]:
    """Prompts named by a config value: a split of the world or a prompt file's path.

    Raises ``ConfigError`` naming ``field`` (and the file and line for a bad file).
    """
    if spec in world.split_names():
        return world.prompts(spec)
    if not Path(spec).exists():
        raise ConfigError(
            f"{field} = {spec!r} is neither a split ({', '.join(world.split_names())}) nor an "
            "existing file"
        )
    try:
        return world.prompts(spec)
    except ValueError as exc:
        raise ConfigError(f"{field}: {exc}") from exc


def read_prompt_lines(path: str, field: str) -> list[str]:
    """A free-text prompt file (any model's prompts, no grammar): one prompt per line, blank
    lines and lines starting with ``#`` skipped (``worlds.text.world.read_prompt_file``).
    ``ConfigError`` naming ``field`` and the file (and line) when it cannot be read or holds no
    prompt."""
    from worlds.text.world import read_prompt_file

    try:
        return read_prompt_file(path)
    except ValueError as exc:
        raise ConfigError(f"{field}: {exc}") from exc
