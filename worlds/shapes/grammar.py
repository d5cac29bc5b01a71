"""The prompt grammar of the `shapes` world: GenEval's six task categories in miniature.

Objects are shapes (the world's object classes: circle, square, triangle) with an optional
colour (6 colours). Four prompt kinds, which map onto GenEval's categories:

=================  ========================================  ==================
kind               example                                   category
=================  ========================================  ==================
``ObjectPrompt``   "a circle"                                ``single_object``
``ObjectPrompt``   "a red circle"                            ``colors``
``PairPrompt``     "a circle and a square"                   ``two_object``
``PairPrompt``     "a red circle and a blue square"          ``color_attr``
``CountPrompt``    "three circles", "two red squares"        ``counting``
``RelationPrompt`` "a circle left of a square",              ``position``
                   "a red circle left of a blue square"
=================  ========================================  ==================

Relations are "left of", "right of", "above", "below" ("to the left of" / "to the right of"
parse too). Counts are "one" to "four". An object without a colour may have any colour.

The benchmark (the ``train`` and ``heldout`` splits) uses GenEval's templates: objects
without colours except in ``colors`` and ``color_attr``. Coloured counts and coloured
relations (the world's first grammar) still parse, render and verify; they are in the
``pretrain`` split, which is every prompt of the grammar whose text is not held out.

Held-out compositions (a fixed function of the prompt texts: sha256, no RNG):

- ``counting``: one count per shape (colour-free), and one count per (colour, shape) pair;
- ``colors``: two colours per shape;
- ``two_object``: one of the three unordered shape pairs (both orders);
- ``position``: one unordered shape pair in every relation and order, and ~20 % of the
  unordered coloured object pairs in every relation and order;
- ``color_attr``: ~20 % of the unordered coloured object pairs (both orders);
- ``single_object``: the three shapes *are* the category; nothing can be held out, so its
  prompts are in both splits (GenEval's single-object prompts name classes any training set
  contains, too).
"""

from __future__ import annotations

import hashlib
import itertools
import os
from dataclasses import dataclass
from functools import cache
from typing import Final, TypeAlias

import numpy as np

# Far apart in RGB (min pairwise distance ~150) and far from the dark background (~30 grey),
# so a nearest-colour classifier with a threshold separates them even on blurry images.
PALETTE: Final[dict[str, tuple[int, int, int]]] = {
    "red": (230, 30, 30),
    "green": (40, 200, 40),
    "blue": (30, 60, 255),
    "yellow": (240, 230, 30),
    "purple": (170, 40, 210),
    "cyan": (40, 220, 230),
}
COLOURS: Final[tuple[str, ...]] = tuple(PALETTE)
SHAPES: Final[tuple[str, ...]] = ("circle", "square", "triangle")
COUNT_WORDS: Final[tuple[str, ...]] = ("one", "two", "three", "four")
RELATIONS: Final[tuple[str, ...]] = ("left of", "right of", "above", "below")
OPPOSITE: Final[dict[str, str]] = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
}
CATEGORIES: Final[tuple[str, ...]] = (
    "single_object",
    "two_object",
    "counting",
    "colors",
    "position",
    "color_attr",
)
MAX_COUNT: Final[int] = len(COUNT_WORDS)
MAX_LINE_CHARS: Final[int] = 512

_COUNT_ALIASES: Final[dict[str, int]] = {w: i + 1 for i, w in enumerate(COUNT_WORDS)}
_ARTICLES: Final[frozenset[str]] = frozenset({"a", "an"})
_RELATION_ALIASES: Final[dict[tuple[str, ...], str]] = {
    ("left", "of"): "left of",
    ("to", "the", "left", "of"): "left of",
    ("right", "of"): "right of",
    ("to", "the", "right", "of"): "right of",
    ("above",): "above",
    ("below",): "below",
}
_SPLIT_SALT: Final[str] = "elborl-shapes-split-v1"
_HELDOUT_PAIR_FRACTION: Final[float] = 0.2
SPLIT_NAMES: Final[tuple[str, ...]] = ("train", "heldout", "pretrain", "all")

PALETTE_ARRAY: Final[np.ndarray] = np.array(list(PALETTE.values()), dtype=np.uint8)  # (6, 3)


def _check_colour_shape(colour: str | None, shape: str) -> None:
    if colour is not None and colour not in PALETTE:
        raise ValueError(f"unknown colour {colour!r}; allowed: {', '.join(COLOURS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; allowed: {', '.join(SHAPES)}")


