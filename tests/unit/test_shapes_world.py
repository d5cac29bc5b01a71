"""The `shapes` world: grammar and split, renderer, verifier, prompt files."""

from __future__ import annotations

import dataclasses
import hashlib
import re
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

# sha256 of the sorted held-out texts joined by "\n": changes only if the split changes.
HELDOUT_SHA256 = "5a0053dddabbcecfc2b927cf1b897433f7b2284d70812cf3678428e7778f03f8"
SEEDS = (0, 1, 2)


def _texts(prompts: list[ShapesPrompt]) -> set[str]:
    return {p.text for p in prompts}


# --- grammar -------------------------------------------------------------------------------


@pytest.mark.unit
def test_prompt_counts() -> None:
    prompts = all_prompts()
    counts = [p for p in prompts if isinstance(p, CountPrompt)]
    relations = [p for p in prompts if isinstance(p, RelationPrompt)]
    assert len(counts) == 6 * 3 * 4
    assert len(relations) == 18 * 17 * 4
    assert len(_texts(prompts)) == len(prompts) == 1296
    assert (len(train_prompts()), len(heldout_prompts())) == (1030, 266)


@pytest.mark.unit
def test_palette_is_well_separated() -> None:
    rgb = np.array([PALETTE[c] for c in COLOURS], dtype=float)
    pairwise = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)[np.triu_indices(len(rgb), 1)]
    assert pairwise.min() > 140
    assert np.linalg.norm(rgb - 30.0, axis=1).min() > 160  # far from the dark background


@pytest.mark.unit
def test_parse_round_trips_every_prompt() -> None:
    for p in all_prompts():
        assert parse_prompt(p.text) == p
        assert parse_prompt(f"  {p.text.upper()}. ") == p


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("two red circles", CountPrompt(2, "red", "circle")),
        ("a blue square", CountPrompt(1, "blue", "square")),
        ("One  Blue\tSquare", CountPrompt(1, "blue", "square")),
        (
            "a red circle to the left of a blue square",
            RelationPrompt(ObjectSpec("red", "circle"), "left of", ObjectSpec("blue", "square")),
        ),
        (
            "one cyan triangle below a cyan circle",
            RelationPrompt(ObjectSpec("cyan", "triangle"), "below", ObjectSpec("cyan", "circle")),
        ),
    ],
)
def test_parse_accepts_variants(text: str, expected: ShapesPrompt) -> None:
    assert parse_prompt(text) == expected


@pytest.mark.unit
def test_canonical_texts() -> None:
    assert CountPrompt(1, "blue", "square").text == "one blue square"
    assert CountPrompt(3, "green", "triangle").text == "three green triangles"
    rel = RelationPrompt(ObjectSpec("red", "circle"), "above", ObjectSpec("yellow", "square"))
    assert rel.text == "a red circle above a yellow square"


@pytest.mark.unit
@pytest.mark.parametrize(
    "text",
    [
        "",
        "five red circles",
        "two red circle",
        "one red circles",
        "two pink circles",
        "two red hexagons",
        "a red circle near a blue square",
        "a red circle left of",
        "red circle left of blue square",
    ],
)
def test_parse_errors_name_text_and_grammar(text: str) -> None:
    with pytest.raises(ValueError, match="cannot parse prompt") as err:
        parse_prompt(text)
    assert repr(text) in str(err.value)
    assert "colours: red, green" in str(err.value) and "left of" in str(err.value)


@pytest.mark.unit
def test_parse_rejects_same_object_twice() -> None:
    with pytest.raises(ValueError, match="must differ in colour or shape"):
        parse_prompt("a red circle left of a red circle")


