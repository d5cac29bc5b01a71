"""LoRA adapters on the tiny policy: only adapters train, partial weight loads are checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from policy.lora import adapter_pass, add_lora, add_old_adapter, trainable_keys
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


def _trained_lora() -> torch.nn.Module:
    policy = add_lora(_policy(), LoraConfig(rank=4))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn_like(p))  # a "trained" adapter, away from identity
    return policy


def _inputs(policy: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 3, 32, 32, generator=g), torch.rand(2, generator=g)
    return x, t, policy.encode_prompts(["two red circles", "one blue square"])


def test_old_and_reference_passes_on_one_base_give_the_right_models() -> None:
    policy = _trained_lora()
    x, t, c = _inputs(policy)
    base = _policy()  # the same base weights, no adapter
    with torch.no_grad():
        current = policy(x, t, c)
        add_old_adapter(policy, LoraConfig(rank=4))
        with adapter_pass(policy, "old"):
            old = policy(x, t, c)
        with adapter_pass(policy, None):
            ref = policy(x, t, c)
        after = policy(x, t, c)
    torch.testing.assert_close(old, current)  # the old adapter is a copy of the trained one
    torch.testing.assert_close(ref, base(x, t, c))  # adapters disabled = the base model
    assert not torch.allclose(ref, current)
    torch.testing.assert_close(after, current)  # `default` is active again
    assert trainable_keys(policy) and all(".default." in k for k in trainable_keys(policy))


def test_gradients_reach_the_trained_adapter_after_old_and_reference_passes() -> None:
    """The peft trap: switching adapters flips requires_grad; a pass after the current
    forward must not leave the trained adapter without gradient."""
    policy = _trained_lora()
    add_old_adapter(policy, LoraConfig(rank=4))
    x, t, c = _inputs(policy)
    loss = policy(x, t, c).square().mean()
    with torch.no_grad(), adapter_pass(policy, "old"):
        policy(x, t, c)
    with torch.no_grad(), adapter_pass(policy, None):
        policy(x, t, c)
    loss.backward()
    trained = [p for n, p in policy.named_parameters() if ".default." in n]
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    assert all(p.grad is None for n, p in policy.named_parameters() if ".old." in n)


def test_without_the_guard_the_trap_is_real() -> None:
    """Why ``adapter_pass`` exists (peft 0.21): a bare set_adapter after the forward."""
    policy = _trained_lora()
    add_old_adapter(policy, LoraConfig(rank=4))
    x, t, c = _inputs(policy)
    loss = policy(x, t, c).square().mean()
    policy.unet.set_adapter("old")
    loss.backward()
    trained = [p for n, p in policy.named_parameters() if ".default." in n]
    assert all(p.grad is None for p in trained)
