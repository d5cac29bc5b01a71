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


def _objects(p: ShapesPrompt) -> list[ObjectSpec]:
    if isinstance(p, ObjectPrompt):
        return [p.obj]
    if isinstance(p, PairPrompt | RelationPrompt):
        return [p.a, p.b]
    return [ObjectSpec(p.colour, p.shape)]


def _rebuild(p: ShapesPrompt, objs: list[ObjectSpec]) -> ShapesPrompt | None:
    """``p`` with its objects replaced, or None when that is not a valid prompt."""
    try:
        if isinstance(p, ObjectPrompt):
            return ObjectPrompt(objs[0])
        if isinstance(p, CountPrompt):
            return CountPrompt(p.count, objs[0].colour, objs[0].shape)
        if isinstance(p, PairPrompt):
            return PairPrompt(objs[0], objs[1])
        return RelationPrompt(objs[0], p.relation, objs[1])
    except ValueError:  # e.g. a shape change that made the two objects the same
        return None


def _replaced(p: ShapesPrompt, field: str, options: tuple[str, ...]) -> list[ShapesPrompt | None]:
    """Every prompt with one object's ``field`` (colour or shape) set to another option."""
    objs, out = _objects(p), []
    for i, obj in enumerate(objs):
        if field == "colour" and obj.colour is None:
            continue
        for value in options:
            if value != getattr(obj, field):
                new = list(objs)
                new[i] = dataclasses.replace(obj, **{field: value})
                out.append(_rebuild(p, new))
    return out


def candidates(p: ShapesPrompt, kind: str) -> list[ShapesPrompt]:
    """Every valid prompt that differs from ``p`` by one change of ``kind``."""
    objs = _objects(p)
    found: list[ShapesPrompt | None] = []
    if kind == "colour":
        found = _replaced(p, "colour", COLOURS)
    elif kind == "shape":
        found = _replaced(p, "shape", SHAPES)
    elif kind == "count" and isinstance(p, CountPrompt):
        found = [dataclasses.replace(p, count=n) for n in range(1, MAX_COUNT + 1)]
    elif kind == "relation" and isinstance(p, RelationPrompt):
        found = [dataclasses.replace(p, relation=OPPOSITE[p.relation])]
    elif kind == "swap" and len(objs) == 2:
        a, b = objs
        new = [dataclasses.replace(a, colour=b.colour), dataclasses.replace(b, colour=a.colour)]
        found = [_rebuild(p, new)]
    elif kind == "drop":
        if len(objs) == 2:
            found += [ObjectPrompt(o) for o in objs]
        if any(o.colour for o in objs):
            found.append(_rebuild(p, [dataclasses.replace(o, colour=None) for o in objs]))
    return [c for c in dict.fromkeys(found) if c is not None and c != p]


def applicable(p: ShapesPrompt) -> list[str]:
    """The noise kinds that can change ``p`` into another valid prompt."""
    return [k for k in NOISE_KINDS if candidates(p, k)]


def corrupt(p: ShapesPrompt, kind: str, rng: np.random.Generator) -> ShapesPrompt:
    """``p`` with one detail changed as ``kind`` says: uniform over ``candidates(p, kind)``."""
    options = candidates(p, kind)
    if not options:
        raise ValueError(f"noise kind {kind!r} cannot change {p.text!r}")
    return options[int(rng.integers(len(options)))]


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
