"""The learner on a tiny SD3.5 with LoRA, in float32 and bfloat16, under guidance.

One rank, a real DeepSpeed engine, rollouts guided at G = 3: on the first step the current and
old policies are the same weights, so every importance ratio is 1 to float precision for the
ELBO and for the trajectory baseline; in bfloat16 the base stays bf16 while the adapters are
float32 (what is trained and published), and the learner holds no text encoders.
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
from policy.config import LoraConfig, ModelConfig
from policy.io import model_from_config
from policy.lora import add_lora
from rollout.generate import Generated, generate
from tests.fixtures.tiny_models import save_tiny_sd3

pytestmark = pytest.mark.integration

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a cat"]


def first_step_settings(estimator: str) -> tuple[SamplingConfig, LearnerConfig]:
    """Rollouts guided at G = 3 (SDE for the trajectory baseline) and a learner whose first
    step checks the ratios: the ELBO with a KL term, or the trajectory estimator with GRPO."""
    sde = estimator == "trajectory"
    sampling = SamplingConfig(sampler="sde" if sde else "euler", num_steps=4, guidance=3.0)
    cfg = LearnerConfig(
        estimator=estimator,
        loss="grpo" if sde else "epg",
        advantage="standard" if sde else "exact",
        num_timesteps=2,
        microbatch_size=8,
        kl_beta=0.0 if sde else 0.01,
    )
    return sampling, cfg


def first_step_batch(out: Generated, prompts: list[str]) -> TrainBatch:
    """The rollouts ``out`` of ``prompts`` (pairs of one prompt) as one rank's batch."""
    return TrainBatch(
        sample_ids=np.arange(len(prompts)),
        group_ids=np.arange(len(prompts)) // 2,
        x0=out.x0,
        prompts=prompts,
        advantages=torch.tensor([1.0, -1.0] * (len(prompts) // 2)),
        versions=np.zeros(len(prompts), dtype=np.int64),
        seed=3,
        trajectory=out.trajectory,
        log_probs=out.log_probs,
    )


@pytest.fixture(scope="module")
def sd35_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sd3(tmp_path_factory.mktemp("sd35"), "sd35")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("estimator", ["elbo", "trajectory"])
def test_the_first_ratio_is_one_under_guidance(
    one_rank: None, sd35_dir: Path, dtype: str, estimator: str
) -> None:
    model = ModelConfig(kind="sd3", path=str(sd35_dir), dtype=dtype, lora=LoraConfig(rank=4))
    sampling, cfg = first_step_settings(estimator)
    rollout = add_lora(model_from_config(model, 32), model.lora).eval()
    prompts = [p for p in PROMPTS for _ in range(2)]
    out = generate(rollout, prompts, sampling, seed=1, keep_trajectory=sampling.stochastic)
    policy = model_from_config(model, 32, text_encoders=False)  # as a learner rank loads it
    policy.add_conditions(rollout.conditions(prompts))
    engine = LearnerEngine(policy, cfg, sampling, seed=0, lora=model.lora)
    lora = {n: p for n, p in engine.policy.named_parameters() if p.requires_grad}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    assert {p.dtype for n, p in engine.policy.named_parameters() if "lora_" not in n} == {
        getattr(torch, dtype)
    }
    batch = first_step_batch(out, prompts)
    before = {n: p.detach().clone() for n, p in lora.items()}
    metrics = engine.train_step(batch)  # (the fail-fast check at 0.01 passed)
    # Same weights, same passes, same dtype as the rollouts: 1.0 exactly here (all four cases).
    assert metrics["learner/ratio_min"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["learner/ratio_max"] == pytest.approx(1.0, abs=1e-6)
    assert any(not torch.equal(p, before[n]) for n, p in lora.items())  # the step applied
    _, published, _ = engine.sampling_state()
    assert published and all(v.dtype == np.float32 for v in published.values())
