"""The old, lagged and reference policies of a LoRA run held as adapters on one base model
(``learner/copies.py``) give the same training as frozen deep copies, step for step.

Three steps of the real engine (one rank, DeepSpeed) on the tiny base with LoRA and a KL term,
the third with half its samples from the lagged version: the adapters' way (one base, the
reference = adapters disabled) must reproduce the deep copies' losses, ratios, KL, trained
weights and published sampling weights, and save/load must give back the same policies.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import SamplingConfig
from learner.batch import TrainBatch
from learner.config import LearnerConfig
from learner.engine import LearnerEngine
from policy.config import LoraConfig
from policy.io import load_policy
from rollout.generate import generate
from tests.conftest import BASE_CHECKPOINT

pytestmark = pytest.mark.integration

PROMPTS = ["two red circles", "a blue square", "a green triangle and a red circle", "a circle"]
SAMPLING = SamplingConfig(sampler="euler", num_steps=4)
CFG = LearnerConfig(num_timesteps=2, microbatch_size=8, lr=3e-3, kl_beta=0.05)
LORA = LoraConfig(rank=4)


def _engine(copies: str) -> LearnerEngine:
    torch.manual_seed(0)  # the same adapter initialisation for both
    return LearnerEngine(
        load_policy(BASE_CHECKPOINT), CFG, SAMPLING, seed=0, lora=LORA, copies=copies
    )  # type: ignore[arg-type]


def _batches() -> list[TrainBatch]:
    prompts = [p for p in PROMPTS for _ in range(2)]
    out = generate(load_policy(BASE_CHECKPOINT), prompts, SAMPLING, seed=5)
    versions = [np.zeros(8, np.int64), np.ones(8, np.int64), np.array([1, 2] * 4)]
    return [
        TrainBatch(
            sample_ids=np.arange(8),
            group_ids=np.arange(8) // 2,
            x0=out.x0,
            prompts=prompts,
            advantages=torch.tensor([1.0, -1.0, 0.5, -0.5] * 2) * (i + 1),
            versions=v,
            seed=7 + i,
        )
        for i, v in enumerate(versions)
    ]


def _trained(engine: LearnerEngine) -> dict[str, torch.Tensor]:
    sd = engine.policy.state_dict()
    return {k: sd[k].clone() for k in engine.keys}


def test_adapters_on_one_base_train_exactly_as_deep_copies(one_rank: None, tmp_path: Path) -> None:
    deep, adapters = _engine("deep"), _engine("adapters")
    assert deep.keys == adapters.keys and all("lora_" in k for k in deep.keys)
    for step, batch in enumerate(_batches()):
        a, b = deep.train_step(batch), adapters.train_step(batch)
        for name in ("learner/loss", "learner/kl_mean", "learner/ratio_max", "learner/ratio_min"):
            assert b[name] == pytest.approx(a[name], rel=1e-5, abs=1e-7), (step, name)
        if step == 0:
            assert a["learner/ratio_max"] == pytest.approx(1.0, abs=1e-6)
        else:
            assert a["learner/kl_mean"] > 0  # the adapters moved away from the reference
    # Weights to 5e-4: Adam divides by sqrt(v), so a parameter whose gradient is ~0 turns a
    # float-noise gradient difference into a step of up to ~lr (seen: one element of 256 off
    # by 1.8e-4 on a busy AVX-512 machine); a wrong update (a pass on the wrong adapter, a
    # lost microbatch) moves weights by lr = 3e-3 per step. The losses above agree to 1e-5.
    for k, v in _trained(deep).items():
        torch.testing.assert_close(_trained(adapters)[k], v, rtol=1e-4, atol=5e-4)
    v_deep, s_deep, _ = deep.sampling_state()
    v_ad, s_ad, _ = adapters.sampling_state()
    assert v_deep == v_ad == 3 and s_deep.keys() == s_ad.keys()
    for k in s_deep:
        np.testing.assert_allclose(s_ad[k], s_deep[k], rtol=1e-4, atol=5e-4)

    adapters.save(tmp_path)
    restored = _engine("adapters")
    restored.load(tmp_path)
    assert restored.version == 3 and restored.copies.lagged_version == 2
    for k, v in restored.sampling_state()[1].items():
        np.testing.assert_array_equal(v, s_ad[k])
    torch.testing.assert_close(_trained(restored), _trained(adapters), rtol=0, atol=0)
    # The lagged version answers as the old policy before the last update did.
    x, t = torch.randn(2, *restored.policy.sample_shape), torch.full((2,), 0.5)
    cond = restored.policy.encode_prompts(PROMPTS[:2])
    adapters.policy.eval()  # (train mode picks other attention kernels: ~1e-6 apart)
    with torch.no_grad():
        want = adapters.old_for(2)(x, t, cond)
        torch.testing.assert_close(restored.old_for(2)(x, t, cond), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="only holds versions"):
        restored.old_for(1)
