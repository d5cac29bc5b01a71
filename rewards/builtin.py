"""Rewards that need nothing downloaded: each world's own (the ``shapes`` verifier's
partial and strict scores) and DDPO's JPEG (in)compressibility."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from rewards.base import Reward, RewardOutput, register
from worlds.base import World, world_class, world_names


class WorldReward(Reward):
    """A world's own reward (e.g. `shapes`, `shapes_strict`): a score from each image's
    verdict (``World.verify``). The verdict's ``passed`` is kept for the accuracy metrics."""

    def __init__(self, world: World, name: str):
        self.world, self.name = world, name
        self._score = type(world).rewards[name]
        self.range = (0.0, 1.0)

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        self.check_batch(images, prompts)
        verdicts = self.world.verify(images, prompts)
        return RewardOutput(
            scores=np.array([self._score(v) for v in verdicts], dtype=np.float64),
            details=[{"passed": v.passed, "clauses": dict(v.clauses)} for v in verdicts],
        )


def _world_reward_factory(world: str, name: str) -> Callable[[], Reward]:
    def make() -> Reward:
        return WorldReward(world_class(world)(), name)

    return make


for _world in world_names():  # every world's own rewards, under the names the world gives
    for _name in world_class(_world).rewards:
        register(_name)(_world_reward_factory(_world, _name))


def jpeg_kilobytes(image: np.ndarray, quality: int = 95) -> float:
    """Size of ``image`` (H, W, 3) uint8 encoded as JPEG at ``quality``, in kB (DDPO's measure)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000.0


@register("jpeg_compressibility")
class JpegCompressibility(Reward):
    """DDPO's compressibility reward: minus the JPEG size in kB (smaller files score higher)."""

    name = "jpeg_compressibility"

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        self.check_batch(images, prompts)
        return RewardOutput(scores=-np.array([jpeg_kilobytes(im) for im in images]))


@register("jpeg_incompressibility")
class JpegIncompressibility(Reward):
    """DDPO's incompressibility reward: the JPEG size in kB (detailed images score higher)."""

    name = "jpeg_incompressibility"

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        self.check_batch(images, prompts)
        return RewardOutput(scores=np.array([jpeg_kilobytes(im) for im in images]))
