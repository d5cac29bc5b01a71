"""Rewards that need nothing downloaded: the ``shapes`` verifier and JPEG (in)compressibility."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

from rewards.base import Reward, RewardOutput, register
from worlds.shapes.verify import verify


@register("shapes")
class ShapesReward(Reward):
    """GenEval-style verifier: the fraction of the prompt's clauses the image satisfies."""

    name = "shapes"
    range = (0.0, 1.0)

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        self.check_batch(images, prompts)
        results = [verify(img, p) for img, p in zip(images, prompts, strict=True)]
        return RewardOutput(
            scores=np.array([r.score for r in results], dtype=np.float64),
            details=[{"passed": r.passed, "clauses": dict(r.clauses)} for r in results],
        )


@register("shapes_strict")
class ShapesStrictReward(Reward):
    """GenEval's own criterion as a reward: 1 when the image passes every clause, else 0.

    Mixed with the partial-credit ``shapes`` reward it aligns training with the accuracy
    metric (the partial score alone can rise while all-clause accuracy falls).
    """

    name = "shapes_strict"
    range = (0.0, 1.0)

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        self.check_batch(images, prompts)
        results = [verify(img, p) for img, p in zip(images, prompts, strict=True)]
        return RewardOutput(
            scores=np.array([float(r.passed) for r in results]),
            details=[{"passed": r.passed} for r in results],
        )


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
