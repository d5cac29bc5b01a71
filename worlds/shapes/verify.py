"""GenEval-style verifier of the `shapes` world: reads any RGB image, scores prompt clauses.

Pipeline (works on noisy / blurry generated images, not only on rendered ones):

1. Colour segmentation: each pixel takes its nearest palette colour when within
   ``COLOUR_DISTANCE`` (Euclidean RGB), else it is background.
2. Objects: 4-connected components per colour (``scipy.ndimage.label``); components
   smaller than ``min_object_area`` (specks) are ignored.
3. Shape: a component whose mass is lopsided between opposite halves of its bounding box
   (or very sparse) is a triangle; otherwise the fill ratio of the box tells a square (~1)
   from a circle (~0.79); a box with aspect ratio beyond 2 is no shape ("other").
4. Clauses (the names are fixed: colour, shape, count, position), as GenEval checks each
   category (an object without a colour in the prompt matches an object of any colour):
   - single_object "a circle": shape (an object of the shape exists);
   - colors "a red circle": shape, colour (an object of the shape has the colour);
   - two_object "a circle and a square": shape (both shapes exist);
   - color_attr "a red circle and a blue square": shape, colour (each shape exists in its
     colour);
   - counting "three circles": shape, count (the number of objects of the shape);
     coloured "three red circles": colour (an object of the colour exists), shape (every
     object of the colour has the shape), count (of objects of the colour);
   - position "a circle left of a square": shape (both exist), position (the relation holds
     for every pair of matched objects; matched = the shape, and the colour if given, or
     the colour if none has the shape); coloured relations add colour (both colours exist).
   Position follows GenEval's ``relative_position``: with offset = centre_a - centre_b of
   the bounding boxes, each component is shrunk by 0.1 * (side_a + side_b) and normalised
   by |offset|; "left of" needs the x component < -0.5, "above" the y component < -0.5
   (image y points down), i.e. a clear offset within ~60 degrees of the axis.

The reward is the fraction of clauses passed; GenEval accuracy is the fraction of images
that pass them all (``summarize``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from scipy import ndimage

from worlds.base import Verdict
from worlds.shapes.grammar import (
    COLOURS,
    PALETTE_ARRAY,
    CountPrompt,
    ObjectPrompt,
    ObjectSpec,
    PairPrompt,
    RelationPrompt,
    ShapesPrompt,
    as_prompt,
)

COLOUR_DISTANCE: Final[float] = 90.0  # RGB distance to a palette colour to count as it
SQUARE_MIN_FILL: Final[float] = 0.9  # fill ratio >= this: square
CIRCLE_MIN_FILL: Final[float] = 0.58  # fill ratio below this: triangle (whatever its balance)
TRIANGLE_MIN_IMBALANCE: Final[float] = 0.2  # |mass of one half - the opposite| / area
MAX_ASPECT: Final[float] = 2.0  # longer / shorter box side beyond this: "other"
POSITION_THRESHOLD: Final[float] = 0.1  # GenEval's box-size margin for relations
_MIN_AREA_AT_32: Final[int] = 12  # specks below this many pixels (at 32x32) are ignored
_PALETTE_INT: Final[np.ndarray] = PALETTE_ARRAY.astype(np.int32)  # (6, 3)


@dataclass(frozen=True)
class DetectedObject:
    """One connected component of a palette colour; coordinates in pixels, y down."""

    colour: str
    shape: str  # "circle", "square", "triangle" or "other"
    area: int
    center: tuple[float, float]  # (x, y) of the bounding-box centre
    size: tuple[int, int]  # (width, height) of the bounding box
    fill: float  # area / bounding-box area


VerifyResult = Verdict
"""Clause-level verdict for one image; ``score`` is the reward in [0, 1]."""


def min_object_area(height: int, width: int) -> int:
    """Smallest component counted as an object: 12 px at 32x32 (the smallest rendered
    object has ~25; uniform noise makes 8-11 px blobs), proportional to the area."""
    return max(6, round(_MIN_AREA_AT_32 * height * width / 1024))


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"expected an (H, W, 3) RGB image array, got {shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image (0-255), got dtype {image.dtype}")


def classify_pixels(image: np.ndarray) -> np.ndarray:
    """(H, W) int8 palette index of each pixel (order of ``COLOURS``), -1 for background."""
    _check_image(image)
    pixels = image.reshape(-1, 1, 3).astype(np.int32)  # (HW, 1, 3)
    dist2 = ((pixels - _PALETTE_INT[None]) ** 2).sum(axis=2)  # (HW, 6)
    nearest = dist2.argmin(axis=1)
    close = dist2[np.arange(nearest.size), nearest] <= COLOUR_DISTANCE**2
    return np.where(close, nearest, -1).astype(np.int8).reshape(image.shape[:2])


def _half_imbalance(profile: np.ndarray) -> int:
    """|mass of the second half - the first| of a row/column profile (middle entry excluded)."""
    n = profile.size
    return abs(int(profile[(n + 1) // 2 :].sum()) - int(profile[: n // 2].sum()))


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """Shape name and fill ratio of one component, given its bounding-box crop (h, w) bool.

    Triangles are told by the mass imbalance between opposite halves of the box (an
    upright triangle holds ~3/4 of its pixels in the bottom half; circles and squares ~1/2),
    which survives blur far better than the fill ratio; circles and squares by fill.
    """
    height, width = mask.shape
    area = int(mask.sum())
    fill = area / mask.size
    if max(width, height) > MAX_ASPECT * min(width, height):
        return "other", fill
    imbalance = max(_half_imbalance(mask.sum(axis=1)), _half_imbalance(mask.sum(axis=0))) / area
    if imbalance >= TRIANGLE_MIN_IMBALANCE or fill < CIRCLE_MIN_FILL:
        return "triangle", fill
    return ("square" if fill >= SQUARE_MIN_FILL else "circle"), fill


def _components(mask: np.ndarray, colour: str, min_area: int) -> list[DetectedObject]:
    """Objects of one colour: 4-connected, so diagonal noise does not bridge two objects."""
    labels, num = ndimage.label(mask)
    areas = np.bincount(labels.ravel(), minlength=num + 1)
    objects = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        area = int(areas[index])
        if box is None or area < min_area:
            continue
        ys, xs = box
        shape, fill = classify_shape(labels[box] == index)
        objects.append(
            DetectedObject(
                colour=colour,
                shape=shape,
                area=area,
                center=((xs.start + xs.stop) / 2, (ys.start + ys.stop) / 2),
                size=(xs.stop - xs.start, ys.stop - ys.start),
                fill=fill,
            )
        )
    return objects


def detect_objects(image: np.ndarray) -> list[DetectedObject]:
    """All palette-coloured objects in an (H, W, 3) uint8 image, grouped by colour."""
    classes = classify_pixels(image)
    min_area = min_object_area(*classes.shape)
    counts = np.bincount(classes.ravel() + 1, minlength=len(COLOURS) + 1)[1:]
    objects: list[DetectedObject] = []
    for k in np.flatnonzero(counts >= min_area).tolist():
        objects.extend(_components(classes == k, COLOURS[k], min_area))
    return objects


def _count_clauses(objects: list[DetectedObject], p: CountPrompt) -> dict[str, bool]:
    if p.colour is None:  # GenEval counting: the number of objects of the class
        mine = [o for o in objects if o.shape == p.shape]
        return {"shape": bool(mine), "count": len(mine) == p.count}
    mine = [o for o in objects if o.colour == p.colour]
    return {
        "colour": bool(mine),
        "shape": bool(mine) and all(o.shape == p.shape for o in mine),
        "count": len(mine) == p.count,
    }


def _object_clauses(objects: list[DetectedObject], p: ObjectPrompt) -> dict[str, bool]:
    shaped = [o for o in objects if o.shape == p.obj.shape]
    if p.obj.colour is None:  # single_object: at least one object of the class
        return {"shape": bool(shaped)}
    return {"shape": bool(shaped), "colour": any(o.colour == p.obj.colour for o in shaped)}


def _has(objects: list[DetectedObject], spec: ObjectSpec) -> bool:
    return any(o.shape == spec.shape and spec.colour in (None, o.colour) for o in objects)


def _pair_clauses(objects: list[DetectedObject], p: PairPrompt) -> dict[str, bool]:
    shapes = {o.shape for o in objects}
    out = {"shape": p.a.shape in shapes and p.b.shape in shapes}
    if p.a.colour is not None:  # color_attr: each shape in its own colour
        out["colour"] = _has(objects, p.a) and _has(objects, p.b)
    return out


def relation_holds(a: DetectedObject, b: DetectedObject, relation: str) -> bool:
    """GenEval's relative-position test between two objects' bounding boxes."""
    offset = np.subtract(a.center, b.center)  # (x, y), y down
    norm = float(np.hypot(*offset))
    if norm == 0.0:
        return False
    margin = POSITION_THRESHOLD * np.add(a.size, b.size)
    dx, dy = np.maximum(np.abs(offset) - margin, 0.0) * np.sign(offset) / norm
    return bool(
        {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}[
            relation
        ]
    )


def _matches(
    objects: list[DetectedObject], spec: ObjectSpec, other: ObjectSpec
) -> list[DetectedObject]:
    """Objects of the spec's colour and shape; if none, of its colour but not `other`.

    The fallback lets position be scored apart from shape, without matching the other
    object of a same-colour pair ("a red circle left of a red square") to itself.
    """
    if spec.colour is None:  # any colour: the objects of the shape
        return [o for o in objects if o.shape == spec.shape]
    coloured = [o for o in objects if o.colour == spec.colour]
    shaped = [o for o in coloured if o.shape == spec.shape]
    not_other = [o for o in coloured if (o.colour, o.shape) != (other.colour, other.shape)]
    return shaped or not_other


def _relation_clauses(objects: list[DetectedObject], p: RelationPrompt) -> dict[str, bool]:
    colours = {o.colour for o in objects}
    cand_a, cand_b = _matches(objects, p.a, p.b), _matches(objects, p.b, p.a)
    pairs = [(a, b) for a in cand_a for b in cand_b if a is not b]
    out = {"colour": p.a.colour in colours and p.b.colour in colours} if p.a.colour else {}
    out["shape"] = _has(objects, p.a) and _has(objects, p.b)
    out["position"] = bool(pairs) and all(relation_holds(a, b, p.relation) for a, b in pairs)
    return out


def verify(image: np.ndarray, prompt: ShapesPrompt | str) -> VerifyResult:
    """Score one (H, W, 3) uint8 image against a prompt; see the module docstring."""
    p = as_prompt(prompt)
    objects = detect_objects(image)
    if isinstance(p, CountPrompt):
        clauses = _count_clauses(objects, p)
    elif isinstance(p, ObjectPrompt):
        clauses = _object_clauses(objects, p)
    elif isinstance(p, PairPrompt):
        clauses = _pair_clauses(objects, p)
    else:
        clauses = _relation_clauses(objects, p)
    score = sum(clauses.values()) / len(clauses)
    return VerifyResult(score, clauses, all(clauses.values()), {"objects": objects})


def verify_batch(
    images: np.ndarray | Sequence[np.ndarray], prompts: Sequence[ShapesPrompt | str]
) -> list[VerifyResult]:
    """Verify images (B, H, W, 3) against prompts (B), pairwise in order."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; need one each")
    return [verify(image, prompt) for image, prompt in zip(images, prompts, strict=True)]


