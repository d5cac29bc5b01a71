"""Stable Diffusion 1.x / 2.x and SDXL (VP UNets, epsilon or v-prediction) in the flow view.

Component layer (no Ray), on ``policy.latent.LatentPolicy``: the ``UNet2DConditionModel`` is
the only ``nn.Module`` child (``unet``); the CLIP text encoder, its tokenizer and the VAE sit
in the shared frozen holder. The policy speaks flow coordinates, so the samplers, the ELBO and
the learner are the ones every other family uses (``algo/vp.py`` has the change of variables):
``forward(y, s)`` maps ``s`` to the UNet's fractional timestep with the same log-SNR, feeds it
``x_vp = y (alpha + sigma)``, and returns the velocity ``eps_hat - x0_hat``. Sampling runs on
the scheduler's trailing DDIM timesteps (grid ``sd_trailing``, from ``s(T - 1)``), where Euler
is DDIM with eta = 0. SDXL (``SDXLPolicy``) adds its second text encoder (the two penultimate
hidden states side by side, the second's pooled projection) and the ``text_time`` added
conditioning (pooled text and the size/crop ids ``(H, W, 0, 0, H, W)``, as diffusers' pipeline
sends them at the generated size); its empty prompt is all zeros where the pipeline's
``force_zeros_for_empty_prompt`` says so. The ``sd`` kind loads either, by the directory's
``model_index.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from algo.vp import SD_BETAS, alpha_sigma, fractional_timestep, initial_scale
from policy.base import PredictionType
from policy.latent import (
    Frozen,
    LatentPolicy,
    check_directory,
    latent_kind,
    load_pipeline,
    take_denoiser,
)
from policy.models import MODELS

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""The attention projections of every UNet transformer block (self- and cross-attention):
TRL's DDPO defaults for SD1.5, and what flow_grpo's SD1.5 configs inherit."""

PIPELINE = "StableDiffusionPipeline"
XL_PIPELINE = "StableDiffusionXLPipeline"
REQUIRED_PARTS = ("unet", "vae", "scheduler")
TEXT_PARTS = {
    PIPELINE: ("text_encoder", "tokenizer"),
    XL_PIPELINE: ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
}
PREDICTIONS = ("epsilon", "v_prediction")


