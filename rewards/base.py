"""The one reward interface: every reward scores a batch of images against their prompts.

A reward is a callable object with a ``name`` and ``score(images, prompts) -> RewardOutput``
where ``images`` is uint8 (B, H, W, 3) and ``prompts`` a list of B strings. It returns one
float per image (``scores``, higher is better) and optional per-image diagnostics
(``details``, e.g. the verifier's clause results) that are logged but never trained on.
Rewards with weights (PickScore, HPS, ImageReward, CLIP, aesthetic, OCR) load from a local
directory and a remote reward server speaks a small HTTP protocol; both implement this same
interface so the reward actors never special-case a reward by name.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from algo.registry import Registry


@dataclass(frozen=True)
class RewardOutput:
    """Scores (B,) float64 of one reward on a batch, plus per-image diagnostics."""

    scores: np.ndarray
    details: list[dict[str, Any]] = field(default_factory=list)


class Reward(ABC):
    """A reward function over (image, prompt) pairs.

    ``range`` is the interval valid scores lie in (``None``: any finite value); the scorer
    marks a sample whose score is NaN/inf or outside it as invalid, and the driver drops it.
    """

    name: str
    range: tuple[float, float] | None = None

    @abstractmethod
    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        """Score uint8 images (B, H, W, 3) against ``prompts`` (B,)."""

    def score_with_metadata(
        self,
        images: np.ndarray,
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any] | None],
    ) -> RewardOutput:
        """As ``score``, with each image's prompt metadata (e.g. GenEval's ``tag`` and
        ``include``, from a JSONL prompt file); rewards that use it override this."""
        return self.score(images, prompts)

    @staticmethod
    def check_batch(images: np.ndarray, prompts: Sequence[str]) -> None:
        """Raise ``ValueError`` unless images are uint8 (B, H, W, 3) with B prompts."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                "rewards take uint8 images of shape (B, H, W, 3); "
                f"got {images.dtype} {images.shape}"
            )
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")


REWARDS: Registry[Callable[..., Reward]] = Registry("reward", "rewards.functions[].name")
"""Built-in rewards by name (a factory each); the worlds' own rewards are added on first use."""


def register(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Class decorator: make a reward constructible by name from the config."""
    return REWARDS.register(name)


_BUILTIN_MODULES = ("rewards.builtin", "rewards.remote", "rewards.clip", "rewards.ocr")


def _builtin() -> Registry[Callable[..., Reward]]:
    """The registry with the built-in rewards (imported by name on first use) in it."""
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    return REWARDS


def reward_names() -> tuple[str, ...]:
    """Every reward name a config may use without an import path."""
    return _builtin().names()


def build_reward(name: str, params: dict[str, Any] | None = None) -> Reward:
    """Instantiate a reward: a registered name, or ``package.module:ClassName`` with ``params``.

    The import path form lets a user plug their own reward in without touching elborl; the
    class must subclass ``Reward`` and be importable on every node (e.g. shipped in the Ray
    job's ``working_dir`` or installed).
    """
    registry = _builtin()
    factory = registry.get(name)  # a `module:Class` path is imported (ValueError if unknown)
    if name not in registry and not (isinstance(factory, type) and issubclass(factory, Reward)):
        raise ValueError(f"reward {name!r} is not a rewards.base.Reward subclass")
    check_params(name, factory, params or {})
    reward = factory(**(params or {}))
    if not getattr(reward, "name", None):
        reward.name = name.partition(":")[2]
    return reward


def check_params(name: str, factory: Callable[..., Reward], params: dict[str, Any]) -> None:
    """``ValueError`` naming the reward and what it takes unless ``params`` fit its constructor."""
    import inspect

    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: let the call decide
        return
    try:
        signature.bind(**params)
    except TypeError as exc:
        takes = ", ".join(signature.parameters) or "no params"
        raise ValueError(
            f"reward {name!r}: params {sorted(params)}: {exc} (it takes: {takes})"
        ) from None
