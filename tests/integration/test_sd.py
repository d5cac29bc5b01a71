"""The SD1.x/SD2.x and SDXL policies (``policy/sd.py``) on tiny random pipelines saved offline:
the flow view (``algo/vp.py``) samples what diffusers' DDIM pipeline samples, for epsilon and
v-prediction and for SDXL's added conditioning, under classifier-free guidance; an SDXL LoRA
export loads in diffusers and samples what the policy samples; LoRA on the UNet's attention
trains through the ELBO; a learner-side policy needs no text encoder; unsupported schedules are
refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from algo.elbo import flow_elbo, flow_noise_draw
from algo.samplers import sample
from algo.vp import fractional_timestep, scaled_linear_alphas_cumprod, trailing_flow_grid
from policy.base import guided_fn
from policy.config import LoraConfig, ModelConfig
from policy.io import check_model_config, model_from_config
from policy.lora import add_lora
from policy.sd import SDPolicy, SDXLPolicy, load_sd
from tests.fixtures.tiny_models import save_tiny_sd, save_tiny_sdxl

pytestmark = pytest.mark.integration

PROMPTS = ["a red circle", "two blue squares left of a cat"]


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def sd_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp(request.param), request.param)


def test_the_flow_grid_is_ddims_trailing_timesteps() -> None:
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched.config.timestep_spacing = "trailing"
    sched.set_timesteps(10)
    abar = scaled_linear_alphas_cumprod()
    torch.testing.assert_close(abar.float(), sched.alphas_cumprod)
    grid = trailing_flow_grid(10, dtype=torch.float64)
    assert grid[-1] == 0 and grid[0] == pytest.approx(0.936, abs=1e-3)
    # Each flow level maps back to its integer DDIM timestep.
    taus = fractional_timestep(grid[:-1], abar)
    torch.testing.assert_close(taus, sched.timesteps.double(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_the_euler_loop_equals_the_ddim_pipeline(sd_dir: Path, guidance: float) -> None:
    """Euler in flow coordinates is DDIM (eta = 0) step for step; diffusers' pipeline starts
    from ``latents`` at x_vp and (with ``set_alpha_to_one``) ends at x0_hat, as we do."""
    policy = load_sd(sd_dir)
    assert policy.sampling_grid(1.0, "uniform") == (1.0, "sd_trailing")
    noise = torch.randn((2, *policy.sample_shape), generator=torch.Generator().manual_seed(0))
    ours, theirs = _ours(policy, noise, guidance), _theirs(_ddim_pipeline(sd_dir), noise, guidance)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_lora_on_the_unets_attention_trains_through_the_elbo(sd_dir: Path) -> None:
    model = ModelConfig(kind="sd", path=str(sd_dir), lora=LoraConfig(rank=4))
    check_model_config(model, 32)
    with pytest.raises(ValueError, match="not a multiple of 2"):
        check_model_config(model, 33)
    policy = add_lora(model_from_config(model, 32), model.lora)
    assert isinstance(policy, SDPolicy) and policy.sample_shape == (4, 16, 16)
    lora = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    adapted = {n.rsplit(".lora_", 1)[0] for n in lora}
    assert any("attn1.to_q" in n for n in adapted) and any("attn2.to_k" in n for n in adapted)
    x0 = torch.randn(2, *policy.sample_shape)
    grid = trailing_flow_grid(10)
    draw = flow_noise_draw(x0, grid[[1, 6]], torch.randn_like(x0))
    elbo = flow_elbo(policy, x0, policy.encode_prompts(PROMPTS), draw, weighting="adaptive")
    elbo.elbo.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora.values())


def test_a_learner_side_policy_runs_on_shipped_conditionings(sd_dir: Path) -> None:
    full = load_sd(sd_dir)
    bare = load_sd(sd_dir, text_encoders=False)
    assert bare.frozen.pipe.text_encoder is None
    bare.add_conditions(full.conditions(PROMPTS))
    for key, value in full.encode_prompts(PROMPTS).items():
        assert torch.equal(bare.encode_prompts(PROMPTS)[key], value)


def test_a_schedule_the_flow_view_does_not_cover_is_refused(sd_dir: Path, tmp_path: Path) -> None:
    import shutil

    other = tmp_path / "linear"
    shutil.copytree(sd_dir, other)
    path = other / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "beta_schedule": "linear"}))
    with pytest.raises(ValueError, match=r"supports SD1\.x/SD2\.x's scaled_linear"):
        check_model_config(ModelConfig(kind="sd", path=str(other)), 32)
    (other / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"unet/\*\.safetensors"):
        check_model_config(ModelConfig(kind="sd", path=str(other)), 32)


# ---------------------------------------------------------------------- SDXL
@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sdxl(tmp_path_factory.mktemp("sdxl"))


def _ddim_pipeline(model_dir: Path) -> Any:
    """The directory's diffusers pipeline (SD1.x or SDXL) with DDIM on the trailing timesteps,
    ending at x0_hat: the sampler the flow view's Euler equals."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model_dir, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True,
        clip_sample=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours(policy: SDPolicy, noise: torch.Tensor, guidance: float) -> torch.Tensor:
    cond = policy.encode_prompts(PROMPTS)
    uncond = policy.encode_prompts([""] * 2) if guidance != 1.0 else None
    fn = guided_fn(policy, cond, uncond, guidance)
    with torch.no_grad():
        start = noise * policy.initial_noise_scale
        x0: torch.Tensor = sample(fn, start, sampler="euler", num_steps=4, grid="sd_trailing").x0
    return x0