@dataclass(frozen=True, order=True)
class ObjectSpec:
    """One object: a shape and, optionally, its colour (None: any colour)."""

    colour: str | None
    shape: str

    def __post_init__(self) -> None:
        _check_colour_shape(self.colour, self.shape)

    @property
    def text(self) -> str:
        """Canonical phrase with its article, e.g. "a red circle" or "a circle"."""
        return f"a {self.colour} {self.shape}" if self.colour else f"a {self.shape}"


@dataclass(frozen=True)
class ObjectPrompt:
    """At least one such object: "a circle" (single_object) or "a red circle" (colors)."""

    obj: ObjectSpec

    @property
    def text(self) -> str:
        return self.obj.text

    @property
    def category(self) -> str:
        return "colors" if self.obj.colour else "single_object"


@dataclass(frozen=True)
class CountPrompt:
    """Exactly ``count`` objects of one shape (and colour, if given): "three green triangles"."""

    count: int
    colour: str | None
    shape: str

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_COUNT:
            raise ValueError(f"count must be 1..{MAX_COUNT}, got {self.count}")
        _check_colour_shape(self.colour, self.shape)

    @property
    def text(self) -> str:
        """Canonical text: count word, colour, shape (plural unless one)."""
        noun = self.shape if self.count == 1 else f"{self.shape}s"
        words = [COUNT_WORDS[self.count - 1], *([self.colour] if self.colour else []), noun]
        return " ".join(words)

    @property
    def category(self) -> str:
        return "counting"


def _check_distinct(a: ObjectSpec, b: ObjectSpec) -> None:
    if a == b:
        raise ValueError(f"the two objects must differ in colour or shape, got {a.text!r} twice")
    if (a.colour is None) != (b.colour is None):
        raise ValueError(
            f"either both objects have a colour or neither, got {a.text!r} and {b.text!r}"
        )


@dataclass(frozen=True)
class PairPrompt:
    """Both objects: "a circle and a square" (two_object), coloured: color_attr."""

    a: ObjectSpec
    b: ObjectSpec

    def __post_init__(self) -> None:
        _check_distinct(self.a, self.b)
        if self.a.shape == self.b.shape:
            raise ValueError(f"the two objects must be different shapes, got two {self.a.shape}s")

    @property
    def text(self) -> str:
        return f"{self.a.text} and {self.b.text}"

    @property
    def category(self) -> str:
        return "color_attr" if self.a.colour else "two_object"


@dataclass(frozen=True)
class RelationPrompt:
    """Object ``a`` in ``relation`` to object ``b`` (image axes: x right, y down)."""

    a: ObjectSpec
    relation: str
    b: ObjectSpec

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise ValueError(f"unknown relation {self.relation!r}; allowed: {', '.join(RELATIONS)}")
        _check_distinct(self.a, self.b)

    @property
    def text(self) -> str:
        """Canonical text, e.g. "a red circle left of a blue square"."""
        return f"{self.a.text} {self.relation} {self.b.text}"

    @property
    def category(self) -> str:
        return "position"


ShapesPrompt: TypeAlias = ObjectPrompt | CountPrompt | PairPrompt | RelationPrompt
PROMPT_TYPES: Final[tuple[type, ...]] = (ObjectPrompt, CountPrompt, PairPrompt, RelationPrompt)

_GRAMMAR_HELP: Final[str] = (
    "expected an object ('a circle', 'a red circle'), two objects ('a circle and a red "
    "square'... both with colours or neither), a count ('two circles', 'three red squares') "
    "or a relation ('a circle left of a square'); counts: "
    f"{', '.join(COUNT_WORDS)}; colours: {', '.join(COLOURS)}; shapes: {', '.join(SHAPES)} "
    f"(plural for counts above one); relations: {', '.join(RELATIONS)}"
)


def _parse_noun(word: str, plural: bool) -> str | None:
    """Shape name from a (plural) noun, or None if the word is not that form of a shape."""
    stem = word[:-1] if plural and word.endswith("s") else word
    if stem not in SHAPES or (plural and not word.endswith("s")):
        return None
    return stem


def _parse_count(words: list[str]) -> CountPrompt | None:
    if len(words) not in (2, 3) or words[0] not in _COUNT_ALIASES:
        return None
    colour = words[1] if len(words) == 3 else None
    if colour is not None and colour not in PALETTE:
        return None
    count = _COUNT_ALIASES[words[0]]
    shape = _parse_noun(words[-1], plural=count > 1)
    return None if shape is None else CountPrompt(count, colour, shape)


