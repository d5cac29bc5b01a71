"""The DeepSpeed learner as Ray actors: W=1 and W=2 ranks give the same update for the same data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from rollout.engine import RolloutSamples
from services.actors import LearnerWorker
from services.config import LearnerConfig, ModelConfig, SamplingConfig
from tests.conftest import BASE_CHECKPOINT

pytestmark = pytest.mark.integration

N = 16


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False)
    yield
    ray.shutdown()


def _data() -> tuple[list[RolloutSamples], np.ndarray]:
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((N, 3, 32, 32), generator=g) * 2 - 1
    prompts = ["two red circles", "a blue square left of a red circle"] * (N // 2)
    adv = np.linspace(-0.1, 0.1, N).astype(np.float32)
    ids = np.arange(N) + 1000
    halves = [slice(0, N // 2), slice(N // 2, N)]
    return [RolloutSamples(ids[s], ids[s] // 4, prompts[s], x0[s], 0, 0.0) for s in halves], adv


def _update(
    world: int,
    zero_stage: int,
    keep: np.ndarray,
    model: ModelConfig | None = None,
    data: tuple[list[RolloutSamples], np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    cfg = LearnerConfig(
        num_workers=world,
        microbatch_size=4,
        num_timesteps=3,
        lr=1e-3,
        zero_stage=zero_stage,
        kl_beta=1e-4,
    )
    learners = [
        ray.remote(LearnerWorker).options(num_cpus=0.5).remote(r, world, 1) for r in range(world)
    ]
    master = ray.get(learners[0].rendezvous.remote(), timeout=60)
    ray.get(
        [
            lw.setup.remote(
                master,
                model or ModelConfig(checkpoint=str(BASE_CHECKPOINT)),
                cfg,
                SamplingConfig(num_steps=4),
                0,
                32,
            )
            for lw in learners
        ],
        timeout=180,
    )
    chunks, adv = data or _data()
    refs = [ray.put(c) for c in chunks]
    per_rank = [refs] if world == 1 else [[refs[0]], [refs[1]]]
    halves = [slice(0, N)] if world == 1 else [slice(0, N // 2), slice(N // 2, N)]
    kept = int(keep.sum())
    metrics = ray.get(
        [
            lw.train_step.remote(per_rank[r], adv[halves[r]], keep[halves[r]], kept, 7)
            for r, lw in enumerate(learners)
        ],
        timeout=180,
    )
    assert all(np.isfinite(m["learner/loss"]) for m in metrics)
    # Every rank is asked (under ZeRO-3 the gather is a collective); rank 0 answers.
    state = ray.get([lw.current_state.remote() for lw in learners], timeout=60)[0]
    for lw in learners:
        ray.kill(lw)
    return state


# Uneven: rank 0 keeps 3 of its 8 samples (its second microbatch keeps none), rank 1 all 8,
# as when some rewards came back invalid; the step must still equal the one-rank step.
ALL = np.ones(N, dtype=bool)
UNEVEN = np.array([1, 0, 1, 1, 0, 0, 0, 0] + [1] * 8, dtype=bool)


@pytest.mark.parametrize(
    ("zero_stage", "keep"),
    [(0, ALL), (2, ALL), (3, ALL), (0, UNEVEN), (2, UNEVEN)],
    ids=["zero0", "zero2", "zero3", "zero0-uneven", "zero2-uneven"],
)
def test_one_and_two_ranks_give_the_same_update(
    ray_local: None, zero_stage: int, keep: np.ndarray
) -> None:
    from policy.io import load_policy

    base = {k: v.numpy() for k, v in load_policy(BASE_CHECKPOINT).state_dict().items()}
    one, two = _update(1, zero_stage, keep), _update(2, zero_stage, keep)
    moved = max(float(np.abs(one[k] - base[k]).max()) for k in base)
    assert moved > 1e-5  # the step really changed the weights
    for k in base:
        # Adam's first step is lr * g / (|g| + eps): where |g| is near eps, the last-bit
        # difference of summing over one rank or two shows up as ~1e-6; a wrong update (a
        # microbatch lost or counted twice) moves a weight by O(lr) = 1e-3.
        np.testing.assert_allclose(one[k], two[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_one_and_two_ranks_agree_on_a_tiny_sd35_with_lora(ray_local: None, tmp_path: Path) -> None:
    """The real-model path: LoRA adapters on a tiny SD3.5, learner ranks without text encoders
    training on the conditionings shipped with the samples."""
    from policy.config import LoraConfig
    from policy.io import model_from_config
    from tests.fixtures.tiny_models import save_tiny_sd3

    model = ModelConfig(
        kind="sd3", path=str(save_tiny_sd3(tmp_path / "sd35", "sd35")), lora=LoraConfig(rank=4)
    )
    prompts = ["a red circle", "two blue squares left of a cat"] * (N // 2)
    conditions = model_from_config(model, 32).conditions(prompts)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn((N, 4, 32, 32), generator=g)
    ids = np.arange(N) + 1000
    halves = [slice(0, N // 2), slice(N // 2, N)]
    chunks = [
        RolloutSamples(ids[h], ids[h] // 4, prompts[h], x0[h], 0, 0.0, conditions=conditions)
        for h in halves
    ]
    data = (chunks, np.linspace(-1.0, 1.0, N).astype(np.float32))
    one, two = _update(1, 0, ALL, model, data), _update(2, 0, ALL, model, data)
    assert one and all("lora_" in k for k in one)  # only the adapters are trained
    assert max(float(np.abs(v).max()) for k, v in one.items() if "lora_B" in k) > 1e-5
    for k in one:
        np.testing.assert_allclose(one[k], two[k], rtol=1e-4, atol=1e-5, err_msg=k)
