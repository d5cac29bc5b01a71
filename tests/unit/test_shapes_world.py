"""The `shapes` world: grammar and split, renderer, verifier, prompt files."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from worlds.shapes import (
    COLOURS,
    PALETTE,
    RELATIONS,
    SHAPES,
    CountPrompt,
    ObjectSpec,
    RelationPrompt,
    ShapesPrompt,
    VerifyResult,
    all_prompts,
    heldout_prompts,
    load_prompt_file,
    parse_prompt,
    render,
    render_batch,
    split_prompts,
    summarize,
    train_prompts,
    verify,
    verify_batch,
)
from worlds.shapes.grammar import (
    CATEGORIES,
    MAX_COUNT,
    ObjectPrompt,
    PairPrompt,
    category,
    is_benchmark,
    pretrain_prompts,
)
from worlds.shapes.world import ShapesConfig, ShapesWorld

pytestmark = pytest.mark.unit

# sha256 of the sorted texts joined by "\n": changes only if the split changes.
HELDOUT_SHA256 = "59c30055fd57cc36d62e96e4c2cad2039ac068fb75915ee74788da9bcb8536d5"
# The same of every held-out text of the grammar (what the pretrain split leaves out).
HELD_OUT_OF_GRAMMAR_SHA256 = "8b22caf98ebce7aed27d3a8a7055cbd4786fa8fed1ac3a1341e716ef15d9acd1"
SEEDS = (0, 1, 2)


def _texts(prompts: Iterable[ShapesPrompt]) -> set[str]:
    return {p.text for p in prompts}


def _digest(prompts: Iterable[ShapesPrompt]) -> str:
    return hashlib.sha256("\n".join(sorted(p.text for p in prompts)).encode()).hexdigest()


def _obj(shape: str, colour: str | None = None) -> ObjectSpec:
    return ObjectSpec(colour, shape)


def _held_out_of_grammar() -> list[ShapesPrompt]:
    """Every held-out prompt of the grammar (benchmark or not): what pretraining never sees."""
    pretrain = _texts(pretrain_prompts())
    return [p for p in all_prompts() if p.text not in pretrain]


def _pairs(prompts: Iterable[ShapesPrompt], cat: str) -> set[frozenset[ObjectSpec]]:
    """Unordered object pairs of the pair / relation prompts of one category."""
    return {
        frozenset((p.a, p.b))
        for p in prompts
        if isinstance(p, PairPrompt | RelationPrompt) and p.category == cat
    }


# --- grammar -------------------------------------------------------------------------------


def test_prompt_counts() -> None:
    prompts = all_prompts()
    kinds = Counter(type(p).__name__ for p in prompts)
    # Colour-free then coloured: objects 3 + 18; counts 3*4 + 18*4; pairs of different
    # shapes (and colours) 3*2 + 18*10; relations of different objects 3*2*4 + 18*17*4.
    assert kinds == {
        "ObjectPrompt": 3 + 18,
        "CountPrompt": 12 + 72,
        "PairPrompt": 6 + 180,
        "RelationPrompt": 24 + 1224,
    }
    assert len(_texts(prompts)) == len(prompts) == 1539
    assert Counter(p.category for p in prompts) == {
        "single_object": 3,
        "two_object": 6,
        "counting": 84,
        "colors": 18,
        "position": 1248,
        "color_attr": 180,
    }
    assert sum(is_benchmark(p) for p in prompts) == 243  # 3 + 6 + 12 + 18 + 24 + 180


def test_split_sizes_per_category() -> None:
    assert Counter(p.category for p in train_prompts()) == {
        "single_object": 3,
        "two_object": 4,
        "counting": 9,
        "colors": 12,
        "position": 16,
        "color_attr": 144,
    }
    assert Counter(p.category for p in heldout_prompts()) == {
        "single_object": 3,
        "two_object": 2,
        "counting": 3,
        "colors": 6,
        "position": 8,
        "color_attr": 36,
    }
    assert Counter(p.category for p in pretrain_prompts()) == {
        "single_object": 3,
        "two_object": 4,
        "counting": 9 + 54,  # the benchmark's 9 and 72 - 18 coloured counts
        "colors": 12,
        "position": 16 + 976,  # the benchmark's 16 and 1224 - 248 coloured relations
        "color_attr": 144,
    }
    assert (len(train_prompts()), len(heldout_prompts()), len(pretrain_prompts())) == (
        188,
        58,
        1218,
    )


def test_palette_is_well_separated() -> None:
    rgb = np.array([PALETTE[c] for c in COLOURS], dtype=float)
    pairwise = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)[np.triu_indices(len(rgb), 1)]
    assert pairwise.min() > 140
    assert np.linalg.norm(rgb - 30.0, axis=1).min() > 160  # far from the dark background


def test_parse_round_trips_every_prompt() -> None:
    for p in all_prompts():
        assert parse_prompt(p.text) == p
        assert parse_prompt(f"  {p.text.upper()}. ") == p


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a circle", ObjectPrompt(_obj("circle"))),
        ("An  Square.", ObjectPrompt(_obj("square"))),
        ("a red circle", ObjectPrompt(_obj("circle", "red"))),
        ("A Blue\tTriangle", ObjectPrompt(_obj("triangle", "blue"))),
        ("one circle", CountPrompt(1, None, "circle")),
        ("three triangles", CountPrompt(3, None, "triangle")),
        ("one red circle", CountPrompt(1, "red", "circle")),
        ("two red circles", CountPrompt(2, "red", "circle")),
        ("One  Blue\tSquare", CountPrompt(1, "blue", "square")),
        ("a circle and a square", PairPrompt(_obj("circle"), _obj("square"))),
        (
            "a red circle and a blue square",
            PairPrompt(_obj("circle", "red"), _obj("square", "blue")),
        ),
        (
            "a red circle and a red square",  # parses; not a benchmark template
            PairPrompt(_obj("circle", "red"), _obj("square", "red")),
        ),
        ("a circle left of a square", RelationPrompt(_obj("circle"), "left of", _obj("square"))),
        (
            "a circle to the left of a square",
            RelationPrompt(_obj("circle"), "left of", _obj("square")),
        ),
        (
            "a triangle to the right of a circle",
            RelationPrompt(_obj("triangle"), "right of", _obj("circle")),
        ),
        ("a square below a circle", RelationPrompt(_obj("square"), "below", _obj("circle"))),
        (
            "a red circle to the left of a blue square",
            RelationPrompt(_obj("circle", "red"), "left of", _obj("square", "blue")),
        ),
        (
            "a green triangle to the right of a green circle.",
            RelationPrompt(_obj("triangle", "green"), "right of", _obj("circle", "green")),
        ),
        (
            "a cyan triangle below a cyan circle",
            RelationPrompt(_obj("triangle", "cyan"), "below", _obj("circle", "cyan")),
        ),
    ],
)
def test_parse_accepts_variants(text: str, expected: ShapesPrompt) -> None:
    assert parse_prompt(text) == expected


def test_article_means_object_and_count_word_means_count() -> None:
    # "a red circle" asks for at least one red circle (colors); "one red circle" for exactly one.
    assert parse_prompt("a red circle") == ObjectPrompt(_obj("circle", "red"))
    assert parse_prompt("one red circle") == CountPrompt(1, "red", "circle")
    assert category("a red circle") == "colors"
    assert category("one red circle") == "counting"
    assert category("a circle") == "single_object"
    assert category("one circle") == "counting"


def test_canonical_texts() -> None:
    assert ObjectPrompt(_obj("circle")).text == "a circle"
    assert ObjectPrompt(_obj("circle", "red")).text == "a red circle"
    assert CountPrompt(1, None, "square").text == "one square"
    assert CountPrompt(4, None, "circle").text == "four circles"
    assert CountPrompt(1, "blue", "square").text == "one blue square"
    assert CountPrompt(3, "green", "triangle").text == "three green triangles"
    assert PairPrompt(_obj("circle"), _obj("square")).text == "a circle and a square"
    pair = PairPrompt(_obj("circle", "red"), _obj("square", "blue"))
    assert pair.text == "a red circle and a blue square"
    assert RelationPrompt(_obj("circle"), "left of", _obj("triangle")).text == (
        "a circle left of a triangle"
    )
    rel = RelationPrompt(_obj("circle", "red"), "above", _obj("square", "yellow"))
    assert rel.text == "a red circle above a yellow square"
    # Aliases parse to the canonical text.
    assert parse_prompt("a circle to the right of a square").text == "a circle right of a square"


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        (ObjectPrompt(_obj("circle")), "single_object"),
        (ObjectPrompt(_obj("circle", "red")), "colors"),
        (PairPrompt(_obj("circle"), _obj("square")), "two_object"),
        (PairPrompt(_obj("circle", "red"), _obj("square", "blue")), "color_attr"),
        (CountPrompt(3, None, "circle"), "counting"),
        (CountPrompt(3, "red", "circle"), "counting"),
        (RelationPrompt(_obj("circle"), "above", _obj("square")), "position"),
        (RelationPrompt(_obj("circle", "red"), "above", _obj("square", "blue")), "position"),
    ],
)
def test_category(prompt: ShapesPrompt, expected: str) -> None:
    assert prompt.category == expected
    assert category(prompt) == category(prompt.text) == expected
    assert ShapesWorld().category(prompt.text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "circle",
        "a",
        "a red",
        "red circle",
        "five circles",
        "zero circles",
        "two circle",
        "one circles",
        "a circles",
        "two red circle",
        "one red circles",
        "two pink circles",
        "a pink circle",
        "two red hexagons",
        "a hexagon",
        "a circle near a square",
        "a red circle near a blue square",
        "a red circle left of",
        "a circle and",
        "red circle left of blue square",
        "circle and square",
        "a circle on the left of a square",
        "a circle to the left a square",
        "a circle and a square and a triangle",
        "a circle left of a square and a triangle",
        "two circles left of a square",
        "one cyan triangle below a cyan circle",  # counts are not articles
    ],
)
def test_parse_errors_name_text_and_grammar(text: str) -> None:
    with pytest.raises(ValueError, match="cannot parse prompt") as err:
        parse_prompt(text)
    assert repr(text) in str(err.value)
    message = str(err.value)
    assert "colours: red, green" in message and "left of" in message
    assert "shapes: circle, square, triangle" in message


def test_parse_rejects_old_count_aliases() -> None:
    # "a"/"an" are articles of objects now, never counts; "one" is not an article.
    assert not isinstance(parse_prompt("a blue square"), CountPrompt)
    with pytest.raises(ValueError, match="cannot parse prompt"):
        parse_prompt("a blue squares")
    with pytest.raises(ValueError, match="cannot parse prompt"):
        parse_prompt("one red circle and one blue square")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a red circle left of a red circle", "must differ in colour or shape"),
        ("a circle left of a circle", "must differ in colour or shape"),
        ("a circle above a circle", "must differ in colour or shape"),
        ("a circle and a circle", "must differ in colour or shape"),
        ("a red square and a red square", "must differ in colour or shape"),
        ("a red circle and a blue circle", "must be different shapes"),
        ("a red circle left of a square", "both objects have a colour or neither"),
        ("a circle and a blue square", "both objects have a colour or neither"),
    ],
)
def test_parse_rejects_invalid_object_combinations(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        parse_prompt(text)
    assert str(err.value).startswith(f"invalid prompt {text!r}")


def test_parse_rejects_non_strings() -> None:
    with pytest.raises(ValueError, match="must be a string, got int"):
        parse_prompt(3)  # type: ignore[arg-type]


def test_same_shape_relation_with_different_colours_is_valid() -> None:
    p = parse_prompt("a red circle left of a blue circle")
    assert p == RelationPrompt(_obj("circle", "red"), "left of", _obj("circle", "blue"))


def test_prompt_constructors_validate() -> None:
    with pytest.raises(ValueError, match=r"count must be 1\.\.4"):
        CountPrompt(5, "red", "circle")
    with pytest.raises(ValueError, match=r"count must be 1\.\.4"):
        CountPrompt(0, None, "circle")
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        CountPrompt(1, "pink", "circle")
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        CountPrompt(1, None, "hexagon")
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        ObjectSpec("pink", "circle")
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        ObjectSpec(None, "hexagon")
    with pytest.raises(ValueError, match="unknown relation"):
        RelationPrompt(_obj("circle", "red"), "near", _obj("circle", "blue"))
    with pytest.raises(ValueError, match="must differ in colour or shape"):
        RelationPrompt(_obj("circle"), "above", _obj("circle"))
    with pytest.raises(ValueError, match="both objects have a colour or neither"):
        RelationPrompt(_obj("circle", "red"), "above", _obj("square"))
    with pytest.raises(ValueError, match="must be different shapes"):
        PairPrompt(_obj("circle", "red"), _obj("circle", "blue"))
    with pytest.raises(ValueError, match="both objects have a colour or neither"):
        PairPrompt(_obj("circle"), _obj("square", "blue"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        CountPrompt(1, "red", "circle").count = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ObjectPrompt(_obj("circle")).obj = _obj("square")  # type: ignore[misc]


def test_split_is_a_partition_of_the_benchmark() -> None:
    train, held = _texts(train_prompts()), _texts(heldout_prompts())
    single = _texts(p for p in all_prompts() if p.category == "single_object")
    assert single == {"a circle", "a square", "a triangle"}
    assert train & held == single  # single_object is in both splits, nothing else is
    assert train | held == _texts(p for p in all_prompts() if is_benchmark(p))
    for p in [*train_prompts(), *heldout_prompts()]:
        assert is_benchmark(p), p.text
    # The benchmark's templates: no colours but in colors and color_attr.
    for p in train_prompts():
        if isinstance(p, CountPrompt):
            assert p.colour is None
        if isinstance(p, RelationPrompt):
            assert p.a.colour is None and p.b.colour is None
    assert len(train_prompts()) == len(train) and len(heldout_prompts()) == len(held)


def test_pretrain_split_is_everything_not_held_out() -> None:
    pretrain, train = _texts(pretrain_prompts()), _texts(train_prompts())
    held_benchmark = _texts(heldout_prompts()) - train
    assert train <= pretrain
    assert not pretrain & held_benchmark
    held = _held_out_of_grammar()
    assert len(held) == 321 and not _texts(held) & pretrain
    assert pretrain | _texts(held) == _texts(all_prompts())
    assert any(isinstance(p, CountPrompt) and p.colour for p in pretrain_prompts())
    assert any(isinstance(p, RelationPrompt) and p.a.colour for p in pretrain_prompts())
    # No held-out object pair meets in any pretraining pair or relation.
    assert not set().union(*(_pairs(held, c) for c in CATEGORIES)) & set().union(
        *(_pairs(pretrain_prompts(), c) for c in CATEGORIES)
    )


def test_split_names() -> None:
    assert split_prompts("train") == train_prompts()
    assert split_prompts("heldout") == heldout_prompts()
    assert split_prompts("pretrain") == pretrain_prompts()
    assert split_prompts("all") == all_prompts()
    with pytest.raises(
        ValueError, match=r"unknown prompt split 'test'.*train, heldout, pretrain, all"
    ):
        split_prompts("test")


def test_heldout_counting_one_count_per_shape() -> None:
    held = [p for p in heldout_prompts() if isinstance(p, CountPrompt)]
    assert sorted(p.shape for p in held) == sorted(SHAPES)
    assert all(p.colour is None for p in held)
    assert len({p.count for p in held}) == 3  # spread over the counts
    train = _texts(p for p in train_prompts() if isinstance(p, CountPrompt))
    assert len(train) == 3 * MAX_COUNT - 3 and not train & _texts(held)


def test_heldout_counting_one_count_per_colour_shape() -> None:
    held = [p for p in _held_out_of_grammar() if isinstance(p, CountPrompt) and p.colour]
    assert sorted((p.colour, p.shape) for p in held) == sorted(
        (c, s) for c in COLOURS for s in SHAPES
    )
    assert sorted(np.bincount([p.count for p in held])[1:].tolist()) == [4, 4, 5, 5]


def test_heldout_colors_two_colours_per_shape() -> None:
    held = [p for p in heldout_prompts() if isinstance(p, ObjectPrompt) and p.obj.colour]
    assert Counter(p.obj.shape for p in held) == dict.fromkeys(SHAPES, 2)
    train = [p for p in train_prompts() if p.category == "colors"]
    assert Counter(p.obj.shape for p in train if isinstance(p, ObjectPrompt)) == dict.fromkeys(
        SHAPES, len(COLOURS) - 2
    )
    assert not _texts(held) & _texts(train)


def test_heldout_two_object_pair_never_meets_in_train() -> None:
    held, train = _pairs(heldout_prompts(), "two_object"), _pairs(train_prompts(), "two_object")
    assert len(held) == 1 and len(train) == 2  # one of the three shape pairs
    assert not held & train
    assert len([p for p in heldout_prompts() if p.category == "two_object"]) == 2  # both orders


def test_heldout_position_pairs_never_meet_in_train() -> None:
    held, train = _pairs(heldout_prompts(), "position"), _pairs(train_prompts(), "position")
    assert len(held) == 1 and len(train) == 2
    assert not held & train
    relations = [p for p in heldout_prompts() if isinstance(p, RelationPrompt)]
    assert len(relations) == 2 * len(RELATIONS)  # both orders, every relation
    assert {(p.a, p.relation, p.b) for p in relations} == {
        (a, r, b) for a, b in itertools.permutations(next(iter(held))) for r in RELATIONS
    }


def test_heldout_coloured_relation_pairs_never_meet_in_pretrain() -> None:
    held = [p for p in _held_out_of_grammar() if isinstance(p, RelationPrompt) and p.a.colour]
    pairs = _pairs(held, "position")
    assert len(pairs) == 31  # 20 % of the 153 unordered coloured object pairs
    assert len(held) == 31 * 2 * len(RELATIONS)  # both orders, every relation
    assert not pairs & _pairs(pretrain_prompts(), "position")


def test_heldout_color_attr_pairs_never_meet_in_train() -> None:
    held, train = _pairs(heldout_prompts(), "color_attr"), _pairs(train_prompts(), "color_attr")
    assert len(held) == 18 and len(train) == 72  # 20 % of the 90 valid coloured pairs
    assert not held & train
    prompts = [p for p in heldout_prompts() if isinstance(p, PairPrompt) and p.a.colour]
    assert {(p.a, p.b) for p in prompts} == {
        ab for pair in held for ab in itertools.permutations(pair)
    }  # both orders


def test_split_is_stable() -> None:
    held = heldout_prompts()
    assert _digest(held) == HELDOUT_SHA256
    assert _digest(_held_out_of_grammar()) == HELD_OUT_OF_GRAMMAR_SHA256
    assert [p.text for p in held[:6]] == [
        "a circle",
        "a circle and a triangle",
        "three squares",
        "a blue triangle",
        "a triangle right of a circle",
        "a red circle and a cyan triangle",
    ]
    assert split_prompts("heldout") == held  # cached / recomputed alike
    # Categories alternate while they last, so a prefix of a split is balanced.
    assert [p.category for p in held[:12]] == list(CATEGORIES) * 2
    assert [p.category for p in train_prompts()[:18]] == list(CATEGORIES) * 3


# --- renderer ------------------------------------------------------------------------------


def _objects_in(image: np.ndarray) -> list[tuple[str, slice, slice]]:
    """Exact-palette components of a rendered image: (colour, rows, cols) of each."""
    found = []
    for colour, rgb in PALETTE.items():
        labels, _ = ndimage.label(np.all(image == rgb, axis=-1))
        found += [(colour, *box) for box in ndimage.find_objects(labels) if box is not None]
    return found


def _shape_in(image: np.ndarray, colour: str, ys: slice, xs: slice) -> str:
    """The shape of a crisp rendered component: a square fills its box, a triangle's top
    row is narrower than its bottom row, a circle's are alike."""
    mask = np.all(image[ys, xs] == PALETTE[colour], axis=-1)
    if mask.all():
        return "square"
    return "triangle" if mask[0].sum() < mask[-1].sum() else "circle"


