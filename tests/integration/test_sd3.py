"""The SD3/SD3.5 policy adapter on tiny random pipelines saved offline (``policy/sd3.py``)."""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from algo.elbo import flow_elbo, flow_noise_draw
from algo.samplers import flow_timesteps, sample
from policy.base import guided_fn
from policy.config import LoraConfig, ModelConfig
from policy.io import check_model_config, model_from_config
from policy.lora import add_lora
from policy.sd3 import LORA_TARGETS, SD3Policy, load_sd3
from tests.fixtures.tiny_models import save_tiny_sd3

pytestmark = pytest.mark.integration

PROMPTS = ["a red circle", "two blue squares left of a cat"]


@pytest.fixture(scope="module", params=["sd3", "sd35"])
def sd3_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sd3(tmp_path_factory.mktemp(request.param), request.param)


def test_an_incomplete_directory_names_what_is_missing(tmp_path: Path, sd3_dir: Path) -> None:
    with pytest.raises(ValueError, match="is not a directory"):
        load_sd3(tmp_path / "nowhere")
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "vae").mkdir()
    with pytest.raises(ValueError, match=r"missing transformer, scheduler, text_encoder"):
        load_sd3(tmp_path)


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_the_euler_loop_equals_the_diffusers_pipeline(sd3_dir: Path, guidance: float) -> None:
    from diffusers import StableDiffusion3Pipeline

    policy = load_sd3(sd3_dir)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn((2, *policy.sample_shape), generator=torch.Generator().manual_seed(0))
    cond = policy.encode_prompts(PROMPTS)
    uncond = policy.encode_prompts([""] * 2)
    ours = sample(
        guided_fn(policy, cond, uncond, guidance), noise, sampler="euler", num_steps=4, shift=3.0
    ).x0
    # The scheduler shifts the sigmas it is given (shift = 3), so it gets the unshifted grid.
    theirs = pipe(
        PROMPTS,
        latents=noise.clone(),
        sigmas=torch.linspace(1.0, 0.0, 5)[:-1].tolist(),
        num_inference_steps=4,
        guidance_scale=guidance,
        max_sequence_length=policy.max_sequence_length,
        output_type="latent",
    ).images
    assert pipe.scheduler.sigmas.numpy() == pytest.approx(flow_timesteps(4, 3.0).numpy(), abs=1e-6)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_on_the_diffusers_grid_it_equals_the_pipelines_defaults(sd3_dir: Path) -> None:
    """No sigmas given: the pipeline samples on its scheduler's default grid (shift 3)."""
    from diffusers import StableDiffusion3Pipeline

    policy = load_sd3(sd3_dir)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn((2, *policy.sample_shape), generator=torch.Generator().manual_seed(1))
    cond, uncond = policy.encode_prompts(PROMPTS), policy.encode_prompts([""] * 2)
    fn = guided_fn(policy, cond, uncond, 3.0)
    ours = sample(fn, noise, sampler="euler", num_steps=6, shift=3.0, grid="diffusers").x0
    theirs = pipe(
        PROMPTS,
        latents=noise.clone(),
        num_inference_steps=6,
        guidance_scale=3.0,
        max_sequence_length=policy.max_sequence_length,
        output_type="latent",
    ).images
    assert (ours - theirs).abs().max().item() <= 1e-5
    uniform = sample(fn, noise, sampler="euler", num_steps=6, shift=3.0).x0
    assert (uniform - theirs).abs().max().item() > 1e-3  # the grids differ


def test_copies_share_the_frozen_parts_and_train_only_the_transformer(sd3_dir: Path) -> None:
    policy = load_sd3(sd3_dir)
    twin = copy.deepcopy(policy)
    assert twin.frozen is policy.frozen and twin.transformer is not policy.transformer
    assert all(k.startswith("transformer.") for k in policy.state_dict())
    frozen = policy.frozen.pipe
    assert not any(p.requires_grad for p in frozen.text_encoder.parameters())
    assert not any(p.requires_grad for p in frozen.vae.parameters())


