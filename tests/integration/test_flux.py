"""The FLUX.1 policy (``policy/flux.py``) on tiny random pipelines saved offline: packing,
embedded guidance, the dynamic-shift grid, LoRA on the anchors' targets, shipped
conditionings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from algo.elbo import flow_elbo, flow_noise_draw
from algo.samplers import sample
from policy.base import GuidedModel, guided_fn
from policy.config import LoraConfig, ModelConfig
from policy.flux import FluxPolicy, load_flux
from policy.io import check_model_config, model_from_config
from policy.lora import add_lora
from tests.fixtures.tiny_models import save_tiny_flux

pytestmark = pytest.mark.integration

PROMPTS = ["a red circle", "two blue squares left of a cat"]


@pytest.fixture(scope="module", params=["dev", "schnell"])
def flux_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_flux(tmp_path_factory.mktemp(request.param), request.param)


def _pack(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def test_the_euler_loop_equals_the_flux_pipeline_on_its_grid(flux_dir: Path) -> None:
    from diffusers import FluxPipeline

    policy = load_flux(flux_dir, image_size=32)
    dev = policy.guidance_mode == "embedded"
    assert policy.guidance_mode == ("embedded" if "dev" in str(flux_dir) else "none")
    guidance = 3.5 if dev else 1.0
    pipe = FluxPipeline.from_pretrained(flux_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn((2, *policy.sample_shape), generator=torch.Generator().manual_seed(0))
    shift, grid = policy.sampling_grid(1.0, "diffusers")
    assert grid == "uniform" and shift == pytest.approx(1.6487, abs=1e-4)  # exp(0.5): 256 tokens
    fn = guided_fn(policy, policy.encode_prompts(PROMPTS), None, guidance)
    with torch.no_grad():
        ours = sample(fn, noise, sampler="euler", num_steps=4, shift=shift, grid=grid).x0
    theirs = pipe(
        PROMPTS,
        latents=_pack(noise),
        height=32,
        width=32,
        num_inference_steps=4,
        guidance_scale=guidance,
        max_sequence_length=policy.max_sequence_length,
        output_type="latent",
    ).images
    assert (_pack(ours) - theirs).abs().max().item() <= 1e-5


def test_guidance_is_one_embedded_pass_or_refused(flux_dir: Path) -> None:
    policy = load_flux(flux_dir, image_size=32)
    cond = policy.encode_prompts(PROMPTS)
    x, t = torch.randn(2, *policy.sample_shape), torch.full((2,), 0.5)
    if policy.guidance_mode == "none":  # schnell
        with pytest.raises(ValueError, match="has no guidance"):
            guided_fn(policy, cond, None, 3.5)
        return
    with torch.no_grad():
        a = GuidedModel(policy, policy, 3.5)(x, t, cond)
        b = policy(x, t, policy.with_guidance(cond, 3.5))
        c = GuidedModel(policy, policy, 1.0)(x, t, cond)
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max().item() > 1e-6  # the scale reaches the network


def test_lora_on_the_anchors_targets_trains_through_the_elbo(flux_dir: Path) -> None:
    model = ModelConfig(kind="flux", path=str(flux_dir), lora=LoraConfig(rank=4))
    check_model_config(model, 32)
    with pytest.raises(ValueError, match="not a multiple of 2"):
        check_model_config(model, 33)
    policy = add_lora(model_from_config(model, 32), model.lora)
    assert isinstance(policy, FluxPolicy)
    lora = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    adapted = {n.rsplit(".lora_", 1)[0] for n in lora}
    assert any("ff_context.net.2" in n for n in adapted)
    assert any("single_transformer_blocks" in n for n in adapted)  # their attention matches
    x0 = torch.randn(2, *policy.sample_shape)
    cond = policy.encode_prompts(PROMPTS)
    if policy.guidance_mode == "embedded":
        cond = policy.with_guidance(cond, 3.5)
    draw = flow_noise_draw(x0, torch.tensor([0.3, 0.7]), torch.randn_like(x0))
    flow_elbo(policy, x0, cond, draw, weighting="adaptive").elbo.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora.values())


def test_a_learner_side_policy_runs_on_shipped_conditionings(flux_dir: Path) -> None:
    full = load_flux(flux_dir, image_size=32)
    bare = load_flux(flux_dir, image_size=32, text_encoders=False)
    assert bare.frozen.pipe.text_encoder is None and bare.frozen.pipe.text_encoder_2 is None
    bare.add_conditions(full.conditions(PROMPTS))
    for key, value in full.encode_prompts(PROMPTS).items():
        assert torch.equal(bare.encode_prompts(PROMPTS)[key], value)