def _boxes_apart(a: tuple[slice, slice], b: tuple[slice, slice], gap: int) -> bool:
    (ay, ax), (by, bx) = a, b
    return (
        ay.stop + gap <= by.start
        or by.stop + gap <= ay.start
        or ax.stop + gap <= bx.start
        or bx.stop + gap <= ax.start
    )


def test_render_shapes_dtypes_and_strings() -> None:
    rng = np.random.default_rng(0)
    image = render("two red circles", rng)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert render(CountPrompt(1, "blue", "square"), rng, size=48).shape == (48, 48, 3)
    batch = render_batch(["one red square", heldout_prompts()[1]], rng)
    assert batch.shape == (2, 32, 32, 3) and batch.dtype == np.uint8
    assert render_batch([], rng).shape == (0, 32, 32, 3)
    with pytest.raises(ValueError, match="image size must be an int >= 24"):
        render("one red square", rng, size=16)
    with pytest.raises(ValueError, match="cannot parse prompt"):
        render("one red blob", rng)


def test_render_is_deterministic_per_seed() -> None:
    prompts = heldout_prompts()[:12]  # every category
    first = render_batch(prompts, np.random.default_rng(7))
    again = render_batch(prompts, np.random.default_rng(7))
    other = render_batch(prompts, np.random.default_rng(8))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("seed", SEEDS)
