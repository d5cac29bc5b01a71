"""The ``World`` protocol: where prompts come from and how images are judged against them.

A world is the task an RL run optimises: it names its prompt splits (or reads a prompt
file), verifies images against prompts (one ``Verdict`` per image, a GenEval-style summary),
names the rewards it provides, and can render ground-truth images for supervised pretraining.
Nothing outside ``worlds/`` knows a world's grammar: the rollouts, rewards, pretraining and
driver only call these methods.

Adding a world is one module with a ``World`` subclass and its config (a ``WorldConfig``
subclass) plus ``@register_world``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from algo.registry import Registry
from common.config import PositiveInt, Section


class WorldConfig(Section):
    """Settings every world has; a world's own config extends this (``name`` selects it)."""

    name: str = Field("shapes", description="The world (a registered name, see `worlds/`).")
    image_size: PositiveInt = Field(32, description="Side of the square RGB images, in pixels.")
    train_prompts: str = Field(
        "train",
        description="Prompts for training: a split name of the world (e.g. `train`, `heldout`, "
        "`all`) or a path to a text file with one prompt per line.",
    )
    eval_prompts: str = Field(
        "heldout", description="Prompts for held-out evaluation: split name or file path."
    )


@dataclass(frozen=True)
class Verdict:
    """One image judged against its prompt.

    Attributes:
        score: partial credit in [0, 1] (e.g. the fraction of the prompt's clauses passed).
        clauses: per clause of the prompt, passed or not.
        passed: whether the image satisfies the whole prompt (GenEval's criterion).
        detail: diagnostics (e.g. detected objects); logged, never trained on.
    """

    score: float
    clauses: dict[str, bool]
    passed: bool
    detail: dict[str, Any] = field(default_factory=dict)


class World(ABC):
    """A task world. Subclasses set ``name``, ``config_class`` and ``rewards``."""

    name: ClassVar[str]
    config_class: ClassVar[type[WorldConfig]] = WorldConfig
    rewards: ClassVar[dict[str, Callable[[Verdict], float]]] = {}
    """Rewards this world provides, by reward name: a score from each image's verdict."""
    verifies: ClassVar[bool] = True
    """Whether ``verify`` judges images (False: the rewards alone score them, e.g. `text`)."""

    def __init__(self, cfg: WorldConfig | None = None):
        if cfg is None:
            cfg = self.config_class(name=self.name)
        elif not isinstance(cfg, self.config_class):
            # A plain WorldConfig: validate it into this world's own settings, whose
            # defaults then apply to what it leaves out.
            cfg = self.config_class.model_validate(cfg.model_dump(exclude_unset=True))
        self.cfg = cfg

    @abstractmethod
    def prompts(self, spec: str) -> list[str]:
        """The prompts of split ``spec``, or of the prompt file at path ``spec``.

        Raises ``ValueError`` naming the split names or the file (and line) when invalid.
        """

    @abstractmethod
    def split_names(self) -> tuple[str, ...]:
        """The named prompt splits (``prompts`` also accepts a file path)."""

    def metadata(self, prompt: str) -> dict[str, Any] | None:
        """What the prompt file says about ``prompt`` besides its text (e.g. GenEval's
        ``tag`` and ``include``), handed to the rewards with each image; None if nothing."""
        return None

    def category(self, prompt: str) -> str | None:
        """The task category of a prompt (GenEval's, for `shapes`), or None if the world has
        none; evaluation balances its images over categories by it."""
        return None

    @abstractmethod
    def verify(self, images: np.ndarray, prompts: Sequence[str]) -> list[Verdict]:
        """Judge uint8 images (B, H, W, 3) against their prompts (B,)."""

    @abstractmethod
    def summarize(self, verdicts: Sequence[Verdict], prompts: Sequence[str]) -> dict[str, Any]:
        """GenEval-style metrics of judged images: at least ``accuracy`` (fraction passed),
        ``mean_reward`` (mean score) and ``clause_accuracy`` (per clause)."""

    @abstractmethod
    def vocabulary(self) -> list[str]:
        """Every word the world's prompts use (for a model with a fixed word vocabulary)."""

    def render(self, prompts: Sequence[str], rng: np.random.Generator) -> np.ndarray:
        """Ground-truth uint8 images (B, H, W, 3) for prompts (supervised pretraining)."""
        raise NotImplementedError(f"the {self.name!r} world cannot render images")

    def pretraining_batch(
        self, prompts: Sequence[str], size: int, rng: np.random.Generator
    ) -> tuple[list[str], np.ndarray]:
        """``size`` (caption, image) pairs for supervised pretraining, drawn from ``prompts``.

        Default: uniform prompts, captions equal to the prompts, images from ``render``.
        """
        chosen = [prompts[int(i)] for i in rng.integers(0, len(prompts), size)]
        return chosen, self.render(chosen, rng)


WORLDS: Registry[type[World]] = Registry("world", "world.name")


def register_world(cls: type[World]) -> type[World]:
    """Class decorator: make a ``World`` subclass selectable as ``world.name``."""
    WORLDS.add(cls.name, cls)
    return cls


_BUILTIN_WORLDS = ("worlds.shapes.world", "worlds.text.world")


def world_class(name: str) -> type[World]:
    """The world registered as ``name`` (the built-in worlds are imported first)."""
    _import_builtin()
    return WORLDS.get(name)


def make_world(cfg: WorldConfig) -> World:
    """The world ``cfg.name`` built from its config (a plain ``WorldConfig`` will do)."""
    return world_class(cfg.name)(cfg)


def world_names() -> tuple[str, ...]:
    _import_builtin()
    return WORLDS.names()


def _import_builtin() -> None:
    import importlib

    for module in _BUILTIN_WORLDS:
        importlib.import_module(module)
