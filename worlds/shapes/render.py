"""Ground-truth renderer of the `shapes` world: correct, varied images for any prompt.

Used to pretrain the base policy, so it must be fast (64 images per optimizer step) and
its images must pass the verifier. Each image: a dark noisy background (grey 20-40, +-8
per pixel and channel) and crisp, un-anti-aliased palette shapes of side ~7-11 px at 32x32
(scaled with the image), placed at random without overlap and with a gap >= 2 px.
Relations hold clearly: each object lies in its own half of the image along the relation's
axis, and their centres are at most size/8 apart across it.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Final

import numpy as np

from worlds.shapes.grammar import (
    COLOURS,
    PALETTE,
    CountPrompt,
    ObjectPrompt,
    ObjectSpec,
    PairPrompt,
    ShapesPrompt,
    as_prompt,
)

MIN_IMAGE_SIZE: Final[int] = 24
_BACKGROUND_GREY: Final[tuple[int, int]] = (20, 40)  # inclusive range of the base grey
_BACKGROUND_NOISE: Final[int] = 8  # per-pixel uniform noise amplitude, grey levels
_NUM_CANDIDATES: Final[int] = 128  # positions drawn per vectorised rejection round
_MAX_ATTEMPTS: Final[int] = 100

Box = tuple[int, int, int]  # (top, left, side) in pixels


def object_size_range(size: int) -> tuple[int, int]:
    """Inclusive range of object sides in pixels: 7-11 at 32x32, proportional otherwise."""
    return int(7 * size / 32 + 0.5), int(11 * size / 32 + 0.5)


def object_gap(size: int) -> int:
    """Minimum empty pixels between two objects' boxes: 2 at 32x32, proportional above."""
    return max(2, int(2 * size / 32 + 0.5))


@cache
def shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean (side, side) mask of a shape, sampled at pixel centres (no anti-aliasing).

    Circle: inscribed disc (fill ~0.79). Square: full box (fill 1). Triangle: upright
    isosceles, apex at the top centre, base along the bottom row (fill ~0.5).
    """
    c = (np.arange(side) + 0.5) / side  # pixel centres in [0, 1]
    y, x = c[:, None], c[None, :]
    if shape == "circle":
        mask = (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25
    elif shape == "square":
        mask = np.ones((side, side), dtype=bool)
    elif shape == "triangle":
        mask = np.abs(x - 0.5) <= y / 2
    else:
        raise ValueError(f"unknown shape {shape!r}")
    mask.flags.writeable = False  # cached and shared between calls
    return mask


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    lo, hi = _BACKGROUND_GREY
    base = int(rng.integers(lo, hi + 1))
    noise = rng.integers(-_BACKGROUND_NOISE, _BACKGROUND_NOISE + 1, size=(size, size, 3))
    return (noise + base).astype(np.uint8)  # (H, W, 3)


def _separated(cand: np.ndarray, side: int, box: Box, gap: int) -> np.ndarray:
    """Which candidate top-left corners (N, 2) keep a box of `side` >= gap px from `box`."""
    top, left, other = box
    sep_y = (cand[:, 0] + side + gap <= top) | (top + other + gap <= cand[:, 0])
    sep_x = (cand[:, 1] + side + gap <= left) | (left + other + gap <= cand[:, 1])
    return np.asarray(sep_y | sep_x)


def _place_count(count: int, rng: np.random.Generator, size: int) -> list[Box]:
    """Boxes for `count` objects, placed one by one by vectorised rejection sampling."""
    lo, hi = object_size_range(size)
    gap = object_gap(size)
    for _ in range(_MAX_ATTEMPTS):
        boxes: list[Box] = []
        for side in rng.integers(lo, hi + 1, size=count).tolist():
            cand = rng.integers(0, size - side + 1, size=(_NUM_CANDIDATES, 2))
            ok = np.ones(_NUM_CANDIDATES, dtype=bool)
            for box in boxes:
                ok &= _separated(cand, side, box, gap)
            hits = np.flatnonzero(ok)
            if hits.size == 0:
                break  # painted into a corner: start again with new sizes
            boxes.append((int(cand[hits[0], 0]), int(cand[hits[0], 1]), side))
        else:
            return boxes
    raise RuntimeError(f"could not place {count} objects in a {size}x{size} image")


def _place_relation(relation: str, rng: np.random.Generator, size: int) -> list[Box]:
    """Boxes [a, b] for `a relation b`, each object in its own half along the relation's axis
    (a left of b: a's box in the left half, b's in the right), centres at most 4 px apart
    (x 1/8 of the image) across it: the layout is unambiguous, as in GenEval's images."""
    lo, hi = object_size_range(size)
    axis = 1 if relation in ("left of", "right of") else 0  # column 1 = x, 0 = y
    a_low = relation in ("left of", "above")  # a in the half with the smaller coordinate
    half, jitter = size // 2, max(1, size // 8)
    for _ in range(_MAX_ATTEMPTS):
        side_a, side_b = rng.integers(lo, hi + 1, size=2).tolist()
        along_a = _in_half(rng, side_a, half, size, low=a_low)
        along_b = _in_half(rng, side_b, half, size, low=not a_low)
        across_a = int(rng.integers(0, size - side_a + 1))
        centre_b = across_a + side_a / 2 + int(rng.integers(-jitter, jitter + 1))
        across_b = int(np.clip(round(centre_b - side_b / 2), 0, size - side_b))
        if axis == 1:
            return [(across_a, along_a, side_a), (across_b, along_b, side_b)]
        return [(along_a, across_a, side_a), (along_b, across_b, side_b)]
    raise RuntimeError(f"could not place a {relation!r} pair in a {size}x{size} image")