def _theirs(pipe: Any, noise: torch.Tensor, guidance: float) -> torch.Tensor:
    out: torch.Tensor = pipe(
        PROMPTS,
        latents=noise.clone(),
        height=32,
        width=32,
        num_inference_steps=4,
        guidance_scale=guidance,
        output_type="latent",
    ).images
    return out


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_sdxl_in_the_flow_view_equals_diffusers_sdxl_pipeline(
    sdxl_dir: Path, guidance: float
) -> None:
    """Two text encoders, the pooled text and size ids as added conditioning, the zeroed
    empty prompt: Euler on the trailing grid is the SDXL pipeline's DDIM, step for step."""
    policy = load_sd(sdxl_dir)
    assert isinstance(policy, SDXLPolicy) and policy.sample_shape == (4, 16, 16)
    empty = policy.encode_prompts([""])
    assert not empty["prompt_embeds"].any() and not empty["pooled"].any()  # forced zeros
    assert policy.encode_prompts(PROMPTS)["pooled"].shape == (2, 32)
    noise = torch.randn((2, *policy.sample_shape), generator=torch.Generator().manual_seed(0))
    ours, theirs = (
        _ours(policy, noise, guidance),
        _theirs(_ddim_pipeline(sdxl_dir), noise, guidance),
    )
    # Latents reach ~70 here; float32 rounding over 4 steps of 3 networks stays below 1e-5 of it.
    assert (ours - theirs).abs().max().item() <= 1e-5 * theirs.abs().max().item()


def test_sdxl_lora_trains_through_the_elbo_and_its_export_loads_in_diffusers(
    sdxl_dir: Path, tmp_path: Path
) -> None:
    from policy.models import MODELS

    model = ModelConfig(kind="sd", path=str(sdxl_dir), lora=LoraConfig(rank=4))
    check_model_config(model, 32)
    policy = add_lora(model_from_config(model, 32), model.lora)
    lora = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    assert any("attn2.to_k" in n for n in lora)
    x0 = torch.randn(2, *policy.sample_shape)
    draw = flow_noise_draw(x0, trailing_flow_grid(10)[[1, 6]], torch.randn_like(x0))
    elbo = flow_elbo(policy, x0, policy.encode_prompts(PROMPTS), draw, weighting="adaptive")
    elbo.elbo.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora.values())

    with torch.no_grad():  # a trained-looking adapter: B away from its zero init
        for name, p in lora.items():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn_like(p))
    files = MODELS.get("sd").export(policy.eval(), tmp_path, False, {})
    assert files == ["pytorch_lora_weights.safetensors"]
    noise = torch.randn((2, *policy.sample_shape), generator=torch.Generator().manual_seed(1))
    pipe = _ddim_pipeline(sdxl_dir)
    base = _theirs(pipe, noise, 4.0)
    pipe.load_lora_weights(tmp_path)
    theirs, ours = _theirs(pipe, noise, 4.0), _ours(policy, noise, 4.0)
    assert (theirs - base).abs().max() > 1e-2  # the adapter changes the samples...
    assert (ours - theirs).abs().max().item() <= 1e-5 * theirs.abs().max().item()  # ...alike


def test_an_sdxl_learner_needs_no_text_encoders(sdxl_dir: Path) -> None:
    full = load_sd(sdxl_dir)
    bare = load_sd(sdxl_dir, text_encoders=False)
    assert bare.frozen.pipe.text_encoder is None and bare.frozen.pipe.text_encoder_2 is None
    bare.add_conditions(full.conditions(PROMPTS))
    x = torch.randn(2, *full.sample_shape)
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        torch.testing.assert_close(
            bare(x, t, bare.encode_prompts(PROMPTS)), full(x, t, full.encode_prompts(PROMPTS))
        )
    with pytest.raises(RuntimeError, match="no text encoders"):
        bare.encode_prompts(["an unseen prompt"])