def test_render_count_prompts_draw_exactly_count_objects(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for p in all_prompts():
        if not isinstance(p, CountPrompt):
            continue
        image = render(p, rng)
        objects = _objects_in(image)
        assert len(objects) == p.count, p.text
        if p.colour is not None:
            assert {colour for colour, *_ in objects} == {p.colour}
        assert all(_shape_in(image, *o) == p.shape for o in objects), p.text
        boxes = [(ys, xs) for _, ys, xs in objects]
        assert all(_boxes_apart(a, b, 2) for i, a in enumerate(boxes) for b in boxes[:i])
        for _, ys, xs in objects:  # sides 7-11 px at 32x32
            assert 7 <= ys.stop - ys.start <= 11 and 7 <= xs.stop - xs.start <= 11
        background = image[np.all(np.isin(image, list(PALETTE.values())), axis=-1) == 0]
        assert background.min() >= 12 and background.max() <= 48


def test_render_colour_free_objects_get_varied_colours() -> None:
    rng = np.random.default_rng(0)
    colours = Counter(c for _ in range(120) for c, *_ in _objects_in(render("a circle", rng)))
    assert set(colours) == set(COLOURS)
    assert sum(colours.values()) == 120


@pytest.mark.parametrize(
    "text",
    ["a circle", "a red square", "a circle and a triangle", "a red circle and a blue square"],
)
def test_render_object_and_pair_prompts_draw_just_their_objects(text: str) -> None:
    p = parse_prompt(text)
    assert isinstance(p, ObjectPrompt | PairPrompt)
    specs = [p.obj] if isinstance(p, ObjectPrompt) else [p.a, p.b]
    rng = np.random.default_rng(1)
    for _ in range(30):
        image = render(p, rng)
        objects = _objects_in(image)
        assert len(objects) == len(specs), text
        found = sorted((_shape_in(image, *o), o[0]) for o in objects)
        assert [s for s, _ in found] == sorted(spec.shape for spec in specs)
        for spec in specs:
            if spec.colour is not None:
                assert (spec.shape, spec.colour) in found


def _halves_hold(image: np.ndarray, p: RelationPrompt) -> None:
    """Each object in its own half along the relation's axis, centres close across it."""
    size = image.shape[0]
    half = size // 2
    objects = [(c, ys, xs, _shape_in(image, c, ys, xs)) for c, ys, xs in _objects_in(image)]
    assert len(objects) == 2, p.text

    def find(spec: ObjectSpec) -> tuple[slice, slice]:
        hits = [
            (ys, xs) for c, ys, xs, s in objects if s == spec.shape and spec.colour in (None, c)
        ]
        assert len(hits) == 1, (p.text, objects)
        return hits[0]

    (ay, ax), (by, bx) = find(p.a), find(p.b)
    assert _boxes_apart((ay, ax), (by, bx), 2)
    along_a, along_b, across_a, across_b = {
        "left of": (ax, bx, ay, by),
        "right of": (bx, ax, by, ay),
        "above": (ay, by, ax, bx),
        "below": (by, ay, bx, ax),
    }[p.relation]
    # along_a is the object in the low half (smaller coordinate), 1 px off the middle.
    assert along_a.stop <= half - 1 and along_b.start >= half + 1, p.text
    centre = (across_a.start + across_a.stop - across_b.start - across_b.stop) / 2
    assert abs(centre) <= size // 8 + 1, p.text
    # GenEval-style: a clear offset along the axis.
    along = (along_b.start + along_b.stop - along_a.start - along_a.stop) / 2
    assert along >= 8 and abs(centre) <= along / 2, p.text


def test_render_relation_prompts_put_each_object_in_its_half() -> None:
    rng = np.random.default_rng(3)
    relations = [p for p in all_prompts() if isinstance(p, RelationPrompt)]
    plain = [p for p in relations if p.a.colour is None]
    assert len(plain) == 24
    for p in plain * 5 + relations[len(plain) :: 4]:  # a quarter of the coloured ones
        _halves_hold(render(p, rng), p)


@pytest.mark.parametrize("size", [24, 48, 64])
def test_render_relation_halves_scale_with_the_image(size: int) -> None:
    rng = np.random.default_rng(size)
    for relation in RELATIONS:
        for p in (
            RelationPrompt(_obj("circle"), relation, _obj("square")),
            RelationPrompt(_obj("triangle", "red"), relation, _obj("triangle", "blue")),
        ):
            for _ in range(10):
                image = render(p, rng, size=size)
                _halves_hold(image, p)
                assert verify(image, p).passed, (p.text, size)


# --- verifier ------------------------------------------------------------------------------


def _valid(make: Callable[..., ShapesPrompt], *args: object) -> ShapesPrompt | None:
    """``make(*args)``, or None where that is not a valid prompt."""
    try:
        return make(*args)
    except ValueError:
        return None


def _other_shapes(shape: str) -> list[str]:
    return [s for s in SHAPES if s != shape]


def _other_colours(colour: str | None) -> list[str]:
    return [c for c in COLOURS if c != colour]


def _mismatches(p: ShapesPrompt) -> list[ShapesPrompt]:
    """Prompts whose correct images must fail `p` in at least one clause."""
    out: list[ShapesPrompt | None] = []
    if isinstance(p, ObjectPrompt):
        out += [ObjectPrompt(_obj(s, p.obj.colour)) for s in _other_shapes(p.obj.shape)]
        if p.obj.colour:
            out += [ObjectPrompt(_obj(p.obj.shape, c)) for c in _other_colours(p.obj.colour)]
    elif isinstance(p, CountPrompt):
        out += [dataclasses.replace(p, count=n) for n in range(1, 5) if n != p.count]
        out += [dataclasses.replace(p, shape=s) for s in _other_shapes(p.shape)]
        if p.colour:
            out += [dataclasses.replace(p, colour=c) for c in _other_colours(p.colour)]
    elif isinstance(p, PairPrompt):  # an object of another shape or colour
        third = next(s for s in SHAPES if s not in (p.a.shape, p.b.shape))
        out += [_valid(PairPrompt, _obj(third, p.a.colour), p.b)]
        out += [_valid(PairPrompt, p.a, _obj(third, p.b.colour))]
        if p.a.colour:
            out += [_valid(PairPrompt, _obj(p.a.shape, c), p.b) for c in COLOURS]
            out += [_valid(PairPrompt, _obj(p.a.shape, p.b.colour), _obj(p.b.shape, p.a.colour))]
    else:
        out += [dataclasses.replace(p, relation=r) for r in RELATIONS if r != p.relation]
        for s in _other_shapes(p.a.shape):
            out.append(_valid(RelationPrompt, _obj(s, p.a.colour), p.relation, p.b))
        for s in _other_shapes(p.b.shape):
            out.append(_valid(RelationPrompt, p.a, p.relation, _obj(s, p.b.colour)))
        if p.a.colour:
            for c in _other_colours(p.a.colour):
                if c != p.b.colour:  # the other colour must be missing from the image
                    out.append(_valid(RelationPrompt, _obj(p.a.shape, c), p.relation, p.b))
    return [q for q in out if q is not None and q.text != p.text]


def _by_category(prompts: list[ShapesPrompt], n: int, seed: int) -> list[ShapesPrompt]:
    """n prompts of each category, drawn (with replacement) from `prompts`."""
    rng = np.random.default_rng(seed)
    out: list[ShapesPrompt] = []
    for cat in CATEGORIES:
        mine = [p for p in prompts if p.category == cat]
        out += [mine[int(i)] for i in rng.integers(0, len(mine), n)]
    return out


def test_verifier_passes_ground_truth_of_every_prompt() -> None:
    prompts = all_prompts()
    results = verify_batch(render_batch(prompts, np.random.default_rng(0)), prompts)
    summary = summarize(results, [p.category for p in prompts])
    assert summary["accuracy"] >= 0.99, summary
    assert set(summary["category_accuracy"]) == set(CATEGORIES)
    assert min(summary["category_accuracy"].values()) >= 0.98, summary["category_accuracy"]
    assert set(summary["clause_accuracy"]) == {"colour", "shape", "count", "position"}


@pytest.mark.parametrize("seed", SEEDS)
def test_verifier_passes_ground_truth_per_category(seed: int) -> None:
    prompts = _by_category(all_prompts(), 40, seed)
    results = verify_batch(render_batch(prompts, np.random.default_rng(seed)), prompts)
    summary = summarize(results, [p.category for p in prompts])
    assert summary["num_prompts"] == len(prompts) == 240
    assert summary["category_images"] == dict.fromkeys(CATEGORIES, 40)
    assert min(summary["category_accuracy"].values()) >= 0.95, summary["category_accuracy"]
    assert summary["overall"] >= 0.98, summary


@pytest.mark.parametrize("seed", SEEDS)
def test_verifier_rejects_mismatched_images(seed: int) -> None:
    prompts = _by_category(all_prompts(), 40, seed)
    rng = np.random.default_rng(seed)
    wrong = []
    for p in prompts:
        options = _mismatches(p)
        assert options, p.text
        wrong.append(options[int(rng.integers(len(options)))])
    images = render_batch(wrong, rng)
    results = verify_batch(images, prompts)
    summary = summarize(results, [p.category for p in prompts])
    assert summary["accuracy"] < 0.05, summary
    assert max(summary["category_accuracy"].values()) <= 0.1, summary["category_accuracy"]
    assert summary["mean_reward"] < 0.8, summary


@pytest.mark.parametrize("sigma", [15.0, 25.0])
def test_verifier_tolerates_noise(sigma: float) -> None:
    prompts = _by_category(all_prompts(), 40, 4)
    images = render_batch(prompts, np.random.default_rng(4))
    noise = np.random.default_rng(5).normal(0.0, sigma, images.shape)
    noisy = np.clip(images + noise, 0, 255).astype(np.uint8)
    summary = summarize(verify_batch(noisy, prompts), [p.category for p in prompts])
    assert summary["accuracy"] >= 0.95, summary
    assert min(summary["category_accuracy"].values()) >= 0.9, summary["category_accuracy"]


def test_verifier_tolerates_slight_blur() -> None:
    prompts = _by_category(all_prompts(), 40, 6)
    images = render_batch(prompts, np.random.default_rng(6))
    blurred = ndimage.gaussian_filter(images.astype(float), sigma=(0, 0.5, 0.5, 0))
    noisy = blurred + np.random.default_rng(7).normal(0.0, 10.0, images.shape)
    images = np.clip(noisy, 0, 255).astype(np.uint8)
    summary = summarize(verify_batch(images, prompts), [p.category for p in prompts])
    assert summary["accuracy"] >= 0.95, summary
    assert min(summary["category_accuracy"].values()) >= 0.9, summary["category_accuracy"]


def test_verifier_fails_noise_and_blank_images() -> None:
    prompts = _by_category(all_prompts(), 10, 0)
    rng = np.random.default_rng(0)
    n = len(prompts)
    blanks = {
        "uniform noise": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
        "black": np.zeros((n, 32, 32, 3), dtype=np.uint8),
        "white": np.full((n, 32, 32, 3), 255, dtype=np.uint8),
        "grey": np.full((n, 32, 32, 3), 128, dtype=np.uint8),
    }
    for name, images in blanks.items():
        assert summarize(verify_batch(images, prompts))["accuracy"] == 0.0, name


@pytest.mark.parametrize(
    ("text", "clauses"),
    [
        ("a circle", {"shape"}),
        ("a red circle", {"shape", "colour"}),
        ("a circle and a square", {"shape"}),
        ("a red circle and a blue square", {"shape", "colour"}),
        ("three circles", {"shape", "count"}),
        ("three red circles", {"colour", "shape", "count"}),
        ("a circle left of a square", {"shape", "position"}),
        ("a red circle left of a blue square", {"colour", "shape", "position"}),
    ],
)
def test_verify_clauses_per_category(text: str, clauses: set[str]) -> None:
    result = verify(render(text, np.random.default_rng(0)), text)
    assert set(result.clauses) == clauses
    assert result.passed and result.score == 1.0


def test_verify_clauses_and_score() -> None:
    rng = np.random.default_rng(0)
    result = verify(render("three red circles", rng), "two red circles")
    assert result.clauses == {"colour": True, "shape": True, "count": False}
    assert result.score == pytest.approx(2 / 3) and not result.passed
    assert len(result.detail["objects"]) == 3
    result = verify(render("three circles", rng), "two circles")
    assert result.clauses == {"shape": True, "count": False}
    assert result.score == 0.5
    result = verify(render("three squares", rng), "three circles")
    assert result.clauses == {"shape": False, "count": False} and result.score == 0.0
    result = verify(
        render("a red circle above a blue square", rng), "a red circle below a blue square"
    )
    assert result.clauses == {"colour": True, "shape": True, "position": False}
    result = verify(render("a circle above a square", rng), "a circle below a square")
    assert result.clauses == {"shape": True, "position": False} and result.score == 0.5
    result = verify(render("a blue circle", rng), "a red circle")
    assert result.clauses == {"shape": True, "colour": False} and result.score == 0.5
    result = verify(render("a square", rng), "a circle")
    assert result.clauses == {"shape": False} and result.score == 0.0
    result = verify(render("a circle and a triangle", rng), "a circle and a square")
    assert result.clauses == {"shape": False}
    result = verify(
        render("a blue circle and a red square", rng), "a red circle and a blue square"
    )  # attribute binding: both shapes and both colours, bound wrongly
    assert result.clauses == {"shape": True, "colour": False} and result.score == 0.5
    # A pair image also passes its objects' single_object prompts.
    image = render("a circle and a square", rng)
    assert verify(image, "a circle").passed and verify(image, "a square").passed
    assert not verify(image, "a triangle").passed
    big = render("a green triangle right of a yellow circle", rng, size=64)
    assert verify(big, "a green triangle right of a yellow circle").passed
    mirrored = render("a triangle right of a circle", rng, size=64)
    assert verify(mirrored, "a circle left of a triangle").passed  # the same layout
    assert not verify(mirrored, "a circle right of a triangle").passed


def test_verify_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="uint8"):
        verify(np.zeros((32, 32, 3), dtype=np.float32), "one red circle")
    with pytest.raises(ValueError, match=re.escape("(H, W, 3)")):
        verify(np.zeros((32, 32), dtype=np.uint8), "one red circle")
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        verify_batch(np.zeros((2, 32, 32, 3), dtype=np.uint8), ["one red circle"])