def _in_half(rng: np.random.Generator, side: int, half: int, size: int, low: bool) -> int:
    """A start coordinate keeping a box of ``side`` inside one half, 1 px off the middle."""
    if low:
        return int(rng.integers(0, max(1, half - side)))
    return int(rng.integers(half + 1, max(half + 2, size - side + 1)))


def _check_size(size: int) -> None:
    if not isinstance(size, int) or size < MIN_IMAGE_SIZE:
        raise ValueError(
            f"image size must be an int >= {MIN_IMAGE_SIZE} (room for four objects), got {size!r}"
        )


def render(prompt: ShapesPrompt | str, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A correct (size, size, 3) uint8 image for `prompt`, varied by `rng`.

    Objects prompts get one object, pair prompts the two, count prompts exactly `count`
    objects of the shape, relation prompts the two objects in the relation; nothing else.
    An object without a colour gets one at random (each object its own).
    """
    _check_size(size)
    p = as_prompt(prompt)
    image = _background(rng, size)
    if isinstance(p, CountPrompt):
        boxes = _place_count(p.count, rng, size)
        specs = [ObjectSpec(p.colour, p.shape)] * p.count
    elif isinstance(p, ObjectPrompt):
        boxes, specs = _place_count(1, rng, size), [p.obj]
    elif isinstance(p, PairPrompt):
        boxes, specs = _place_count(2, rng, size), [p.a, p.b]
    else:
        boxes, specs = _place_relation(p.relation, rng, size), [p.a, p.b]
    for (top, left, side), spec in zip(boxes, specs, strict=True):
        colour = spec.colour or COLOURS[int(rng.integers(len(COLOURS)))]
        image[top : top + side, left : left + side][shape_mask(spec.shape, side)] = PALETTE[colour]
    return image


def render_batch(
    prompts: Sequence[ShapesPrompt | str], rng: np.random.Generator, size: int = 32
) -> np.ndarray:
    """Render each prompt in order with the shared `rng`: (B, size, size, 3) uint8."""
    _check_size(size)
    out = np.empty((len(prompts), size, size, 3), dtype=np.uint8)  # (B, H, W, 3)
    for i, prompt in enumerate(prompts):
        out[i] = render(prompt, rng, size)
    return out