def _parse_object(words: list[str]) -> ObjectSpec | None:
    if len(words) not in (2, 3) or words[0] not in _ARTICLES:
        return None
    colour = words[1] if len(words) == 3 else None
    if colour is not None and colour not in PALETTE:
        return None
    shape = _parse_noun(words[-1], plural=False)
    return None if shape is None else ObjectSpec(colour, shape)


def _parse_two(
    words: list[str], joiners: dict[tuple[str, ...], str]
) -> tuple[ObjectSpec, str, ObjectSpec] | None:
    for joiner, name in joiners.items():
        n = len(joiner)
        for i in range(2, len(words) - n - 1):
            if tuple(words[i : i + n]) == joiner:
                a, b = _parse_object(words[:i]), _parse_object(words[i + n :])
                if a is not None and b is not None:
                    return a, name, b
    return None


def parse_prompt(text: str) -> ShapesPrompt:
    """Parse a prompt of the grammar, ignoring case, extra whitespace and a final period.

    Raises ``ValueError`` naming the text and the grammar when it does not parse.
    """
    if not isinstance(text, str):
        raise ValueError(f"a prompt must be a string, got {type(text).__name__}")
    words = text.lower().strip().rstrip(".").split()
    try:
        prompt = _parse_words(words)
    except ValueError as e:  # grammatical but invalid, e.g. the same object twice
        raise ValueError(f"invalid prompt {text!r}: {e}") from None
    if prompt is None:
        raise ValueError(f"cannot parse prompt {text!r}: {_GRAMMAR_HELP}")
    return prompt


def _parse_words(words: list[str]) -> ShapesPrompt | None:
    obj = _parse_object(words)
    if obj is not None:
        return ObjectPrompt(obj)
    count = _parse_count(words)
    if count is not None:
        return count
    rel = _parse_two(words, _RELATION_ALIASES)
    if rel is not None:
        return RelationPrompt(rel[0], rel[1], rel[2])
    pair = _parse_two(words, {("and",): "and"})
    if pair is not None:
        return PairPrompt(pair[0], pair[2])
    return None


def as_prompt(prompt: ShapesPrompt | str) -> ShapesPrompt:
    """Accept either a prompt object or its text, so renderers and verifiers take both."""
    if isinstance(prompt, PROMPT_TYPES):
        return prompt  # type: ignore[return-value]
    return parse_prompt(prompt)  # type: ignore[arg-type]


def category(prompt: ShapesPrompt | str) -> str:
    """The GenEval category of a prompt (module table)."""
    return as_prompt(prompt).category


def _objects(coloured: bool) -> list[ObjectSpec]:
    colours: tuple[str | None, ...] = COLOURS if coloured else (None,)
    return [ObjectSpec(c, s) for c in colours for s in SHAPES]


@cache
def _all_prompts() -> tuple[ShapesPrompt, ...]:
    out: list[ShapesPrompt] = []
    for coloured in (False, True):
        objs = _objects(coloured)
        colours: tuple[str | None, ...] = COLOURS if coloured else (None,)
        out += [ObjectPrompt(o) for o in objs]
        out += [
            CountPrompt(n, c, s) for c in colours for s in SHAPES for n in range(1, MAX_COUNT + 1)
        ]
        out += [
            PairPrompt(a, b)
            for a in objs
            for b in objs
            if a.shape != b.shape and (a.colour is None or a.colour != b.colour)
        ]
        out += [RelationPrompt(a, r, b) for a in objs for r in RELATIONS for b in objs if a != b]
    return tuple(out)


def all_prompts() -> list[ShapesPrompt]:
    """Every prompt of the grammar in canonical order."""
    return list(_all_prompts())


def is_benchmark(p: ShapesPrompt) -> bool:
    """GenEval's templates: objects without colours except in ``colors`` and ``color_attr``."""
    if isinstance(p, CountPrompt):
        return p.colour is None
    if isinstance(p, RelationPrompt):
        return p.a.colour is None
    return True


def _hash_key(key: str) -> str:
    """Stable sort key from text: sha256, independent of Python/numpy versions and seeds."""
    return hashlib.sha256(f"{_SPLIT_SALT}|{key}".encode()).hexdigest()


def _held_pairs(coloured: bool, fraction: float) -> set[frozenset[ObjectSpec]]:
    pairs = sorted(
        itertools.combinations(_objects(coloured), 2),
        key=lambda ab: _hash_key(f"pair|{ab[0].text}|{ab[1].text}"),
    )
    return {frozenset(ab) for ab in pairs[: max(1, round(fraction * len(pairs)))]}