def test_summarize() -> None:
    results = [
        VerifyResult(1.0, {"colour": True, "shape": True, "count": True}, True),
        VerifyResult(0.5, {"colour": True, "position": False}, False),
    ]
    assert summarize(results) == {
        "accuracy": 0.5,
        "mean_reward": 0.75,
        "clause_accuracy": {"colour": 1.0, "count": 1.0, "position": 0.0, "shape": 1.0},
        "num_prompts": 2,
    }
    with pytest.raises(ValueError, match="at least one"):
        summarize([])


def test_summarize_with_categories() -> None:
    ok = VerifyResult(1.0, {"shape": True}, True)
    bad = VerifyResult(0.0, {"shape": False}, False)
    results = [ok, ok, ok, bad, ok, bad, bad, bad]
    cats = ["single_object"] * 4 + ["counting"] * 2 + ["position"] * 2
    summary = summarize(results, cats)
    assert summary["accuracy"] == 0.5
    assert summary["category_accuracy"] == {"single_object": 0.75, "counting": 0.5, "position": 0.0}
    assert summary["category_images"] == {"single_object": 4, "counting": 2, "position": 2}
    # GenEval's overall score: the mean over categories, not over images.
    assert summary["overall"] == pytest.approx((0.75 + 0.5 + 0.0) / 3)
    assert "overall" not in summarize(results)
    with pytest.raises(ValueError, match="2 categories for 8 results"):
        summarize(results, cats[:2])


