"""Caption noise of the `shapes` world: loose captions for pretraining, true images."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from pydantic import ValidationError

from worlds.shapes.grammar import (
    CATEGORIES,
    COLOURS,
    OPPOSITE,
    SHAPES,
    CountPrompt,
    ObjectPrompt,
    ObjectSpec,
    PairPrompt,
    RelationPrompt,
    ShapesPrompt,
    all_prompts,
    heldout_prompts,
    parse_prompt,
    pretrain_prompts,
    split_prompts,
    train_prompts,
)
from worlds.shapes.noise import NOISE_KINDS, applicable, corrupt, noisy_caption
from worlds.shapes.verify import verify
from worlds.shapes.world import ShapesConfig, ShapesWorld, balanced_by_category

pytestmark = pytest.mark.unit

ALL_KINDS = dict.fromkeys(NOISE_KINDS, 1.0)


def _objects(p: ShapesPrompt) -> list[ObjectSpec]:
    if isinstance(p, ObjectPrompt):
        return [p.obj]
    if isinstance(p, CountPrompt):
        return [ObjectSpec(p.colour, p.shape)]
    return [p.a, p.b]


def _coloured(p: ShapesPrompt) -> bool:
    return any(o.colour for o in _objects(p))


def _two(p: ShapesPrompt) -> bool:
    return isinstance(p, PairPrompt | RelationPrompt)


def _same_but_objects(p: ShapesPrompt, q: ShapesPrompt) -> bool:
    """Same kind of prompt, same count and relation (objects may differ)."""
    if type(p) is not type(q):
        return False
    if isinstance(p, CountPrompt) and isinstance(q, CountPrompt):
        return p.count == q.count
    if isinstance(p, RelationPrompt) and isinstance(q, RelationPrompt):
        return p.relation == q.relation
    return True


def _changed_objects(p: ShapesPrompt, q: ShapesPrompt) -> list[tuple[ObjectSpec, ObjectSpec]]:
    return [(a, b) for a, b in zip(_objects(p), _objects(q), strict=True) if a != b]


def _falls_back(p: ShapesPrompt, kind: str) -> bool:
    """Where ``corrupt`` may return ``p`` unchanged: the corrupted prompt would be invalid
    (two objects made equal, two same-shape objects made colour-free, a pair made one shape).
    """
    if not _two(p):
        return False
    a, b = _objects(p)
    if kind == "shape":
        return isinstance(p, PairPrompt) or a.colour == b.colour
    if kind in ("colour", "drop"):
        return isinstance(p, RelationPrompt) and a.shape == b.shape
    return False


def _corruptions(kind: str, draws: int = 3) -> list[tuple[ShapesPrompt, ShapesPrompt]]:
    rng = np.random.default_rng(0)
    return [
        (p, corrupt(p, kind, rng))
        for p in all_prompts()
        if kind in applicable(p)
        for _ in range(draws)
    ]


# --- which kinds apply ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kinds"),
    [
        ("a circle", {"shape"}),
        ("a red circle", {"shape", "colour", "drop"}),
        ("three circles", {"shape", "count"}),
        ("one circle", {"shape", "count"}),
        ("three red circles", {"shape", "colour", "count", "drop"}),
        ("a circle and a square", {"shape", "drop"}),
        ("a red circle and a blue square", {"shape", "colour", "swap", "drop"}),
        ("a red circle and a red square", {"shape", "colour", "drop"}),  # nothing to swap
        ("a circle left of a square", {"shape", "relation", "drop"}),
        ("a red circle left of a blue square", {"shape", "colour", "relation", "swap", "drop"}),
        ("a red circle above a red square", {"shape", "colour", "relation", "drop"}),
        ("a red circle below a blue circle", {"shape", "colour", "relation", "swap", "drop"}),
    ],
)
def test_applicable_kinds(text: str, kinds: set[str]) -> None:
    found = applicable(parse_prompt(text))
    assert set(found) == kinds
    assert len(found) == len(kinds)  # no duplicates


def test_applicable_kinds_follow_the_prompt_kind() -> None:
    for p in all_prompts():
        kinds = set(applicable(p))
        assert kinds <= set(NOISE_KINDS) and "shape" in kinds, p.text
        assert ("count" in kinds) == isinstance(p, CountPrompt), p.text
        assert ("relation" in kinds) == isinstance(p, RelationPrompt), p.text
        assert ("colour" in kinds) == _coloured(p), p.text
        objs = _objects(p)
        assert ("swap" in kinds) == (_two(p) and _coloured(p) and objs[0].colour != objs[1].colour)
        assert ("drop" in kinds) == (_two(p) or _coloured(p)), p.text


# --- what each kind changes ----------------------------------------------------------------


def test_corrupt_colour_changes_one_colour() -> None:
    for p, q in _corruptions("colour"):
        assert parse_prompt(q.text) == q and _same_but_objects(p, q), (p.text, q.text)
        if q == p:
            assert _falls_back(p, "colour"), p.text
            continue
        [(old, new)] = _changed_objects(p, q)
        assert new.shape == old.shape and new.colour in COLOURS and new.colour != old.colour


def test_corrupt_shape_changes_one_shape() -> None:
    for p, q in _corruptions("shape"):
        assert parse_prompt(q.text) == q and _same_but_objects(p, q), (p.text, q.text)
        if q == p:
            assert _falls_back(p, "shape"), p.text
            continue
        [(old, new)] = _changed_objects(p, q)
        assert new.colour == old.colour and new.shape in SHAPES and new.shape != old.shape


def test_corrupt_count_changes_the_count() -> None:
    for p, q in _corruptions("count"):
        assert isinstance(p, CountPrompt) and isinstance(q, CountPrompt)
        assert (q.colour, q.shape) == (p.colour, p.shape)
        assert q.count != p.count and 1 <= q.count <= 4
        assert parse_prompt(q.text) == q


def test_corrupt_relation_gives_the_opposite() -> None:
    for p, q in _corruptions("relation"):
        assert isinstance(p, RelationPrompt)
        assert q == RelationPrompt(p.a, OPPOSITE[p.relation], p.b)
    rng = np.random.default_rng(0)
    assert corrupt(parse_prompt("a circle above a square"), "relation", rng).text == (
        "a circle below a square"
    )
    assert corrupt(parse_prompt("a red circle left of a blue square"), "relation", rng).text == (
        "a red circle right of a blue square"
    )


def test_corrupt_swap_exchanges_the_colours() -> None:
    pairs = _corruptions("swap")
    assert pairs
    for p, q in pairs:
        assert isinstance(p, PairPrompt | RelationPrompt)
        assert isinstance(q, PairPrompt | RelationPrompt) and _same_but_objects(p, q)
        assert q.a == ObjectSpec(p.b.colour, p.a.shape)
        assert q.b == ObjectSpec(p.a.colour, p.b.shape)
        assert q != p and parse_prompt(q.text) == q
    rng = np.random.default_rng(0)
    assert corrupt(parse_prompt("a red circle and a blue square"), "swap", rng).text == (
        "a blue circle and a red square"
    )


def test_corrupt_drop_leaves_out_a_detail() -> None:
    for p, q in _corruptions("drop"):
        assert parse_prompt(q.text) == q, q.text
        if q == p:
            assert _falls_back(p, "drop"), p.text
        elif isinstance(q, ObjectPrompt) and _two(p):  # the second object dropped (either one)
            assert q.obj in _objects(p), (p.text, q.text)
        else:  # the colours dropped
            assert _coloured(p) and not _coloured(q) and _same_but_objects(p, q), q.text
            assert [o.shape for o in _objects(q)] == [o.shape for o in _objects(p)]
    rng = np.random.default_rng(0)
    assert corrupt(parse_prompt("a red circle"), "drop", rng).text == "a circle"
    assert corrupt(parse_prompt("three red circles"), "drop", rng).text == "three circles"


def test_corrupt_draws_every_option() -> None:
    rng = np.random.default_rng(1)

    def texts(text: str, kind: str) -> set[str]:
        p = parse_prompt(text)
        return {corrupt(p, kind, rng).text for _ in range(200)}

    assert texts("a red circle", "colour") == {f"a {c} circle" for c in COLOURS if c != "red"}
    assert texts("a circle", "shape") == {"a square", "a triangle"}
    assert texts("two circles", "count") == {"one circle", "three circles", "four circles"}
    assert texts("a red circle and a blue square", "drop") == {
        "a red circle",
        "a blue square",
        "a circle and a square",
    }
    assert texts("a circle left of a square", "drop") == {"a circle", "a square"}
    assert texts("a red circle left of a blue square", "colour") >= {
        "a red circle left of a red square",  # either object's colour
        "a blue circle left of a blue square",
    }


def test_corrupt_never_changes_object_and_count_prompts_back() -> None:
    # Single objects and counts have no second object to collide with: every kind changes.
    rng = np.random.default_rng(2)
    for p in all_prompts():
        if isinstance(p, ObjectPrompt | CountPrompt):
            for kind in applicable(p):
                for _ in range(3):
                    assert corrupt(p, kind, rng) != p, (p.text, kind)


def test_corrupt_always_changes_the_caption() -> None:
    rng = np.random.default_rng(3)
    for p in all_prompts():
        for kind in applicable(p):
            for _ in range(3):
                assert corrupt(p, kind, rng) != p, (p.text, kind)


# --- noisy_caption -------------------------------------------------------------------------


def _changed_fraction(
    prompts: list[ShapesPrompt], fraction: float, weights: dict[str, float], draws: int, seed: int
) -> float:
    rng = np.random.default_rng(seed)
    changed = [noisy_caption(p, fraction, weights, rng) != p for p in prompts for _ in range(draws)]
    return float(np.mean(changed))


def _always_changing() -> list[ShapesPrompt]:
    return [p for p in all_prompts() if isinstance(p, ObjectPrompt | CountPrompt)]


def test_noisy_caption_with_fraction_zero_never_changes() -> None:
    rng = np.random.default_rng(0)
    for p in all_prompts():
        for _ in range(3):
            assert noisy_caption(p, 0.0, ALL_KINDS, rng) is p


def test_noisy_caption_with_fraction_one_always_changes() -> None:
    assert _changed_fraction(_always_changing(), 1.0, ALL_KINDS, draws=20, seed=0) == 1.0
    # Pairs and relations change less often (see test_corrupt_always_changes_the_caption).
    assert _changed_fraction(all_prompts(), 1.0, ALL_KINDS, draws=2, seed=0) > 0.85


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.7])
def test_noisy_caption_changes_about_the_fraction(fraction: float) -> None:
    prompts = _always_changing()  # 105 prompts
    observed = _changed_fraction(prompts, fraction, ALL_KINDS, draws=30, seed=1)
    assert observed == pytest.approx(fraction, abs=0.04)  # ~5 standard errors


def test_noisy_caption_respects_zero_weights() -> None:
    rng = np.random.default_rng(0)
    only_count = {"count": 1.0, "colour": 0.0}  # missing kinds weigh 0 too
    for p in all_prompts():
        q = noisy_caption(p, 1.0, only_count, rng)
        if isinstance(p, CountPrompt):
            assert isinstance(q, CountPrompt) and q.count != p.count
            assert (q.colour, q.shape) == (p.colour, p.shape)
        else:
            assert q is p  # no applicable kind has weight
    no_colour = {**ALL_KINDS, "colour": 0.0}
    p = parse_prompt("a red circle")
    seen = {noisy_caption(p, 1.0, no_colour, rng).text for _ in range(300)}
    assert seen == {"a red square", "a red triangle", "a circle"}  # shape or drop, no colour


def test_noisy_caption_draws_kinds_by_weight() -> None:
    rng = np.random.default_rng(0)
    p = CountPrompt(3, "red", "circle")
    out = [noisy_caption(p, 1.0, {"count": 3.0, "colour": 1.0}, rng) for _ in range(2000)]
    count_changed = np.mean([isinstance(q, CountPrompt) and q.count != 3 for q in out])
    colour_changed = np.mean([isinstance(q, CountPrompt) and q.colour != "red" for q in out])
    assert count_changed == pytest.approx(0.75, abs=0.04)
    assert colour_changed == pytest.approx(0.25, abs=0.04)
    assert count_changed + colour_changed == pytest.approx(1.0)  # one detail each time


# --- config --------------------------------------------------------------------------------


def test_shapes_config_defaults() -> None:
    cfg = ShapesConfig()
    assert cfg.caption_noise == 0.0 and cfg.balance_categories
    assert cfg.noise_kinds == ALL_KINDS


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"noise_kinds": {"hue": 1.0}}, r"unknown noise kinds \['hue'\]"),
        ({"noise_kinds": {"colour": 1.0, "blur": 2.0}}, r"unknown noise kinds \['blur'\]"),
        ({"noise_kinds": dict.fromkeys(NOISE_KINDS, 0.0)}, "at least one > 0"),
        ({"noise_kinds": {}}, "at least one > 0"),
        ({"noise_kinds": {"colour": 1.0, "shape": -1.0}}, "must be >= 0"),
        ({"caption_noise": 1.5}, "less than or equal to 1"),
        ({"caption_noise": -0.1}, "greater than or equal to 0"),
    ],
)
def test_shapes_config_rejects_bad_noise(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message) as err:
        ShapesConfig(**kwargs)
    assert isinstance(err.value, ValueError)


def test_shapes_config_accepts_partial_weights() -> None:
    cfg = ShapesConfig(caption_noise=0.5, noise_kinds={"relation": 1.0, "colour": 0.0})
    assert cfg.noise_kinds == {"relation": 1.0, "colour": 0.0}


# --- the world's pretraining batches -------------------------------------------------------

TRUE_PROMPTS = [
    "a circle",
    "a red circle",
    "a circle and a square",
    "a red circle and a blue square",
    "three circles",
    "two green triangles",
    "a circle left of a square",
    "a red circle above a yellow triangle",
]


@pytest.mark.parametrize("text", TRUE_PROMPTS)
def test_pretraining_batch_renders_the_true_prompt(text: str) -> None:
    fraction = 0.4
    world = ShapesWorld(ShapesConfig(caption_noise=fraction))
    captions, images = world.pretraining_batch([text], 300, np.random.default_rng(0))
    assert images.shape == (300, 32, 32, 3) and images.dtype == np.uint8
    assert len(captions) == 300
    assert all(verify(image, text).passed for image in images)  # rendered from the truth
    changed = float(np.mean([c != text for c in captions]))
    p = parse_prompt(text)
    if isinstance(p, ObjectPrompt | CountPrompt):
        assert changed == pytest.approx(fraction, abs=0.1)
    else:  # some corruptions of two objects fall back to the true caption
        assert 0.2 < changed <= fraction + 0.1
    for c in captions:
        assert parse_prompt(c).text == c


def test_pretraining_batch_without_noise_has_true_captions() -> None:
    world = ShapesWorld(ShapesConfig(caption_noise=0.0))
    captions, images = world.pretraining_batch(TRUE_PROMPTS, 480, np.random.default_rng(0))
    assert set(captions) == set(TRUE_PROMPTS)
    counts = Counter(captions)  # drawn uniformly: 60 each on average
    assert min(counts.values()) > 30 and max(counts.values()) < 90
    assert all(v.passed for v in world.verify(images, captions))


def test_pretraining_batch_is_deterministic_per_seed() -> None:
    world = ShapesWorld(ShapesConfig(caption_noise=0.5, image_size=24))
    prompts = world.prompts("pretrain")
    first = world.pretraining_batch(prompts, 32, np.random.default_rng(5))
    again = world.pretraining_batch(prompts, 32, np.random.default_rng(5))
    assert first[0] == again[0]
    np.testing.assert_array_equal(first[1], again[1])
    assert first[1].shape == (32, 24, 24, 3)


# --- category balance ----------------------------------------------------------------------


def _categories(texts: list[str]) -> Counter[str]:
    return Counter(parse_prompt(t).category for t in texts)


def test_balanced_by_category_repeats_small_categories() -> None:
    texts = ["a circle", "two circles", "three circles", "a square", "four circles"]
    assert balanced_by_category(texts) == [
        "a circle",
        "two circles",
        "a square",
        "three circles",
        "a circle",
        "four circles",
    ]


@pytest.mark.parametrize("split", ["train", "pretrain"])
def test_balanced_by_category_gives_each_category_the_same_share(split: str) -> None:
    texts = [p.text for p in split_prompts(split)]
    out = balanced_by_category(texts)
    largest = max(_categories(texts).values())
    assert _categories(out) == dict.fromkeys(CATEGORIES, largest)
    assert set(out) == set(texts)
    for cat in CATEGORIES:  # each category's prompts cycled in order
        mine = [t for t in texts if parse_prompt(t).category == cat]
        assert [t for t in out if parse_prompt(t).category == cat] == [
            mine[i % len(mine)] for i in range(largest)
        ]
    # Interleaved: any window of six consecutive entries holds every category once.
    assert _categories(out[:6]) == dict.fromkeys(CATEGORIES, 1)


def test_world_prompts_train_is_balanced() -> None:
    world = ShapesWorld()
    texts = world.prompts("train")
    assert _categories(texts) == dict.fromkeys(CATEGORIES, 144)  # color_attr's 144 prompts
    assert set(texts) == {p.text for p in train_prompts()}
    assert _categories(world.prompts("pretrain")) == dict.fromkeys(CATEGORIES, 992)
    unbalanced = ShapesWorld(ShapesConfig(balance_categories=False))
    assert unbalanced.prompts("train") == [p.text for p in train_prompts()]
    assert unbalanced.prompts("pretrain") == [p.text for p in pretrain_prompts()]


def test_world_prompts_heldout_lists_each_prompt_once() -> None:
    world = ShapesWorld()
    texts = world.prompts("heldout")
    assert texts == [p.text for p in heldout_prompts()]
    assert len(texts) == len(set(texts)) == 58
    assert len(world.prompts("all")) == len(set(world.prompts("all"))) == len(all_prompts())
    assert world.split_names() == ("train", "heldout", "pretrain", "all")