def summarize(
    results: Sequence[VerifyResult], categories: Sequence[str] | None = None
) -> dict[str, Any]:
    """GenEval-style metrics over results.

    accuracy: fraction of images passing every clause; mean_reward: mean score;
    clause_accuracy: per clause, the fraction passed among results that have the clause.
    With ``categories`` (one per result): ``category_accuracy`` per category and
    ``overall``, GenEval's score: the mean of the category accuracies.
    """
    if not results:
        raise ValueError("summarize needs at least one VerifyResult, got none")
    clause_hits: dict[str, list[bool]] = {}
    for r in results:
        for name, ok in r.clauses.items():
            clause_hits.setdefault(name, []).append(ok)
    out: dict[str, Any] = {
        "accuracy": sum(r.passed for r in results) / len(results),
        "mean_reward": sum(r.score for r in results) / len(results),
        "clause_accuracy": {k: sum(v) / len(v) for k, v in sorted(clause_hits.items())},
        "num_prompts": len(results),
    }
    if categories is not None:
        if len(categories) != len(results):
            raise ValueError(f"{len(categories)} categories for {len(results)} results")
        by_cat: dict[str, list[bool]] = {}
        for r, c in zip(results, categories, strict=True):
            by_cat.setdefault(c, []).append(r.passed)
        accs = {c: sum(v) / len(v) for c, v in by_cat.items()}
        out["category_accuracy"] = accs
        out["category_images"] = {c: len(v) for c, v in by_cat.items()}
        out["overall"] = sum(accs.values()) / len(accs)
    return out
