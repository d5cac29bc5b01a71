"""LoRA adapters on the tiny policy: only adapters train, partial weight loads are checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from policy.lora import add_lora, trainable_keys
from policy.state import checksum, load_numpy_state, to_numpy_state
from services.config import LoraConfig
from tests.conftest import build_tiny

pytestmark = pytest.mark.unit


def _policy() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_tiny(32, {"channels": (16, 32), "text_dim": 32, "text_layers": 1})


def test_only_adapters_train_and_start_as_identity() -> None:
    base = _policy()
    adapted = add_lora(_policy(), LoraConfig(rank=4))
    keys = trainable_keys(adapted)
    assert keys and all("lora_" in k for k in keys)
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    c = base.encode_prompts(["two red circles", "one blue square"])
    torch.testing.assert_close(adapted(x, t, c), base(x, t, c))  # lora_B starts at zero


def test_partial_state_round_trip_and_unknown_keys() -> None:
    a, b = add_lora(_policy(), LoraConfig(rank=4)), add_lora(_policy(), LoraConfig(rank=4))
    keys = trainable_keys(a)
    with torch.no_grad():
        for name, p in a.named_parameters():
            if name in keys:
                p.add_(0.01)
    state = to_numpy_state(a, keys)
    assert set(state) == set(keys)
    load_numpy_state(b, {k: v.copy() for k, v in state.items()})
    assert checksum(to_numpy_state(b, keys)) == checksum(state)
    with pytest.raises(ValueError, match="unknown parameters"):
        load_numpy_state(b, {"no.such.weight": np.zeros(1, dtype=np.float32)})


def test_rank_zero_is_rejected() -> None:
    with pytest.raises(ValueError, match="rank > 0"):
        add_lora(_policy(), LoraConfig(rank=0))
