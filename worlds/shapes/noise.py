"""Loose captions, the way web captions are: a prompt with one detail changed or dropped.

Real text-to-image base models draw almost everything GenEval asks for but bind attributes,
counts and positions loosely, because their captions were noisy web text. The `shapes` base
model is pretrained the same way: a configurable fraction of its captions
(``world.caption_noise``) describe their image wrongly in one detail, drawn among the kinds
that apply to the prompt, in proportion to ``world.noise_kinds``:

- ``colour``: one object's colour replaced by another colour;
- ``shape``: one object's shape replaced by another shape;
- ``count``: the count replaced by another count (1-4);
- ``relation``: the relation replaced by its opposite ("left of" <-> "right of", "above" <->
  "below");
- ``swap``: the two objects' colours exchanged (a binding error; coloured pairs/relations);
- ``drop``: a detail left out: the second object of a pair or relation, or the colours.

The image is always rendered from the true prompt; only its caption is corrupted. A model
trained on such data keeps the skill (it has seen every composition drawn correctly) and
follows prompts loosely: what RL with a verifier reward sharpens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Final

import numpy as np

from worlds.shapes.grammar import (
    COLOURS,
    MAX_COUNT,
    OPPOSITE,
    SHAPES,
    CountPrompt,
    ObjectPrompt,
    ObjectSpec,
    PairPrompt,
    RelationPrompt,
    ShapesPrompt,
)

NOISE_KINDS: Final[tuple[str, ...]] = ("colour", "shape", "count", "relation", "swap", "drop")


def _other(rng: np.random.Generator, options: tuple[str, ...], current: str | None) -> str:
    choices = [o for o in options if o != current]
    return choices[int(rng.integers(len(choices)))]


def _objects(p: ShapesPrompt) -> list[ObjectSpec]:
    if isinstance(p, ObjectPrompt):
        return [p.obj]
    if isinstance(p, PairPrompt | RelationPrompt):
        return [p.a, p.b]
    return [ObjectSpec(p.colour, p.shape)]


def applicable(p: ShapesPrompt) -> list[str]:
    """The noise kinds that can change ``p``."""
    objs = _objects(p)
    two = isinstance(p, PairPrompt | RelationPrompt)
    coloured = any(o.colour for o in objs)
    kinds = ["shape"]
    if coloured:
        kinds.append("colour")
    if isinstance(p, CountPrompt):
        kinds.append("count")
    if isinstance(p, RelationPrompt):
        kinds.append("relation")
    if two and coloured and objs[0].colour != objs[1].colour:
        kinds.append("swap")
    if two or coloured:
        kinds.append("drop")
    return kinds


def corrupt(p: ShapesPrompt, kind: str, rng: np.random.Generator) -> ShapesPrompt:
    """``p`` with one detail changed as ``kind`` says (``kind`` from ``applicable(p)``)."""
    if kind == "count":
        assert isinstance(p, CountPrompt)
        n = _other(rng, tuple(str(i) for i in range(1, MAX_COUNT + 1)), str(p.count))
        return dataclasses.replace(p, count=int(n))
    if kind == "relation":
        assert isinstance(p, RelationPrompt)
        return dataclasses.replace(p, relation=OPPOSITE[p.relation])
    if kind == "drop":
        return _drop(p, rng)
    objs = _objects(p)
    i = int(rng.integers(len(objs)))
    if kind == "swap":
        a, b = objs
        new = [dataclasses.replace(a, colour=b.colour), dataclasses.replace(b, colour=a.colour)]
    elif kind == "colour":
        new = list(objs)
        j = i if objs[i].colour else 1 - i
        new[j] = dataclasses.replace(objs[j], colour=_other(rng, COLOURS, objs[j].colour))
    else:
        new = list(objs)
        new[i] = dataclasses.replace(objs[i], shape=_other(rng, SHAPES, objs[i].shape))
    return _rebuild(p, new)


def _drop(p: ShapesPrompt, rng: np.random.Generator) -> ShapesPrompt:
    objs = _objects(p)
    if isinstance(p, PairPrompt | RelationPrompt) and rng.random() < 0.5:
        return ObjectPrompt(objs[int(rng.integers(2))])
    if any(o.colour for o in objs):
        return _rebuild(p, [dataclasses.replace(o, colour=None) for o in objs])
    return ObjectPrompt(objs[int(rng.integers(len(objs)))])


def _rebuild(p: ShapesPrompt, objs: list[ObjectSpec]) -> ShapesPrompt:
    """``p`` with its objects replaced; falls back to ``p`` if that would be invalid."""
    try:
        if isinstance(p, ObjectPrompt):
            return ObjectPrompt(objs[0])
        if isinstance(p, CountPrompt):
            return CountPrompt(p.count, objs[0].colour, objs[0].shape)
        if isinstance(p, PairPrompt):
            return PairPrompt(objs[0], objs[1])
        return RelationPrompt(objs[0], p.relation, objs[1])
    except ValueError:  # e.g. a shape change that made the two objects the same
        return p


def noisy_caption(
    p: ShapesPrompt, fraction: float, weights: Mapping[str, float], rng: np.random.Generator
) -> ShapesPrompt:
    """With probability ``fraction``, ``p`` with one applicable detail changed or dropped
    (kinds drawn in proportion to ``weights``); else ``p``."""
    if fraction <= 0 or rng.random() >= fraction:
        return p
    kinds = [k for k in applicable(p) if weights.get(k, 0.0) > 0]
    if not kinds:
        return p
    w = np.array([weights[k] for k in kinds], dtype=float)
    kind = kinds[int(rng.choice(len(kinds), p=w / w.sum()))]
    return corrupt(p, kind, rng)
