"""On a CUDA device (``gpu`` marker; skipped elsewhere): a tiny SD3.5 with LoRA samples on the
GPU what it samples on the CPU, and a learner rank on the GPU takes a step whose first ratios
are 1, with the batch, the ELBO draws and the collectives on its device; an ``elborl train``
of two rounds gives its rollout worker and learner rank half a GPU each.

Run with ``pytest -m gpu``; ``scripts/gpu_check.sh`` runs these with the figures printed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import SamplingConfig
from learner.engine import LearnerEngine
from policy.config import LoraConfig, ModelConfig
from policy.io import model_from_config
from policy.lora import add_lora
from rollout.generate import generate
from tests.fixtures.tiny_models import save_tiny_sd3
from tests.integration.test_sd3_learner import first_step_batch, first_step_settings

pytestmark = [pytest.mark.integration, pytest.mark.gpu]

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a cat"]
CUDA = torch.device("cuda:0")


@pytest.fixture(scope="module")
def sd35_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sd3(tmp_path_factory.mktemp("sd35"), "sd35")


def _rollout_policy(model: ModelConfig, device: torch.device) -> object:
    torch.manual_seed(0)  # the same LoRA initialisation on both devices
    policy = add_lora(model_from_config(model, 32), model.lora).eval()
    with torch.no_grad():  # B = 0 at init: move the adapters so that they matter
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    return policy.place(device)


@pytest.mark.parametrize("sampler", ["euler", "sde"])
def test_sampling_on_the_gpu_equals_the_cpu(sd35_dir: Path, sampler: str) -> None:
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    model = ModelConfig(kind="sd3", path=str(sd35_dir), lora=LoraConfig(rank=4))
    sampling = SamplingConfig(sampler=sampler, num_steps=4, guidance=3.0)
    outs = {}
    for device in (torch.device("cpu"), CUDA):
        policy = _rollout_policy(model, device)
        assert next(policy.parameters()).device.type == device.type  # type: ignore[attr-defined]
        assert policy.frozen.pipe.vae.device.type == device.type  # type: ignore[attr-defined]
        outs[device.type] = generate(policy, PROMPTS, sampling, seed=1)  # type: ignore[arg-type]
    cpu, gpu = outs["cpu"], outs["cuda"]
    assert gpu.x0.device.type == "cpu"  # what crosses the object store is on the CPU
    # Same noise (drawn on the CPU), same weights: float32 kernels differ by rounding only.
    assert torch.allclose(cpu.x0, gpu.x0, atol=1e-3), (cpu.x0 - gpu.x0).abs().max()
    assert np.abs(cpu.images.astype(int) - gpu.images.astype(int)).max() <= 2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("estimator", ["elbo", "trajectory"])
def test_a_learner_step_on_the_gpu(
    one_rank: None, sd35_dir: Path, dtype: str, estimator: str
) -> None:
    model = ModelConfig(kind="sd3", path=str(sd35_dir), dtype=dtype, lora=LoraConfig(rank=4))
    sampling, cfg = first_step_settings(estimator)
    rollout = add_lora(model_from_config(model, 32), model.lora).eval().place(CUDA)
    prompts = [p for p in PROMPTS for _ in range(2)]
    out = generate(rollout, prompts, sampling, seed=1, keep_trajectory=sampling.stochastic)
    policy = model_from_config(model, 32, text_encoders=False).place(CUDA)
    policy.add_conditions(rollout.conditions(prompts))
    engine = LearnerEngine(policy, cfg, sampling, seed=0, lora=model.lora)
    assert engine.device.type == "cuda" and engine.sigmas.device.type == "cuda"
    lora = {n: p for n, p in engine.policy.named_parameters() if p.requires_grad}
    assert lora and all(p.is_cuda and p.dtype == torch.float32 for p in lora.values())
    batch = first_step_batch(out, prompts)  # x0 on the CPU, as from the object store
    before = {n: p.detach().clone() for n, p in lora.items()}
    metrics = engine.train_step(batch)
    assert metrics["learner/ratio_min"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["learner/ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert any(not torch.equal(p, before[n]) for n, p in lora.items())
    _, published, _ = engine.sampling_state()
    assert published and all(v.dtype == np.float32 for v in published.values())