def test_world_summarize_reports_categories() -> None:
    world = ShapesWorld()
    prompts = ["a circle", "a circle", "two squares", "a red circle and a blue square"]
    images = world.render(prompts, np.random.default_rng(0))
    images[1] = 0  # one single_object image fails
    summary = world.summarize(world.verify(images, prompts), prompts)
    assert summary["category_accuracy"] == {
        "single_object": 0.5,
        "counting": 1.0,
        "color_attr": 1.0,
    }
    assert summary["overall"] == pytest.approx(2.5 / 3)
    assert summary["accuracy"] == 0.75


# --- prompt files --------------------------------------------------------------------------


def test_load_prompt_file(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text(
        "# my prompts\n\ntwo red circles\n  A Blue Square  # inline\none blue square\n"
        "a circle to the left of a triangle\n"
    )
    assert load_prompt_file(path) == [
        CountPrompt(2, "red", "circle"),
        ObjectPrompt(_obj("square", "blue")),
        CountPrompt(1, "blue", "square"),
        RelationPrompt(_obj("circle"), "left of", _obj("triangle")),
    ]
    assert load_prompt_file(str(path)) == load_prompt_file(path)
    assert ShapesWorld().prompts(str(path)) == [
        "two red circles",
        "a blue square",
        "one blue square",
        "a circle left of a triangle",
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"one red circle\n\nsome\x00binary\n", r"prompts\.txt:3: .*binary"),
        (b"one red circle\nthree \xff blue squares\n", r"prompts\.txt:2: .*not valid UTF-8"),
        (b"one red circle\n" + b"x" * 513 + b"\n", r"prompts\.txt:2: line is 513 .*at most 512"),
        (b"# c\none red circle\n\nfour red hexagons\n", r"prompts\.txt:4: cannot parse .*hexagons"),
        (b"a circle\na circle and a circle\n", r"prompts\.txt:2: invalid prompt .*must differ"),
        (b"# only a comment\n\n   \n", r"prompts\.txt' has no prompts"),
        (b"", r"prompts\.txt' has no prompts"),
    ],
)
def test_load_prompt_file_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_prompt_file(path)


def test_load_prompt_file_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot read prompt file .*missing\.txt"):
        load_prompt_file(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="cannot read prompt file"):
        load_prompt_file(tmp_path)  # a directory


def test_a_plain_world_config_gets_the_worlds_own_settings() -> None:
    from worlds.base import WorldConfig, make_world

    world = make_world(WorldConfig(name="shapes", image_size=24))
    assert isinstance(world.cfg, ShapesConfig)
    assert world.cfg.image_size == 24 and world.cfg.balance_categories
    assert world.prompts("train") == ShapesWorld().prompts("train")
