"""Evaluation bookkeeping: pass@k (Chen et al. 2021) and the image budget per prompt."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
from pydantic import ValidationError

from rollout.config import EvalConfig
from rollout.evaluate import images_per_prompt, pass_at_k, pass_at_k_table
from worlds.base import Verdict
from worlds.shapes.grammar import heldout_prompts
from worlds.shapes.world import ShapesWorld

pytestmark = pytest.mark.unit

HELDOUT = [p.text for p in heldout_prompts()]
# Held-out prompts per category: single_object 3, two_object 2, counting 3, colors 6,
# position 8, color_attr 36.


class _NoCategories(ShapesWorld):
    """A world that does not sort its prompts into categories."""

    def category(self, prompt: str) -> str | None:
        return None


# --- pass@k --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (4, 1, 2, 0.5),  # 1 - C(3, 2) / C(4, 2) = 1 - 3/6
        (4, 2, 2, 5 / 6),  # 1 - C(2, 2) / C(4, 2) = 1 - 1/6
        (10, 2, 5, 7 / 9),  # 1 - C(8, 5) / C(10, 5) = 1 - 56/252
        (8, 1, 4, 0.5),  # 1 - C(7, 4) / C(8, 4) = 1 - 35/70
        (5, 1, 1, 0.2),  # pass@1 is the pass rate
        (4, 0, 2, 0.0),  # nothing passed
        (4, 3, 2, 1.0),  # n - c < k: every k-subset holds a pass
        (2, 1, 2, 1.0),
        (4, 4, 4, 1.0),
        (4, 0, 4, 0.0),
        (3, 3, 1, 1.0),
    ],
)
def test_pass_at_k_hand_computed(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_1_is_the_pass_rate_and_pass_at_k_grows_with_k_and_c() -> None:
    for n in range(1, 9):
        for c in range(n + 1):
            assert pass_at_k(n, c, 1) == pytest.approx(c / n)
            values = [pass_at_k(n, c, k) for k in range(1, n + 1)]
            assert all(a <= b + 1e-12 for a, b in itertools.pairwise(values))
            assert all(0.0 <= v <= 1.0 for v in values)
            if c < n:
                assert pass_at_k(n, c, 1) <= pass_at_k(n, c + 1, 1)


def test_pass_at_k_matches_the_probability_a_random_k_subset_passes() -> None:
    # Brute force: the fraction of k-subsets of n samples (c passing) with a pass.
    n, c = 6, 2
    samples = [True] * c + [False] * (n - c)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(samples, k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(map(any, subsets)) / len(subsets))
        assert len(subsets) == math.comb(n, k)


def test_pass_at_k_needs_k_samples() -> None:
    with pytest.raises(ValueError, match="pass@4 needs at least 4 samples, got 3"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="needs at least"):
        pass_at_k(1, 0, 2)


def test_pass_at_k_table_averages_prompts_then_categories() -> None:
    world = ShapesWorld()
    prompts = ["a circle", "a square", "two circles"]
    counts = [4, 4, 2]
    passed = [True, False, False, False] + [False] * 4 + [True, True]
    results = [Verdict(float(p), {"shape": p}, p) for p in passed]
    table = pass_at_k_table(world, prompts, counts, results, k=2)
    assert table["k"] == 2
    single = table["categories"]["single_object"]
    assert single == {"pass@1": pytest.approx(0.125), "pass@2": pytest.approx(0.25), "prompts": 2}
    assert table["categories"]["counting"] == {"pass@1": 1.0, "pass@2": 1.0, "prompts": 1}
    assert table["overall"]["pass@1"] == pytest.approx((0.125 + 1.0) / 2)
    assert table["overall"]["pass@2"] == pytest.approx((0.25 + 1.0) / 2)
    uncategorised = pass_at_k_table(_NoCategories(), prompts, counts, results, k=2)
    assert set(uncategorised["categories"]) == {"all"}
    assert uncategorised["categories"]["all"]["pass@2"] == pytest.approx(1.5 / 3)


# --- images per prompt ---------------------------------------------------------------------


def test_images_per_prompt_defaults_to_the_same_for_every_prompt() -> None:
    world = ShapesWorld()
    assert images_per_prompt(world, HELDOUT, EvalConfig()) == [1] * len(HELDOUT)
    assert images_per_prompt(world, HELDOUT, EvalConfig(images_per_prompt=3)) == [3] * 58


def _by_category(world: ShapesWorld, counts: list[int]) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for prompt, n in zip(HELDOUT, counts, strict=True):
        out.setdefault(world.category(prompt) or "all", set()).add(n)
    return out


def test_images_per_category_balances_the_budget() -> None:
    world = ShapesWorld()
    counts = images_per_prompt(world, HELDOUT, EvalConfig(images_per_category=36))
    # ceil(36 / prompts of the category), at least images_per_prompt (1).
    assert _by_category(world, counts) == {
        "single_object": {12},
        "two_object": {18},
        "counting": {12},
        "colors": {6},
        "position": {5},  # ceil(36 / 8)
        "color_attr": {1},
    }
    images: Counter[str | None] = Counter()
    for prompt, n in zip(HELDOUT, counts, strict=True):
        images[world.category(prompt)] += n
    assert all(36 <= v < 36 + 8 for v in images.values()), images


def test_images_per_category_keeps_images_per_prompt_as_a_floor() -> None:
    world = ShapesWorld()
    cfg = EvalConfig(images_per_prompt=4, images_per_category=36)
    counts = images_per_prompt(world, HELDOUT, cfg)
    assert _by_category(world, counts) == {
        "single_object": {12},
        "two_object": {18},
        "counting": {12},
        "colors": {6},
        "position": {5},
        "color_attr": {4},
    }


def test_pass_k_forces_at_least_2k_images() -> None:
    world = ShapesWorld()
    assert images_per_prompt(world, HELDOUT, EvalConfig(pass_k=4)) == [8] * 58
    assert (
        images_per_prompt(world, HELDOUT, EvalConfig(images_per_prompt=10, pass_k=4)) == [10] * 58
    )
    counts = images_per_prompt(world, HELDOUT, EvalConfig(images_per_category=36, pass_k=4))
    assert _by_category(world, counts) == {
        "single_object": {12},
        "two_object": {18},
        "counting": {12},
        "colors": {8},
        "position": {8},
        "color_attr": {8},
    }
    assert all(n >= 2 * 4 for n in counts)


def test_images_per_category_without_categories_is_one_group() -> None:
    prompts = HELDOUT[:10]
    counts = images_per_prompt(_NoCategories(), prompts, EvalConfig(images_per_category=25))
    assert counts == [3] * 10  # ceil(25 / 10)


@pytest.mark.parametrize("field", ["images_per_category", "pass_k", "images_per_prompt"])
def test_eval_config_rejects_non_positive_budgets(field: str) -> None:
    with pytest.raises(ValidationError):
        EvalConfig(**{field: 0})