class SDPolicy(LatentPolicy):
    """SD1.x/SD2.x in flow coordinates (``prediction_type = "flow"``), classifier-free guided."""

    prediction_type: ClassVar[PredictionType] = "flow"
    kind: ClassVar[str] = "sd"
    denoiser_name: ClassVar[str] = "unet"
    pipeline: ClassVar[str] = PIPELINE

    def __init__(self, unet: torch.nn.Module, frozen: Frozen, *args: Any, **kw: Any):
        super().__init__(unet, frozen, *args, **kw)
        scheduler = frozen.pipe.scheduler
        self.vp_prediction: str = scheduler.config.prediction_type
        self.alphas_cumprod: Tensor
        self.register_buffer(
            "alphas_cumprod", scheduler.alphas_cumprod.double().clone(), persistent=False
        )

    @property
    def initial_noise_scale(self) -> float:
        return initial_scale(self.alphas_cumprod)

    def _encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """``prompt_embeds`` (B, 77, D) from CLIP's last hidden state; no pooled output (an
        empty (B, 0) stands in, so every family caches the same pair)."""
        pipe = self.frozen.pipe
        embeds, _ = pipe.encode_prompt(
            prompts,
            device=pipe.text_encoder.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        return embeds, embeds.new_zeros(embeds.shape[0], 0)

    def forward(self, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """Velocity (B, C, h, w) for flow-coordinate latents ``x_t`` at flow levels ``t`` (B,)
        (float32 in and out; the UNet runs in ``model.dtype``)."""
        tau = fractional_timestep(t, self.alphas_cumprod)
        alpha, sigma = (v.float().view(-1, 1, 1, 1) for v in alpha_sigma(t))
        x_vp = x_t.float() * (alpha + sigma)
        out = self._unet(x_vp, tau, cond).float()
        if self.vp_prediction == "v_prediction":
            eps, x0 = sigma * x_vp + alpha * out, alpha * x_vp - sigma * out
        else:
            eps, x0 = out, (x_vp - sigma * out) / alpha
        return eps - x0

    def _unet(self, x_vp: Tensor, tau: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """The UNet's raw output (epsilon or v) at VP latents ``x_vp`` and timesteps ``tau``."""
        dtype = self.dtype
        out: Tensor = self.denoiser(
            x_vp.to(dtype),
            tau.to(dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            return_dict=False,
            **self._added_conditions(x_vp, cond),
        )[0]
        return out

    def _added_conditions(self, x_vp: Tensor, cond: dict[str, Tensor]) -> dict[str, Any]:
        """Extra UNet inputs of the family (none for SD1.x/SD2.x)."""
        return {}

    def sampling_grid(self, shift: float, grid: str) -> tuple[float, str]:
        """Always the scheduler's trailing DDIM timesteps: the only grid that starts within
        the table (``s <= s(T - 1)``); ``shift`` does not apply."""
        return 1.0, "sd_trailing"


class SDXLPolicy(SDPolicy):
    """SDXL in flow coordinates: ``SDPolicy`` with two text encoders and the ``text_time``
    added conditioning."""

    pipeline: ClassVar[str] = XL_PIPELINE

    def _encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """``prompt_embeds`` (B, 77, D1 + D2) and the second encoder's pooled projection
        (B, P); zeros for the empty prompt when the pipeline forces them (SDXL base does:
        its unconditional branch is all zeros, not the encoded empty string)."""
        pipe = self.frozen.pipe
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts,
            device=pipe.text_encoder_2.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        if pipe.config.force_zeros_for_empty_prompt:
            empty = torch.tensor([p == "" for p in prompts], device=embeds.device)
            embeds = torch.where(empty.view(-1, 1, 1), 0.0, embeds)
            pooled = torch.where(empty.view(-1, 1), 0.0, pooled)
        return embeds, pooled

    def _added_conditions(self, x_vp: Tensor, cond: dict[str, Tensor]) -> dict[str, Any]:
        """``text_time``: the pooled text and the (original size, crop top-left, target size)
        ids, here the generated size, uncropped."""
        dtype, side = self.dtype, float(self.image_size)
        ids = torch.tensor([side, side, 0.0, 0.0, side, side], device=x_vp.device, dtype=dtype)
        added = {"text_embeds": cond["pooled"].to(dtype), "time_ids": ids.expand(len(x_vp), 6)}
        return {"added_cond_kwargs": added}


def check_sd_directory(path: str | Path, text_encoders: bool = True) -> Path:
    """``path`` as a diffusers SD1.x/SD2.x or SDXL directory with the schedule the flow view
    supports (scaled-linear betas 0.00085-0.012 over 1000 steps; epsilon or v-prediction), or
    a ``ValueError`` naming what is missing or unsupported."""
    from policy.latent import read_json

    pipeline = _pipeline_of(path)
    parts = [*REQUIRED_PARTS, *(TEXT_PARTS[pipeline] if text_encoders else ())]
    root = check_directory(path, pipeline, parts, weighted=("unet", "vae"))
    sched = read_json(root / "scheduler" / "scheduler_config.json")
    got = (sched.get("beta_start"), sched.get("beta_end"), sched.get("num_train_timesteps"))
    if sched.get("beta_schedule") != "scaled_linear" or got != SD_BETAS:
        raise ValueError(
            f"model.path = {str(path)!r}: the scheduler has {sched.get('beta_schedule')} betas "
            f"{got}; the `sd` kind supports SD1.x/SD2.x's scaled_linear {SD_BETAS} only"
        )
    if sched.get("prediction_type", "epsilon") not in PREDICTIONS:
        raise ValueError(
            f"model.path = {str(path)!r}: scheduler prediction_type "
            f"{sched.get('prediction_type')!r}; supported: {', '.join(PREDICTIONS)}"
        )
    return root


def _pipeline_of(path: str | Path) -> str:
    """The directory's pipeline class when it is one the ``sd`` kind loads, else SD1.x's (so
    that ``check_directory`` names what is missing or wrong)."""
    from policy.latent import read_json

    index = Path(path) / "model_index.json"
    name = read_json(index).get("_class_name") if index.is_file() else None
    return name if name in TEXT_PARTS else PIPELINE


def load_sd(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    image_size: int | None = None,
    max_sequence_length: int = 77,
    text_encoders: bool = True,
) -> SDPolicy:
    """Load an SD1.x/SD2.x or SDXL pipeline from a local directory (never a hub) as an
    ``SDPolicy`` or ``SDXLPolicy``; ``text_encoders=False`` leaves CLIP out (a learner rank).
    The VAE stays in float32."""
    import diffusers

    root = check_sd_directory(path)
    pipeline = _pipeline_of(root)
    extra: dict[str, Any] = {"feature_extractor": None}
    if pipeline == PIPELINE:
        extra["safety_checker"] = None
    if (root / "image_encoder").exists():
        extra["image_encoder"] = None
    if not text_encoders:
        extra.update(dict.fromkeys(TEXT_PARTS[pipeline]))
    pipe = load_pipeline(getattr(diffusers, pipeline), root, dtype, **extra)
    unet, size = take_denoiser(pipe, "unet", image_size)
    policy_class = SDXLPolicy if pipeline == XL_PIPELINE else SDPolicy
    return policy_class(unet, Frozen(pipe), size, max_sequence_length)


MODELS.add("sd", latent_kind(load_sd, check_sd_directory, LORA_TARGETS, PIPELINE))