def test_prompt_conditionings_are_cached_and_the_empty_prompt_kept(sd3_dir: Path) -> None:
    policy = load_sd3(sd3_dir)
    policy.cache_size = 2
    first = policy.encode_prompts(["", PROMPTS[0]])
    assert first["prompt_embeds"].shape == (2, 77 + 128, 32) and first["pooled"].shape == (2, 64)
    policy.encode_prompts(PROMPTS)  # evicts the oldest non-empty entries
    assert "" in policy.cached_prompts() and len(policy.cached_prompts()) == 2
    again = policy.encode_prompts([PROMPTS[0], ""])
    torch.testing.assert_close(again["prompt_embeds"][1], first["prompt_embeds"][0])
    torch.testing.assert_close(again["prompt_embeds"][0], first["prompt_embeds"][1])


def test_images_decode_from_and_encode_to_latents(sd3_dir: Path) -> None:
    policy = load_sd3(sd3_dir)
    x0 = torch.randn(3, *policy.sample_shape)
    images = policy.to_images(x0)
    assert images.shape == (3, 32, 32, 3) and images.dtype.name == "uint8"
    assert policy.from_images(images).shape == x0.shape


def test_lora_on_the_papers_targets_gets_gradients_through_the_elbo(sd3_dir: Path) -> None:
    policy = load_sd3(sd3_dir)
    add_lora(policy, LoraConfig(rank=4, alpha=8, target_modules=list(LORA_TARGETS)))
    lora = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    adapted = {n.rsplit(".lora_", 1)[0] for n in lora}
    blocks = len(policy.transformer.transformer_blocks)
    # Every block adapts 7 projections, and all but the last (context_pre_only) to_add_out.
    assert len(adapted) == 8 * blocks - 1
    assert not any("attn2" in n for n in adapted)
    x0 = torch.randn(2, *policy.sample_shape)
    cond = policy.encode_prompts(PROMPTS)
    draw = flow_noise_draw(x0, torch.tensor([0.3, 0.7]), torch.randn_like(x0))
    out = flow_elbo(policy, x0, cond, draw, weighting="adaptive")
    out.elbo.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora.values())
    assert isinstance(policy, SD3Policy)


def test_the_sd3_kind_loads_model_path_with_the_papers_lora_targets(
    sd3_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = ModelConfig(kind="sd3", path=str(sd3_dir), lora=LoraConfig(rank=4))
    check_model_config(model, 32)
    policy = model_from_config(model, 32)
    assert isinstance(policy, SD3Policy) and policy.image_size == 32
    with caplog.at_level(logging.INFO, logger="policy.lora"):
        add_lora(policy, model.lora)  # target_modules null: the kind's default, the paper's 8
    blocks = len(policy.transformer.transformer_blocks)
    assert f"LoRA r=4 alpha=8 on {8 * blocks - 1} modules" in caplog.text


def test_the_directory_check_names_a_wrong_pipeline_and_a_misfit_image_size(
    tmp_path: Path, sd3_dir: Path
) -> None:
    root = Path(shutil.copytree(sd3_dir, tmp_path / "m"))
    model = ModelConfig(kind="sd3", path=str(root))
    config = root / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "patch_size": 2}))
    with pytest.raises(ValueError, match=r"world.image_size = 33 is not a multiple of 2"):
        check_model_config(model, 33)
    index = root / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="holds a 'FluxPipeline', not a StableDiffusion3"):
        check_model_config(model, 32)


def test_a_policy_without_text_encoders_runs_on_shipped_conditionings(sd3_dir: Path) -> None:
    full = load_sd3(sd3_dir)
    bare = load_sd3(sd3_dir, text_encoders=False)  # what a learner rank loads
    assert bare.frozen.pipe.text_encoder is None and bare.frozen.pipe.text_encoder_3 is None
    with pytest.raises(RuntimeError, match="no text encoders loaded"):
        bare.encode_prompts(PROMPTS)
    shipped = full.conditions([*PROMPTS, PROMPTS[0]])
    assert list(shipped) == [*PROMPTS, ""]  # unique prompts, and the empty one for guidance
    bare.add_conditions(shipped)
    for key, value in full.encode_prompts(PROMPTS).items():
        assert torch.equal(bare.encode_prompts(PROMPTS)[key], value)
