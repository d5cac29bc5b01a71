"""The `shapes` world behind the ``World`` protocol (everything else calls only this)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any, ClassVar

import numpy as np
from pydantic import Field, field_validator

from worlds.base import Verdict, World, WorldConfig, register_world
from worlds.shapes.grammar import (
    CATEGORIES,
    SPLIT_NAMES,
    ShapesPrompt,
    all_prompts,
    load_prompt_file,
    parse_prompt,
    split_prompts,
)
from worlds.shapes.noise import NOISE_KINDS, noisy_caption
from worlds.shapes.render import render, render_batch
from worlds.shapes.verify import summarize, verify


class ShapesConfig(WorldConfig):
    """The `shapes` world (DESIGN.md section 3): GenEval's six categories in miniature."""

    caption_noise: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Pretraining only: the fraction of captions that describe their image "
        "wrongly in one detail (`worlds/shapes/noise.py`: a colour, shape, count or relation "
        "changed, colours swapped, or a detail dropped), as web captions do. 0 = exact captions.",
    )
    noise_kinds: dict[str, float] = Field(
        default_factory=lambda: dict.fromkeys(NOISE_KINDS, 1.0),
        description="Relative weights of the caption noise kinds (colour, shape, count, "
        "relation, swap, drop), drawn among those that apply to each prompt.",
    )
    balance_categories: bool = Field(
        True,
        description="The `train` and `pretrain` splits repeat the prompts of small categories "
        "so that each of the six categories is dealt about equally often (GenEval's score is "
        "the mean over categories); `heldout` and `all` list each prompt once.",
    )

    @field_validator("noise_kinds")
    @classmethod
    def _known_kinds(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(NOISE_KINDS))
        if unknown:
            raise ValueError(f"unknown noise kinds {unknown}; allowed: {', '.join(NOISE_KINDS)}")
        if any(w < 0 for w in v.values()) or not any(w > 0 for w in v.values()):
            raise ValueError("noise kind weights must be >= 0, at least one > 0")
        return v


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
    cfg: ShapesConfig

    def prompts(self, spec: str) -> list[str]:
        if spec not in SPLIT_NAMES:
            return [p.text for p in load_prompt_file(spec)]
        texts = [p.text for p in split_prompts(spec)]
        if spec in ("train", "pretrain") and self.cfg.balance_categories:
            return balanced_by_category(texts)
        return texts

    def split_names(self) -> tuple[str, ...]:
        return SPLIT_NAMES

    def category(self, prompt: str) -> str | None:
        return _parsed(prompt).category

    def verify(self, images: np.ndarray, prompts: Sequence[str]) -> list[Verdict]:
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; need one each")
        return [verify(img, _parsed(p)) for img, p in zip(images, prompts, strict=True)]

    def summarize(self, verdicts: Sequence[Verdict], prompts: Sequence[str]) -> dict[str, Any]:
        return summarize(verdicts, [_parsed(p).category for p in prompts])

    def vocabulary(self) -> list[str]:
        return _vocabulary()

    def render(self, prompts: Sequence[str], rng: np.random.Generator) -> np.ndarray:
        return render_batch([_parsed(p) for p in prompts], rng, self.cfg.image_size)

    def pretraining_batch(
        self, prompts: Sequence[str], size: int, rng: np.random.Generator
    ) -> tuple[list[str], np.ndarray]:
        """Prompts drawn uniformly from ``prompts`` (balanced by category in the splits),
        images rendered from them, captions with ``caption_noise`` applied."""
        chosen = [_parsed(prompts[int(i)]) for i in rng.integers(0, len(prompts), size)]
        images = np.stack([render(p, rng, self.cfg.image_size) for p in chosen])
        cfg = self.cfg
        captions = [noisy_caption(p, cfg.caption_noise, cfg.noise_kinds, rng).text for p in chosen]
        return captions, images


def balanced_by_category(texts: list[str]) -> list[str]:
    """Each category's prompts repeated (in order) to the size of the largest category."""
    groups: dict[str, list[str]] = {}
    for t in texts:
        groups.setdefault(_parsed(t).category, []).append(t)
    size = max(len(g) for g in groups.values())
    cats = [c for c in CATEGORIES if c in groups]
    return [groups[c][i % len(groups[c])] for i in range(size) for c in cats]


@cache
def _vocabulary() -> list[str]:
    words = {w for p in all_prompts() for w in re.findall(r"[a-z0-9]+", p.text.lower())}
    return sorted(words | {"and", "to", "the"})
