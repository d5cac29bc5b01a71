"""The prompt grammar of the `shapes` world: counts, colours, shapes and relations.

Two prompt kinds, like GenEval's counting / colour / position tasks:

- ``CountPrompt``: "two red circles", "one blue square" (canonical count word "one"; "a"/"an"
  are accepted when parsing).
- ``RelationPrompt``: "a red circle left of a blue square"; relations are "left of",
  "right of", "above", "below" ("to the left of" / "to the right of" parse too).

The train / held-out split is a fixed function of the prompt texts (sha256, no RNG), so it
never changes with library versions. A "composition" is what is held out:

- count prompts: one count per (colour, shape) pair (18 prompts), counts spread evenly;
- relation prompts: ~20 % of the unordered object pairs {A, B}; every relation prompt that
  puts A and B together is held out, so a held-out pair never meets in a train prompt
  (in particular "A left of B" and its mirror "B right of A" land on the same side).
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
MAX_COUNT: Final[int] = len(COUNT_WORDS)
MAX_LINE_CHARS: Final[int] = 512

# Parsing accepts these extra spellings; `.text` always gives the canonical one.
_COUNT_ALIASES: Final[dict[str, int]] = {"a": 1, "an": 1} | {
    w: i + 1 for i, w in enumerate(COUNT_WORDS)
}
_ARTICLES: Final[frozenset[str]] = frozenset({"a", "an", "one"})
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
SPLIT_NAMES: Final[tuple[str, ...]] = ("train", "heldout", "all")

PALETTE_ARRAY: Final[np.ndarray] = np.array(list(PALETTE.values()), dtype=np.uint8)  # (6, 3)


def _check_colour_shape(colour: str, shape: str) -> None:
    if colour not in PALETTE:
        raise ValueError(f"unknown colour {colour!r}; allowed: {', '.join(COLOURS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; allowed: {', '.join(SHAPES)}")


@dataclass(frozen=True, order=True)
class ObjectSpec:
    """One object of a relation prompt: a colour and a shape."""

    colour: str
    shape: str

    def __post_init__(self) -> None:
        _check_colour_shape(self.colour, self.shape)

    @property
    def text(self) -> str:
        """Canonical phrase with its article, e.g. "a red circle"."""
        return f"a {self.colour} {self.shape}"


@dataclass(frozen=True)
class CountPrompt:
    """Exactly ``count`` objects of one colour and shape, e.g. "three green triangles"."""

    count: int
    colour: str
    shape: str

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_COUNT:
            raise ValueError(f"count must be 1..{MAX_COUNT}, got {self.count}")
        _check_colour_shape(self.colour, self.shape)

    @property
    def text(self) -> str:
        """Canonical text: count word, colour, shape (plural unless one)."""
        noun = self.shape if self.count == 1 else f"{self.shape}s"
        return f"{COUNT_WORDS[self.count - 1]} {self.colour} {noun}"


@dataclass(frozen=True)
class RelationPrompt:
    """Object ``a`` in ``relation`` to object ``b`` (image axes: x right, y down)."""

    a: ObjectSpec
    relation: str
    b: ObjectSpec

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise ValueError(f"unknown relation {self.relation!r}; allowed: {', '.join(RELATIONS)}")
        if self.a == self.b:
            raise ValueError(
                f"the two objects of a relation must differ in colour or shape, got "
                f"{self.a.text!r} twice"
            )

    @property
    def text(self) -> str:
        """Canonical text, e.g. "a red circle left of a blue square"."""
        return f"{self.a.text} {self.relation} {self.b.text}"


ShapesPrompt: TypeAlias = CountPrompt | RelationPrompt

_GRAMMAR_HELP: Final[str] = (
    f"expected '<count> <colour> <shape>' (e.g. 'two red circles') or "
    f"'a <colour> <shape> <relation> a <colour> <shape>' (e.g. 'a red circle left of a blue "
    f"square'); counts: {', '.join(('a', *COUNT_WORDS))}; colours: {', '.join(COLOURS)}; "
    f"shapes: {', '.join(SHAPES)} (plural for counts above one); relations: "
    f"{', '.join(RELATIONS)}"
)


def _parse_noun(word: str, plural: bool) -> str | None:
    """Shape name from a (plural) noun, or None if the word is not that form of a shape."""
    stem = word[:-1] if plural and word.endswith("s") else word
    if stem not in SHAPES or (plural and not word.endswith("s")):
        return None
    return stem


def _parse_count(words: list[str]) -> CountPrompt | None:
    if len(words) != 3 or words[0] not in _COUNT_ALIASES or words[1] not in PALETTE:
        return None
    count = _COUNT_ALIASES[words[0]]
    shape = _parse_noun(words[2], plural=count > 1)
    return None if shape is None else CountPrompt(count, words[1], shape)


def _parse_object(words: list[str]) -> ObjectSpec | None:
    if len(words) != 3 or words[0] not in _ARTICLES or words[1] not in PALETTE:
        return None
    shape = _parse_noun(words[2], plural=False)
    return None if shape is None else ObjectSpec(words[1], shape)


def _parse_relation(words: list[str]) -> RelationPrompt | None:
    for rel_words, relation in _RELATION_ALIASES.items():
        n = len(rel_words)
        if len(words) == 6 + n and tuple(words[3 : 3 + n]) == rel_words:
            a, b = _parse_object(words[:3]), _parse_object(words[3 + n :])
            if a is not None and b is not None:
                return RelationPrompt(a, relation, b)
    return None


def parse_prompt(text: str) -> ShapesPrompt:
    """Parse a prompt of the grammar, ignoring case, extra whitespace and a final period.

    Raises ``ValueError`` naming the text and the grammar when it does not parse.
    """
    if not isinstance(text, str):
        raise ValueError(f"a prompt must be a string, got {type(text).__name__}")
    words = text.lower().strip().rstrip(".").split()
    try:
        prompt: ShapesPrompt | None = _parse_count(words) or _parse_relation(words)
    except ValueError as e:  # grammatical but invalid, e.g. the same object twice
        raise ValueError(f"invalid prompt {text!r}: {e}") from None
    if prompt is None:
        raise ValueError(f"cannot parse prompt {text!r}: {_GRAMMAR_HELP}")
    return prompt


def as_prompt(prompt: ShapesPrompt | str) -> ShapesPrompt:
    """Accept either a prompt object or its text, so renderers and verifiers take both."""
    if isinstance(prompt, CountPrompt | RelationPrompt):
        return prompt
    return parse_prompt(prompt)


def _objects() -> list[ObjectSpec]:
    return [ObjectSpec(c, s) for c in COLOURS for s in SHAPES]


@cache
def _all_prompts() -> tuple[ShapesPrompt, ...]:
    counts: list[ShapesPrompt] = [
        CountPrompt(n, c, s) for c in COLOURS for s in SHAPES for n in range(1, MAX_COUNT + 1)
    ]
    relations: list[ShapesPrompt] = [
        RelationPrompt(a, r, b) for a in _objects() for r in RELATIONS for b in _objects() if a != b
    ]
    return tuple(counts + relations)


def all_prompts() -> list[ShapesPrompt]:
    """Every prompt of the grammar in canonical order: count prompts, then relations."""
    return list(_all_prompts())


def _hash_key(key: str) -> str:
    """Stable sort key from text: sha256, independent of Python/numpy versions and seeds."""
    return hashlib.sha256(f"{_SPLIT_SALT}|{key}".encode()).hexdigest()


@cache
def _heldout_texts() -> frozenset[str]:
    """Texts of the held-out prompts (see the module docstring for what is held out)."""
    pairs = sorted(_objects(), key=lambda o: _hash_key(f"count|{o.text}"))
    # Rank in hash order -> count, so held-out counts are spread 5/5/4/4 over 1..4.
    held = {CountPrompt(i % MAX_COUNT + 1, o.colour, o.shape).text for i, o in enumerate(pairs)}
    object_pairs = sorted(
        itertools.combinations(_objects(), 2),
        key=lambda ab: _hash_key(f"pair|{ab[0].text}|{ab[1].text}"),
    )
    num_held_pairs = round(_HELDOUT_PAIR_FRACTION * len(object_pairs))
    held_pairs = {frozenset(ab) for ab in object_pairs[:num_held_pairs]}
    for p in _all_prompts():
        if isinstance(p, RelationPrompt) and frozenset((p.a, p.b)) in held_pairs:
            held.add(p.text)
    return frozenset(held)


def _interleaved(prompts: list[ShapesPrompt]) -> list[ShapesPrompt]:
    """Hash-shuffle each kind, then alternate count/relation while both last.

    Why: evaluation may take only the first N prompts; alternating keeps that prefix a
    balanced, fixed sample instead of all count prompts.
    """
    by_hash = sorted(prompts, key=lambda p: _hash_key(f"order|{p.text}"))
    counts = [p for p in by_hash if isinstance(p, CountPrompt)]
    relations = [p for p in by_hash if isinstance(p, RelationPrompt)]
    out: list[ShapesPrompt] = []
    for c, r in itertools.zip_longest(counts, relations):
        out.extend(p for p in (c, r) if p is not None)
    return out


def train_prompts() -> list[ShapesPrompt]:
    """The fixed training split (no held-out composition appears here)."""
    held = _heldout_texts()
    return _interleaved([p for p in _all_prompts() if p.text not in held])


def heldout_prompts() -> list[ShapesPrompt]:
    """The fixed held-out split: the compositions used for GenEval-style accuracy."""
    held = _heldout_texts()
    return _interleaved([p for p in _all_prompts() if p.text in held])


def split_prompts(name: str) -> list[ShapesPrompt]:
    """Prompts of a named split, as configs refer to them: "train", "heldout" or "all"."""
    if name == "train":
        return train_prompts()
    if name == "heldout":
        return heldout_prompts()
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
