"""The sampling-policy EMA and its schedules (learner/old_policy.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from algo.old_policy import (
    OLD_POLICY_SCHEDULES,
    DecaySchedule,
    ema_update_,
    get_schedule,
    update_old_policy_,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("name", "points"),
    [
        ("linear", {0: 0.0, 1: 0.001, 250: 0.25, 500: 0.5, 10_000: 0.5}),  # min(0.001 s, 0.5)
        ("copy", {0: 0.0, 1: 0.0, 10_000: 0.0}),
        ("delayed_slow", {0: 0.0, 74: 0.0, 75: 0.0, 76: 0.0075, 175: 0.75, 500: 0.999}),
        ("delayed_fast", {9: 0.0, 10: 0.0, 20: 0.1, 60: 0.5, 1000: 0.5}),
    ],
)
def test_schedules_match_the_official_decay_types(name: str, points: dict[int, float]) -> None:
    schedule = get_schedule(name)
    for step, decay in points.items():
        assert schedule(step) == pytest.approx(decay), (name, step)


def test_ema_update_hand_values_and_exact_copy() -> None:
    old = {"w": torch.tensor([1.0, -2.0]), "count": torch.tensor([3])}
    current = {"w": torch.tensor([3.0, 2.0]), "count": torch.tensor([7])}
    ema_update_(old, current, 0.25)
    torch.testing.assert_close(old["w"], torch.tensor([2.5, 1.0]))  # 0.25 old + 0.75 current
    assert old["count"].item() == 7  # integer buffers are copied
    ema_update_(old, current, 0.0)
    assert torch.equal(old["w"], current["w"])
    assert old["w"].data_ptr() != current["w"].data_ptr()


def test_update_old_policy_follows_the_schedule_over_rounds() -> None:
    old = {"w": torch.zeros(3, dtype=torch.float64)}
    current = {"w": torch.ones(3, dtype=torch.float64)}
    schedule = DecaySchedule(flat_steps=0, rate=0.2, max_decay=0.5)
    expected = 0.0
    for step in (1, 2, 3, 4):
        decay = update_old_policy_(old, current, step, schedule)
        expected = decay * expected + (1 - decay) * 1.0
        assert decay == pytest.approx(min(0.2 * step, 0.5))
        torch.testing.assert_close(old["w"], torch.full((3,), expected, dtype=torch.float64))


def test_module_parameters_lora_subset_and_bf16() -> None:
    torch.manual_seed(0)
    current, old = nn.Linear(3, 2), nn.Linear(3, 2)
    frozen_bias = old.bias.detach().clone()
    old_w = old.weight.detach().clone()
    # LoRA-style: only the adapter tensors are passed, and only those change.
    ema_update_({"weight": old.weight}, {"weight": current.weight}, 0.5)
    torch.testing.assert_close(old.weight.detach(), 0.5 * old_w + 0.5 * current.weight.detach())
    assert torch.equal(old.bias.detach(), frozen_bias)
    assert old.weight.grad is None and not old.weight.grad_fn
    bf16 = {"w": torch.zeros(4, dtype=torch.bfloat16)}
    update_old_policy_(bf16, {"w": torch.ones(4)}, step=500)  # linear: d = 0.5
    assert bf16["w"].dtype == torch.bfloat16
    torch.testing.assert_close(bf16["w"].float(), torch.full((4,), 0.5))


def test_errors() -> None:
    with pytest.raises(ValueError, match="decay"):
        ema_update_({"w": torch.zeros(1)}, {"w": torch.zeros(1)}, 1.0)
    with pytest.raises(ValueError, match="only in old"):
        ema_update_({"w": torch.zeros(1), "b": torch.zeros(1)}, {"w": torch.zeros(1)}, 0.1)
    with pytest.raises(ValueError, match="shape"):
        ema_update_({"w": torch.zeros(1)}, {"w": torch.zeros(2)}, 0.1)
    with pytest.raises(ValueError, match="unknown old-policy schedule"):
        get_schedule("cosine")
    with pytest.raises(ValueError, match="step"):
        OLD_POLICY_SCHEDULES.get("linear")(-1)
    with pytest.raises(ValueError, match="invalid"):
        DecaySchedule(max_decay=1.0)
