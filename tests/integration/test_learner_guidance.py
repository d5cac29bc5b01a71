"""Guidance inside the learner's passes: the ELBO and the trajectory baseline see the guided
velocity the rollouts sampled with, and the ELBO is divided by the training scale.

Rollouts sampled at G = 3 on the tiny base model, one rank, a real DeepSpeed engine. Before
guidance was applied in the learner, the trajectory baseline re-scored guided SDE steps
unguided, so its first importance ratio was not 1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import SamplingConfig
from learner.batch import TrainBatch
from learner.config import LearnerConfig
from learner.engine import FirstRatioError, LearnerEngine
from policy.base import GuidedModel, guided_fn
from policy.io import load_policy
from rollout.generate import generate
from services.config import RunConfig
from tests.conftest import BASE_CHECKPOINT

pytestmark = pytest.mark.integration

PROMPTS = ["two red circles", "a blue square", "a green triangle and a red circle", "a circle"]


def _batch(sampling: SamplingConfig, trajectory: bool) -> TrainBatch:
    prompts = [p for p in PROMPTS for _ in range(2)]
    out = generate(load_policy(BASE_CHECKPOINT), prompts, sampling, seed=3, keep_trajectory=True)
    return TrainBatch(
        sample_ids=np.arange(8),
        group_ids=np.arange(8) // 2,
        x0=out.x0,
        prompts=prompts,
        advantages=torch.tensor([1.0, -1.0] * 4),
        versions=np.zeros(8, dtype=np.int64),
        seed=11,
        trajectory=out.trajectory if trajectory else None,
        log_probs=out.log_probs if trajectory else None,
    )


def test_the_guided_model_is_the_samplers_guided_velocity() -> None:
    policy = load_policy(BASE_CHECKPOINT)
    cond, uncond = policy.encode_prompts(PROMPTS), policy.encode_prompts([""] * 4)
    x, t = torch.randn(4, *policy.sample_shape), torch.full((4,), 0.6)
    with torch.no_grad():
        want = guided_fn(policy, cond, uncond, 3.0)(x, t)
        torch.testing.assert_close(GuidedModel(policy, policy, 3.0)(x, t, cond), want)
        torch.testing.assert_close(GuidedModel(policy, policy, 1.0)(x, t, cond), policy(x, t, cond))


def test_the_trajectory_baselines_first_ratio_is_one_under_guidance(one_rank: None) -> None:
    sampling = SamplingConfig(sampler="sde", num_steps=4, guidance=3.0)
    cfg = LearnerConfig(
        estimator="trajectory",
        loss="grpo",
        advantage="standard",
        microbatch_size=8,
        kl_beta=0.0,
    )
    engine = LearnerEngine(load_policy(BASE_CHECKPOINT), cfg, sampling, seed=0)
    metrics = engine.train_step(_batch(sampling, trajectory=True))
    assert metrics["learner/ratio_min"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["learner/ratio_max"] == pytest.approx(1.0, abs=1e-4)


def test_the_elbo_passes_are_guided_and_divided_by_the_training_scale(one_rank: None) -> None:
    sampling = SamplingConfig(sampler="euler", num_steps=4, guidance=3.0)
    cfg = LearnerConfig(num_timesteps=2, microbatch_size=8, kl_beta=1e-3, ref_guidance=2.0)
    engine = LearnerEngine(load_policy(BASE_CHECKPOINT), cfg, sampling, seed=0)
    assert (engine.train_guidance, engine.ref_guidance) == (3.0, 2.0)
    assert engine.loss_cfg.cfg_scale == 3.0
    assert engine.model.scale == 3.0 and engine.ref.scale == 2.0
    assert engine.old_for(0).scale == 3.0
    metrics = engine.train_step(_batch(sampling, trajectory=False))
    assert metrics["learner/ratio_min"] == pytest.approx(1.0, abs=1e-5)
    assert np.isfinite(metrics["learner/loss"])


def test_the_trajectory_baseline_refuses_another_training_scale() -> None:
    settings = {
        "rollout": {"sampling": {"sampler": "sde", "guidance": 3.0}},
        "learner": {"estimator": "trajectory", "train_guidance": 1.0},
    }
    with pytest.raises(ValueError, match=r"learner.train_guidance = 1.0 differs"):
        RunConfig.model_validate(settings)
    settings["learner"] = {"estimator": "trajectory"}  # null follows the sampling scale
    assert RunConfig.model_validate(settings).learner.guidance_scales(3.0) == (3.0, 3.0)


def test_a_first_step_whose_ratios_are_not_one_stops_before_any_update(one_rank: None) -> None:
    """Rollouts guided at G = 3, a learner told they were unguided: caught, nothing applied."""
    cfg = LearnerConfig(
        estimator="trajectory", loss="grpo", advantage="standard", microbatch_size=8, kl_beta=0.0
    )
    unguided = SamplingConfig(sampler="sde", num_steps=4, guidance=1.0)
    engine = LearnerEngine(load_policy(BASE_CHECKPOINT), cfg, unguided, seed=0)
    before = {k: v.clone() for k, v in engine.policy.state_dict().items()}
    batch = _batch(SamplingConfig(sampler="sde", num_steps=4, guidance=3.0), trajectory=True)
    with pytest.raises(FirstRatioError, match=r"importance ratios are up to .* from 1.*guided"):
        engine.train_step(batch)
    after = engine.policy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
