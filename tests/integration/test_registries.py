"""Open seams: a toy sampler and a toy loss, added through the registries only, train a step.

Nothing in the engine, the rollout code or the configs names them: the config validates
their names against the registries, the rollout samples with the toy sampler, and the learner
takes its ELBO timesteps from the toy sampler's own (non-uniform) grid.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import Tensor

from algo.losses import LOSSES, PairTerms, PolicyLoss
from algo.samplers import SAMPLERS, EulerSampler, register_sampler
from common.config import SamplingConfig
from learner.batch import TrainBatch
from learner.config import LearnerConfig
from learner.engine import LearnerEngine
from policy.io import load_policy
from rollout.generate import generate
from tests.conftest import BASE_CHECKPOINT

pytestmark = pytest.mark.integration


class SquareRootGrid(EulerSampler):
    """Euler steps on the grid ``sigma_i = 1 - sqrt(i / S)``: dense near noise."""

    name = "toy_sqrt_euler"

    def timesteps(
        self,
        num_steps: int,
        shift: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        grid: str = "uniform",
    ) -> Tensor:
        i = torch.arange(num_steps + 1, dtype=torch.float64)
        return (1.0 - (i / num_steps).sqrt()).to(device=device, dtype=dtype)


def toy_regression(z: PairTerms, rho: Tensor) -> Tensor:
    """Advantage regression without the ratio, halved again: a loss nobody registered."""
    return 0.25 * (z.adv - (z.elbo - z.old)).square()


@pytest.fixture
def toys() -> Iterator[None]:
    register_sampler(SquareRootGrid)
    LOSSES.add("toy_regression", PolicyLoss(toy_regression, ratio=False))
    try:
        yield
    finally:
        SAMPLERS.remove(SquareRootGrid.name)
        LOSSES.remove("toy_regression")


def test_a_toy_sampler_and_loss_train_one_step_through_the_registries(
    toys: None, one_rank: None
) -> None:
    sampling = SamplingConfig(sampler="toy_sqrt_euler", num_steps=4)
    cfg = LearnerConfig(loss="toy_regression", num_timesteps=3, microbatch_size=8, kl_beta=0.0)
    prompts = ["two red circles", "a blue square left of a red circle"] * 4
    policy = load_policy(BASE_CHECKPOINT)
    out = generate(policy, prompts, sampling, seed=3)
    engine = LearnerEngine(load_policy(BASE_CHECKPOINT), cfg, sampling, seed=0)
    # The learner's grid is the toy sampler's, not the uniform default.
    np.testing.assert_allclose(engine.sigmas.numpy(), [1.0, 0.5, 1 - 0.5**0.5, 1 - 0.75**0.5, 0.0])
    before = {k: v.clone() for k, v in engine.policy.state_dict().items()}
    batch = TrainBatch(
        sample_ids=np.arange(8),
        group_ids=np.arange(8) // 4,
        x0=out.x0,
        prompts=prompts,
        advantages=torch.linspace(-0.1, 0.1, 8),
        versions=np.zeros(8, dtype=np.int64),
        seed=11,
    )
    metrics = engine.train_step(batch)
    assert np.isfinite(metrics["learner/loss"]) and metrics["learner/loss"] > 0
    assert metrics["learner/num_pairs"] == 8 * 3
    after = engine.policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # Every ELBO timestep of the step came from the toy grid (minus its final 0).
    from learner.estimators import ElboEstimator

    t, _ = ElboEstimator.draws(engine, batch.sample_ids, batch.seed, (3, 32, 32))
    grid = set(np.round(engine.sigmas[:-1].numpy(), 6).tolist())
    assert set(np.round(t.numpy().ravel(), 6).tolist()) <= grid


def test_the_config_refuses_unregistered_names_and_lists_the_registered() -> None:
    with pytest.raises(ValueError, match=r"unknown sampler 'toy_sqrt_euler'.*dpm2"):
        SamplingConfig(sampler="toy_sqrt_euler")
    with pytest.raises(ValueError, match=r"unknown policy loss 'toy_regression'.*pepg"):
        LearnerConfig(loss="toy_regression")