@pytest.mark.unit
def test_prompt_constructors_validate() -> None:
    with pytest.raises(ValueError, match=r"count must be 1\.\.4"):
        CountPrompt(5, "red", "circle")
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        CountPrompt(1, "pink", "circle")
    with pytest.raises(ValueError, match="unknown relation"):
        RelationPrompt(ObjectSpec("red", "circle"), "near", ObjectSpec("blue", "circle"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        CountPrompt(1, "red", "circle").count = 2  # type: ignore[misc]


@pytest.mark.unit
def test_split_is_a_partition() -> None:
    train, held = _texts(train_prompts()), _texts(heldout_prompts())
    assert not train & held
    assert train | held == _texts(all_prompts())
    assert split_prompts("train") == train_prompts()
    assert split_prompts("heldout") == heldout_prompts()
    assert split_prompts("all") == all_prompts()
    with pytest.raises(ValueError, match=r"unknown prompt split 'test'.*train, heldout, all"):
        split_prompts("test")


@pytest.mark.unit
def test_heldout_counts_one_per_colour_shape() -> None:
    held = [p for p in heldout_prompts() if isinstance(p, CountPrompt)]
    assert sorted((p.colour, p.shape) for p in held) == sorted(
        (c, s) for c in COLOURS for s in SHAPES
    )
    assert sorted(np.bincount([p.count for p in held])[1:].tolist()) == [4, 4, 5, 5]


@pytest.mark.unit
def test_heldout_relation_pairs_never_meet_in_train() -> None:
    def pairs(prompts: list[ShapesPrompt]) -> set[frozenset[ObjectSpec]]:
        return {frozenset((p.a, p.b)) for p in prompts if isinstance(p, RelationPrompt)}

    held, train = pairs(heldout_prompts()), pairs(train_prompts())
    assert not held & train
    assert len(held) == 31  # 20 % of the 153 unordered object pairs
    relations = [p for p in heldout_prompts() if isinstance(p, RelationPrompt)]
    assert len(relations) == 31 * 2 * len(RELATIONS)  # both orders, every relation


@pytest.mark.unit
def test_split_is_stable() -> None:
    held = heldout_prompts()
    digest = hashlib.sha256("\n".join(sorted(p.text for p in held)).encode()).hexdigest()
    assert digest == HELDOUT_SHA256
    assert [p.text for p in held[:4]] == [
        "two yellow circles",
        "a red triangle above a yellow circle",
        "one green triangle",
        "a green triangle above a blue triangle",
    ]
    # Kinds alternate while both last, so a prefix of the held-out list is balanced.
    kinds = [isinstance(p, CountPrompt) for p in held[:36]]
    assert kinds == [True, False] * 18


# --- renderer ------------------------------------------------------------------------------


def _objects_in(image: np.ndarray) -> list[tuple[str, slice, slice]]:
    """Exact-palette components of a rendered image: (colour, rows, cols) of each."""
    found = []
    for colour, rgb in PALETTE.items():
        labels, _ = ndimage.label(np.all(image == rgb, axis=-1))
        found += [(colour, *box) for box in ndimage.find_objects(labels) if box is not None]
    return found


def _boxes_apart(a: tuple[slice, slice], b: tuple[slice, slice], gap: int) -> bool:
    (ay, ax), (by, bx) = a, b
    return (
        ay.stop + gap <= by.start
        or by.stop + gap <= ay.start
        or ax.stop + gap <= bx.start
        or bx.stop + gap <= ax.start
    )


@pytest.mark.unit
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


@pytest.mark.unit
def test_render_is_deterministic_per_seed() -> None:
    prompts = heldout_prompts()[:8]
    first = render_batch(prompts, np.random.default_rng(7))
    again = render_batch(prompts, np.random.default_rng(7))
    other = render_batch(prompts, np.random.default_rng(8))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.unit
@pytest.mark.parametrize("seed", SEEDS)
def test_render_count_prompts_draw_exactly_count_objects(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for p in all_prompts():
        if not isinstance(p, CountPrompt):
            continue
        image = render(p, rng)
        objects = _objects_in(image)
        assert len(objects) == p.count, p.text
        assert {colour for colour, *_ in objects} == {p.colour}
        boxes = [(ys, xs) for _, ys, xs in objects]
        assert all(_boxes_apart(a, b, 2) for i, a in enumerate(boxes) for b in boxes[:i])
        for _, ys, xs in objects:  # sides 7-11 px at 32x32
            assert 7 <= ys.stop - ys.start <= 11 and 7 <= xs.stop - xs.start <= 11
        background = image[np.all(np.isin(image, list(PALETTE.values())), axis=-1) == 0]
        assert background.min() >= 12 and background.max() <= 48


@pytest.mark.unit
def test_render_relation_prompts_hold_clearly() -> None:
    rng = np.random.default_rng(3)
    for p in heldout_prompts():
        if not isinstance(p, RelationPrompt):
            continue
        image = render(p, rng)
        objects = _objects_in(image)
        assert len(objects) == 2, p.text
        assert _boxes_apart(objects[0][1:], objects[1][1:], 2)
    # Geometry of every relation, with unambiguous objects (different colours).
    for relation in RELATIONS:
        p = RelationPrompt(ObjectSpec("red", "circle"), relation, ObjectSpec("blue", "square"))
        for _ in range(20):
            found = {c: (ys, xs) for c, ys, xs in _objects_in(render(p, rng))}
            (ay, ax), (by, bx) = found["red"], found["blue"]
            dx = (ax.start + ax.stop - bx.start - bx.stop) / 2
            dy = (ay.start + ay.stop - by.start - by.stop) / 2
            along, across = {
                "left of": (-dx, dy),
                "right of": (dx, dy),
                "above": (-dy, dx),
                "below": (dy, dx),
            }[relation]
            assert along >= 8 and abs(across) <= along / 2, (relation, dx, dy)


# --- verifier ------------------------------------------------------------------------------


def _mismatch(p: ShapesPrompt, i: int) -> ShapesPrompt:
    """A prompt whose correct image must fail `p` in at least one clause (i picks how)."""
    if isinstance(p, CountPrompt):
        return [
            dataclasses.replace(p, count=p.count % 4 + 1),
            dataclasses.replace(p, colour=COLOURS[(COLOURS.index(p.colour) + 1) % 6]),
            dataclasses.replace(p, shape=SHAPES[(SHAPES.index(p.shape) + 1) % 3]),
        ][i % 3]
    choice = i % 3
    for step in range(1, 6):
        if choice == 0:
            relation = RELATIONS[(RELATIONS.index(p.relation) + step) % 4]
            return dataclasses.replace(p, relation=relation)
        if choice == 1:
            a = ObjectSpec(COLOURS[(COLOURS.index(p.a.colour) + step) % 6], p.a.shape)
            if a != p.b:
                return dataclasses.replace(p, a=a)
        b = ObjectSpec(p.b.colour, SHAPES[(SHAPES.index(p.b.shape) + step) % 3])
        if choice == 2 and b != p.a:
            return dataclasses.replace(p, b=b)
    raise AssertionError(f"no mismatch for {p.text}")


def _heldout_images(seed: int) -> tuple[list[ShapesPrompt], np.ndarray]:
    prompts = heldout_prompts()
    return prompts, render_batch(prompts, np.random.default_rng(seed))


@pytest.mark.unit
@pytest.mark.parametrize("seed", SEEDS)
def test_verifier_passes_ground_truth(seed: int) -> None:
    prompts, images = _heldout_images(seed)
    results = verify_batch(images, prompts)
    summary = summarize(results)
    assert summary["accuracy"] >= 0.98, summary
    assert summary["num_prompts"] == len(prompts)
    assert set(summary["clause_accuracy"]) == {"colour", "shape", "count", "position"}


@pytest.mark.unit
@pytest.mark.parametrize("seed", SEEDS)
def test_verifier_rejects_mismatched_images(seed: int) -> None:
    prompts = heldout_prompts()
    wrong = [_mismatch(p, i + seed) for i, p in enumerate(prompts)]
    assert all(w.text != p.text for w, p in zip(wrong, prompts, strict=True))
    images = render_batch(wrong, np.random.default_rng(seed))
    summary = summarize(verify_batch(images, prompts))
    assert summary["accuracy"] < 0.1, summary
    assert summary["mean_reward"] < 0.8, summary


@pytest.mark.unit
@pytest.mark.parametrize("sigma", [15.0, 25.0])
def test_verifier_tolerates_noise(sigma: float) -> None:
    prompts, images = _heldout_images(4)
    noise = np.random.default_rng(5).normal(0.0, sigma, images.shape)
    noisy = np.clip(images + noise, 0, 255).astype(np.uint8)
    assert summarize(verify_batch(noisy, prompts))["accuracy"] >= 0.95


@pytest.mark.unit
def test_verifier_tolerates_slight_blur() -> None:
    prompts, images = _heldout_images(6)
    blurred = ndimage.gaussian_filter(images.astype(float), sigma=(0, 0.5, 0.5, 0))
    noisy = blurred + np.random.default_rng(7).normal(0.0, 10.0, images.shape)
    summary = summarize(verify_batch(np.clip(noisy, 0, 255).astype(np.uint8), prompts))
    assert summary["accuracy"] >= 0.95, summary


@pytest.mark.unit
def test_verifier_fails_noise_and_blank_images() -> None:
    prompts = heldout_prompts()
    rng = np.random.default_rng(0)
    blanks = {
        "uniform noise": rng.integers(0, 256, (len(prompts), 32, 32, 3), dtype=np.uint8),
        "black": np.zeros((len(prompts), 32, 32, 3), dtype=np.uint8),
        "white": np.full((len(prompts), 32, 32, 3), 255, dtype=np.uint8),
        "grey": np.full((len(prompts), 32, 32, 3), 128, dtype=np.uint8),
    }
    for name, images in blanks.items():
        assert summarize(verify_batch(images, prompts))["accuracy"] == 0.0, name


@pytest.mark.unit
def test_verify_clauses_and_score() -> None:
    rng = np.random.default_rng(0)
    result = verify(render("three red circles", rng), "two red circles")
    assert result.clauses == {"colour": True, "shape": True, "count": False}
    assert result.score == pytest.approx(2 / 3) and not result.passed
    assert len(result.detail["objects"]) == 3
    result = verify(
        render("a red circle above a blue square", rng), "a red circle below a blue square"
    )
    assert result.clauses == {"colour": True, "shape": True, "position": False}
    big = render("a green triangle right of a yellow circle", rng, size=64)
    assert verify(big, "a green triangle right of a yellow circle").passed


@pytest.mark.unit
def test_verify_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="uint8"):
        verify(np.zeros((32, 32, 3), dtype=np.float32), "one red circle")
    with pytest.raises(ValueError, match=re.escape("(H, W, 3)")):
        verify(np.zeros((32, 32), dtype=np.uint8), "one red circle")
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        verify_batch(np.zeros((2, 32, 32, 3), dtype=np.uint8), ["one red circle"])


@pytest.mark.unit
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


# --- prompt files --------------------------------------------------------------------------


@pytest.mark.unit
def test_load_prompt_file(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\n\ntwo red circles\n  A Blue Square  # inline\n")
    assert load_prompt_file(path) == [
        CountPrompt(2, "red", "circle"),
        CountPrompt(1, "blue", "square"),
    ]
    assert load_prompt_file(str(path)) == load_prompt_file(path)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"one red circle\n\nsome\x00binary\n", r"prompts\.txt:3: .*binary"),
        (b"one red circle\nthree \xff blue squares\n", r"prompts\.txt:2: .*not valid UTF-8"),
        (b"one red circle\n" + b"x" * 513 + b"\n", r"prompts\.txt:2: line is 513 .*at most 512"),
        (b"# c\none red circle\n\nfour red hexagons\n", r"prompts\.txt:4: cannot parse .*hexagons"),
        (b"# only a comment\n\n   \n", r"prompts\.txt' has no prompts"),
        (b"", r"prompts\.txt' has no prompts"),
    ],
)
def test_load_prompt_file_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_prompt_file(path)


@pytest.mark.unit
def test_load_prompt_file_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot read prompt file .*missing\.txt"):
        load_prompt_file(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="cannot read prompt file"):
        load_prompt_file(tmp_path)  # a directory
