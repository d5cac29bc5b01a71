"""SD3 and SD3.5 (rectified-flow MMDiT) from a local diffusers directory, as a ``Policy``.

Component layer (no Ray), on ``policy.latent.LatentPolicy``: the denoiser
(``SD3Transformer2DModel``) is the only ``nn.Module`` child; the three text encoders, their
tokenizers and the VAE sit in the shared frozen holder, so a copy of the policy costs one
transformer, never another T5-XXL (``../shared/REAL_MODELS.md`` section 1.1).

Samples live in latent space, unpacked: ``sample_shape = (C, H / f, W / f)`` with ``f`` the
VAE's downscaling factor. ``forward`` is the velocity the pipeline integrates, with ``t`` the
flow sigma in [0, 1] (the transformer takes ``1000 t``). Guidance is classifier-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

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

LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
"""The LoRA targets of the paper, flow_grpo and DiffusionNFT for SD3/SD3.5 (r = 32, alpha = 64):
both streams of the joint attention. They do not match SD3.5's second self-attention
(``attn2``), as in the anchors."""

PIPELINE = "StableDiffusion3Pipeline"
REQUIRED_PARTS = ("transformer", "vae", "scheduler")
TEXT_PARTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
T5_PARTS = ("text_encoder_3", "tokenizer_3")


class SD3Policy(LatentPolicy):
    """Velocity-predicting SD3/SD3.5 in latent space (``prediction_type = "flow"``)."""

    prediction_type: ClassVar[PredictionType] = "flow"
    kind: ClassVar[str] = "sd3"

    def _encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """``prompt_embeds`` (B, 77 + msl, D) (CLIP-L | bigG | T5) and ``pooled`` (B, P)."""
        embeds, _, pooled, _ = self.frozen.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.frozen.pipe.text_encoder.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return embeds, pooled

    def forward(self, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """Velocity (B, C, h, w) for latents ``x_t`` (B, C, h, w) at sigmas ``t`` (B,).

        The transformer runs in its own dtype (``model.dtype``); what goes in and out is
        float32, so samplers and the ELBO compute in float32 whatever the model's precision.
        """
        dtype = self.dtype
        out = self.denoiser(
            hidden_states=x_t.to(dtype),
            timestep=(t * 1000.0).to(dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            pooled_projections=cond["pooled"].to(dtype),
            return_dict=False,
        )[0]
        return out.float()

    def sampling_grid(self, shift: float, grid: str) -> tuple[float, str]:
        """On the ``diffusers`` grid, the scheduler's own shift (3 for SD3/SD3.5)."""
        if grid == "diffusers":
            return float(self.frozen.pipe.scheduler.config.get("shift", shift)), grid
        return shift, grid


def check_sd3_directory(path: str | Path, text_encoders: bool = True) -> Path:
    """``path`` as a diffusers SD3 directory, or a ``ValueError`` naming every missing part."""
    parts = [*REQUIRED_PARTS, *(TEXT_PARTS if text_encoders else ())]
    return check_directory(path, PIPELINE, parts, weighted=("transformer", "vae"))


def load_sd3(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    image_size: int | None = None,
    max_sequence_length: int = 128,
    t5: bool = True,
    text_encoders: bool = True,
) -> SD3Policy:
    """Load an SD3/SD3.5 pipeline from a local directory (never a hub) as an ``SD3Policy``.

    ``t5=False`` leaves T5-XXL out (its block of the conditioning is zeros, as diffusers does
    without it; saves ~9.5 GB at some quality cost). ``text_encoders=False`` loads none of
    them (a learner rank: conditionings come with the samples). The VAE stays in float32.
    """
    from diffusers import StableDiffusion3Pipeline

    root = check_sd3_directory(path)
    extra: dict[str, Any] = {}
    if not t5 or not text_encoders or not all((root / p).exists() for p in T5_PARTS):
        extra = dict.fromkeys(T5_PARTS)
    if not text_encoders:
        extra.update(dict.fromkeys(TEXT_PARTS))
    pipe = load_pipeline(StableDiffusion3Pipeline, root, dtype, **extra)
    transformer, size = take_denoiser(pipe, "transformer", image_size)
    return SD3Policy(transformer, Frozen(pipe), size, max_sequence_length)


MODELS.add("sd3", latent_kind(load_sd3, check_sd3_directory, LORA_TARGETS, PIPELINE))
