"""FLUX.1-dev and FLUX.1-schnell from a local diffusers directory, as a ``Policy``.

Component layer (no Ray), on ``policy.latent.LatentPolicy`` (``../shared/REAL_MODELS.md``
section 1.3). Samples are the VAE's latents unpacked, ``(C, H / f, W / f)``; ``forward`` packs
them 2x2 into the transformer's tokens (``FluxPipeline._pack_latents``), with the image ids of
the packed grid and zero text ids, and unpacks its velocity. The transformer takes the sigma
itself (it multiplies by 1000 inside). Conditioning: T5 embeddings (B, msl, 4096) and the CLIP-L
pooled output (B, 768).

Guidance: FLUX.1-dev is guidance-distilled, the scale is an input of one pass
(``guidance_mode = "embedded"``, the ELBO is divided by 1); FLUX.1-schnell has none. The
pipeline's grid is the uniform one shifted by ``exp(mu)``, ``mu`` growing with the number of
image tokens (dynamic shift): ``rollout.sampling.grid: diffusers`` samples on it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from policy.base import PredictionType
from policy.latent import Frozen, LatentPolicy, check_directory, latent_kind, load_pipeline
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
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)
"""flow_grpo's, the paper's and Flow-Factory's FLUX targets (r = 64, alpha = 128): SD3's eight
plus both streams' feed-forward layers; the single-stream blocks' attention projections match
too, their ``proj_mlp``/``proj_out`` do not."""

PIPELINE = "FluxPipeline"
PARTS = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")
T5_PARTS = ("text_encoder_2", "tokenizer_2")


class FluxPolicy(LatentPolicy):
    """Velocity-predicting FLUX.1 in (unpacked) latent space."""

    prediction_type: ClassVar[PredictionType] = "flow"
    kind: ClassVar[str] = "flux"

    packing: ClassVar[int] = 2

    def __init__(self, transformer: torch.nn.Module, frozen: Frozen, *args: Any, **kw: Any):
        super().__init__(transformer, frozen, *args, **kw)
        config: Any = transformer.config
        self.guidance_mode = "embedded" if config.guidance_embeds else "none"

    def _encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """``prompt_embeds`` (B, msl, D) from T5 and ``pooled`` (B, P) from CLIP-L."""
        embeds, pooled, _ = self.frozen.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=self.frozen.pipe.text_encoder.device,
            max_sequence_length=self.max_sequence_length,
        )
        return embeds, pooled

    def with_guidance(self, cond: dict[str, Tensor], scale: float) -> dict[str, Tensor]:
        b = cond["pooled"].shape[0]
        return {**cond, "guidance": torch.full((b,), float(scale), device=self.device)}

    def forward(self, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """Velocity (B, C, h, w) for latents ``x_t`` (B, C, h, w) at sigmas ``t`` (B,), in
        float32 whatever the transformer's dtype."""
        b, c, h, w = x_t.shape
        dtype = self.dtype
        packed = x_t.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        packed = packed.reshape(b, (h // 2) * (w // 2), c * 4)
        guidance = cond.get("guidance") if self.guidance_mode == "embedded" else None
        out = self.denoiser(
            hidden_states=packed.to(dtype),
            timestep=t.to(dtype),
            guidance=None if guidance is None else guidance.to(torch.float32),
            pooled_projections=cond["pooled"].to(dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            txt_ids=torch.zeros(cond["prompt_embeds"].shape[1], 3, device=x_t.device, dtype=dtype),
            img_ids=_image_ids(h // 2, w // 2, x_t.device, dtype),
            return_dict=False,
        )[0]
        out = out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, c, h, w).float()

    def sampling_grid(self, shift: float, grid: str) -> tuple[float, str]:
        """On the ``diffusers`` grid, the pipeline's: uniform, shifted by ``exp(mu)`` with
        ``mu`` from the number of image tokens (its scheduler's dynamic shift)."""
        if grid != "diffusers":
            return shift, grid
        sched = self.frozen.pipe.scheduler.config
        if not sched.get("use_dynamic_shifting", False):
            return float(sched.get("shift", shift)), grid
        _, h, w = self.sample_shape
        tokens = (h // 2) * (w // 2)
        lo, hi = sched.get("base_image_seq_len", 256), sched.get("max_image_seq_len", 4096)
        base, top = sched.get("base_shift", 0.5), sched.get("max_shift", 1.15)
        mu = base + (top - base) * (tokens - lo) / (hi - lo)
        return math.exp(mu), "uniform"


def _image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(h w, 3)`` ids ``(0, i, j)`` of the packed grid (``_prepare_latent_image_ids``)."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


def check_flux_directory(path: str | Path, text_encoders: bool = True) -> Path:
    """``path`` as a diffusers FLUX.1 directory, or a ``ValueError`` naming what is missing."""
    parts = [*PARTS, *(T5_PARTS if text_encoders else ())]
    return check_directory(path, PIPELINE, parts, weighted=("transformer", "vae"))


def load_flux(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    image_size: int | None = None,
    max_sequence_length: int = 128,
    text_encoders: bool = True,
) -> FluxPolicy:
    """Load a FLUX.1 pipeline from a local directory (never a hub) as a ``FluxPolicy``; the
    VAE stays float32. ``text_encoders=False`` loads neither encoder (a learner rank)."""
    from diffusers import FluxPipeline

    root = check_flux_directory(path)
    extra = {} if text_encoders else dict.fromkeys((*PARTS[3:], *T5_PARTS))
    pipe = load_pipeline(FluxPipeline, root, dtype, **extra)
    transformer = pipe.transformer
    pipe.transformer = None  # the policy owns it; the holder keeps the rest
    if image_size is None:
        image_size = 2 ** (len(pipe.vae.config.block_out_channels) - 1) * 64
    return FluxPolicy(transformer, Frozen(pipe), image_size, max_sequence_length)


MODELS.add("flux", latent_kind(load_flux, check_flux_directory, LORA_TARGETS, PIPELINE, 2))
