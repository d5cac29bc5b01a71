"""The `shapes` world behind the ``World`` protocol (everything else calls only this)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any, ClassVar

import numpy as np

from worlds.base import Verdict, World, WorldConfig, register_world
from worlds.shapes.grammar import (
    SPLIT_NAMES,
    ShapesPrompt,
    all_prompts,
    load_prompt_file,
    parse_prompt,
    split_prompts,
)
from worlds.shapes.render import render_batch
from worlds.shapes.verify import summarize, verify


class ShapesConfig(WorldConfig):
    """The `shapes` world (DESIGN.md section 3): counts, colours, shapes and relations."""


@cache
def _parsed(text: str) -> ShapesPrompt:
    return parse_prompt(text)


@register_world
class ShapesWorld(World):
    """A GenEval in miniature: a prompt grammar, a renderer and a clause verifier."""

    name = "shapes"
    config_class = ShapesConfig
    rewards: ClassVar[dict[str, Callable[[Verdict], float]]] = {
        "shapes": lambda v: v.score,  # the fraction of the prompt's clauses passed
        "shapes_strict": lambda v: float(v.passed),  # 1 if every clause passes (GenEval)
    }

    def prompts(self, spec: str) -> list[str]:
        if spec in SPLIT_NAMES:
            return [p.text for p in split_prompts(spec)]
        return [p.text for p in load_prompt_file(spec)]

    def split_names(self) -> tuple[str, ...]:
        return SPLIT_NAMES

    def verify(self, images: np.ndarray, prompts: Sequence[str]) -> list[Verdict]:
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; need one each")
        return [verify(img, _parsed(p)) for img, p in zip(images, prompts, strict=True)]

    def summarize(self, verdicts: Sequence[Verdict], prompts: Sequence[str]) -> dict[str, Any]:
        return summarize(verdicts)

    def vocabulary(self) -> list[str]:
        return _vocabulary()

    def render(self, prompts: Sequence[str], rng: np.random.Generator) -> np.ndarray:
        return render_batch([_parsed(p) for p in prompts], rng, self.cfg.image_size)

    def pretraining_batch(
        self, prompts: Sequence[str], size: int, rng: np.random.Generator
    ) -> tuple[list[str], np.ndarray]:
        """Each prompt kind (count, relation) equally likely: relation prompts outnumber count
        prompts ~18:1, and sampling uniformly would leave counting nearly untrained."""
        batch = balanced_batch([_parsed(p) for p in prompts], rng, size)
        return [p.text for p in batch], render_batch(batch, rng, self.cfg.image_size)


def balanced_batch(
    prompts: list[ShapesPrompt], rng: np.random.Generator, size: int
) -> list[ShapesPrompt]:
    """``size`` prompts drawn with each prompt kind (count, relation) equally likely."""
    kinds: dict[type, list[ShapesPrompt]] = {}
    for p in prompts:
        kinds.setdefault(type(p), []).append(p)
    groups = list(kinds.values())
    which = rng.integers(0, len(groups), size)
    return [groups[k][rng.integers(0, len(groups[k]))] for k in which]


@cache
def _vocabulary() -> list[str]:
    words = {w for p in all_prompts() for w in re.findall(r"[a-z0-9]+", p.text.lower())}
    return sorted(words)
