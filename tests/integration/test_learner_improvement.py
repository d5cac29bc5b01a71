"""One learner step moves the ELBO towards the high-advantage samples, for every loss.

``learner/improvement`` is ``mean(A (E_new - E_old))`` on the step's first microbatch after
the update (``learner/estimators.py``): positive when likelihood went where the advantage
pointed. The e2e runs only check that it is reported; here it is measured on a batch whose
advantages are large and fixed, with the real base model and a real engine (one rank).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import SamplingConfig
from learner.batch import TrainBatch
from learner.config import LearnerConfig
from learner.engine import LearnerEngine
from policy.io import load_policy
from rollout.generate import generate
from tests.conftest import BASE_CHECKPOINT

pytestmark = pytest.mark.integration

PROMPTS = ["two red circles", "a blue square", "a green triangle and a red circle", "a circle"]


@pytest.mark.parametrize("loss", ["epg", "pepg", "par", "grpo"])
def test_one_step_raises_the_elbo_of_high_advantage_samples(one_rank: None, loss: str) -> None:
    sampling = SamplingConfig(sampler="euler", num_steps=4)
    prompts = [p for p in PROMPTS for _ in range(4)]
    out = generate(load_policy(BASE_CHECKPOINT), prompts, sampling, seed=5)
    advantage = "standard" if loss == "grpo" else "exact"
    cfg = LearnerConfig(
        loss=loss,
        advantage=advantage,
        num_timesteps=3,
        microbatch_size=16,
        lr=1e-3,
        kl_beta=0.0,
    )
    engine = LearnerEngine(load_policy(BASE_CHECKPOINT), cfg, sampling, seed=0)
    batch = TrainBatch(
        sample_ids=np.arange(16),
        group_ids=np.arange(16) // 4,
        x0=out.x0,
        prompts=prompts,
        advantages=torch.tensor([1.0, -1.0, 0.5, -0.5] * 4),
        versions=np.zeros(16, dtype=np.int64),
        seed=7,
    )
    metrics = engine.train_step(batch)
    assert metrics["learner/improvement"] > 0, metrics