@cache
def _heldout_texts() -> frozenset[str]:
    """Texts of the held-out prompts (see the module docstring for what is held out)."""
    held: set[str] = set()
    for coloured in (False, True):  # counting: one count per object, counts spread evenly
        objs = sorted(_objects(coloured), key=lambda o: _hash_key(f"count|{o.text}"))
        held |= {CountPrompt(i % MAX_COUNT + 1, o.colour, o.shape).text for i, o in enumerate(objs)}
    for shape in SHAPES:  # colors: two colours per shape
        ranked = sorted(COLOURS, key=lambda c: _hash_key(f"colour|{c}|{shape}"))
        held |= {ObjectPrompt(ObjectSpec(c, shape)).text for c in ranked[:2]}
    plain_pairs = _held_pairs(coloured=False, fraction=1 / 3)  # one of the three shape pairs
    coloured_pairs = _held_pairs(coloured=True, fraction=_HELDOUT_PAIR_FRACTION)
    for p in _all_prompts():
        if isinstance(p, PairPrompt | RelationPrompt):
            pair = frozenset((p.a, p.b))
            if pair in plain_pairs or pair in coloured_pairs:
                held.add(p.text)
    return frozenset(held)


def _interleaved(prompts: list[ShapesPrompt]) -> list[ShapesPrompt]:
    """Hash-shuffle each category, then take them in turn while they last.

    Why: evaluation may take only the first N prompts; alternating keeps that prefix a
    balanced, fixed sample.
    """
    by_hash = sorted(prompts, key=lambda p: _hash_key(f"order|{p.text}"))
    groups = [[p for p in by_hash if p.category == c] for c in CATEGORIES]
    out: list[ShapesPrompt] = []
    for row in itertools.zip_longest(*groups):
        out.extend(p for p in row if p is not None)
    return out


def train_prompts() -> list[ShapesPrompt]:
    """The benchmark's training prompts (no held-out composition appears here but the three
    single-object prompts), one of each."""
    held = _heldout_texts()
    return _interleaved(
        [
            p
            for p in _all_prompts()
            if is_benchmark(p) and (p.text not in held or p.category == "single_object")
        ]
    )


def heldout_prompts() -> list[ShapesPrompt]:
    """The benchmark's held-out prompts: the compositions GenEval-style accuracy is on."""
    held = _heldout_texts()
    return _interleaved(
        [
            p
            for p in _all_prompts()
            if is_benchmark(p) and (p.text in held or p.category == "single_object")
        ]
    )


def pretrain_prompts() -> list[ShapesPrompt]:
    """Every prompt of the grammar whose text is not held out (coloured counts and relations
    included): what the base model's pretraining captions are drawn from."""
    held = _heldout_texts()
    return _interleaved(
        [p for p in _all_prompts() if p.text not in held or p.category == "single_object"]
    )


def split_prompts(name: str) -> list[ShapesPrompt]:
    """Prompts of a named split: "train", "heldout", "pretrain" or "all"."""
    if name == "train":
        return train_prompts()
    if name == "heldout":
        return heldout_prompts()
    if name == "pretrain":
        return pretrain_prompts()
    if name == "all":
        return all_prompts()
    raise ValueError(f"unknown prompt split {name!r}; allowed: {', '.join(SPLIT_NAMES)}")


def _decode_prompt_file(path: str | os.PathLike[str]) -> str:
    """File text, or a ValueError naming the file (and line) if unreadable or not text."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read prompt file {os.fspath(path)!r}: {e}") from e
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise ValueError(
            f"{os.fspath(path)}:{line}: prompt file looks binary (NUL byte); expected UTF-8 text"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{os.fspath(path)}:{line}: prompt file is not valid UTF-8") from e


def load_prompt_file(path: str | os.PathLike[str]) -> list[ShapesPrompt]:
    """Prompts from a text file: one per line; blank lines and ``#`` comments are skipped.

    Every error is a ``ValueError`` that names the file and, where it applies, the line.
    """
    prompts: list[ShapesPrompt] = []
    # Split on "\n" only (not str.splitlines) so line numbers match editors and `nl`.
    for lineno, raw in enumerate(_decode_prompt_file(path).split("\n"), start=1):
        if len(raw) > MAX_LINE_CHARS:
            raise ValueError(
                f"{os.fspath(path)}:{lineno}: line is {len(raw)} characters long; "
                f"at most {MAX_LINE_CHARS} are allowed"
            )
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            prompts.append(parse_prompt(line))
        except ValueError as e:
            raise ValueError(f"{os.fspath(path)}:{lineno}: {e}") from None
    if not prompts:
        raise ValueError(
            f"prompt file {os.fspath(path)!r} has no prompts (only blank lines or # comments)"
        )
    return prompts
