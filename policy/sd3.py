"""SD3 and SD3.5 (rectified-flow MMDiT) from a local diffusers directory, as a ``Policy``.

Component layer (no Ray). The denoiser (``SD3Transformer2DModel``) is the only ``nn.Module``
child, so the learner's optimizer, its deep copies (old and reference policies) and the weight
broadcast see it alone. The text encoders, tokenizers and the VAE sit in a frozen holder that
deep copies share (``Frozen.__deepcopy__`` returns itself): a copy of the policy costs one
transformer, never another T5-XXL (``../shared/REAL_MODELS.md`` section 1.1).

Samples live in latent space, unpacked: ``sample_shape = (C, H / f, W / f)`` with ``f`` the
VAE's downscaling factor. ``forward`` is the velocity the pipeline integrates, with ``t`` the
flow sigma in [0, 1] (the transformer takes ``1000 t``); ``to_images`` decodes with the VAE's
own ``scaling_factor`` and ``shift_factor``. Prompt conditionings are cached per prompt.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from policy.base import Policy, PredictionType, images_to_unit, unit_to_images
from policy.models import MODELS, ModelKind

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

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

REQUIRED_PARTS = ("model_index.json", "transformer", "vae", "scheduler")
TEXT_PARTS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
T5_PARTS = ("text_encoder_3", "tokenizer_3")


class Frozen:
    """What the policy uses but never trains: text encoders, tokenizers, VAE, scheduler config.

    Deep copies of the policy share it (``__deepcopy__`` returns ``self``).
    """

    def __init__(self, pipe: Any):
        self.pipe = pipe
        for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
            if module is not None:
                module.requires_grad_(False).eval()

    @property
    def has_text_encoders(self) -> bool:
        return self.pipe.text_encoder is not None

    def __deepcopy__(self, memo: dict[int, Any]) -> Frozen:
        return self

    @property
    def vae(self) -> Any:
        return self.pipe.vae


class SD3Policy(Policy):
    """Velocity-predicting SD3/SD3.5 in latent space (``prediction_type = "flow"``)."""

    prediction_type: ClassVar[PredictionType] = "flow"
    kind: ClassVar[str] = "sd3"

    def __init__(
        self,
        transformer: torch.nn.Module,
        frozen: Frozen,
        image_size: int,
        max_sequence_length: int = 128,
        cache_size: int = 1024,
    ):
        super().__init__()
        self.transformer = transformer
        self.frozen = frozen
        vae_cfg = frozen.vae.config
        self.vae_factor = 2 ** (len(vae_cfg.block_out_channels) - 1)
        config: Any = transformer.config
        patch = int(config.patch_size)
        if image_size % (self.vae_factor * patch):
            raise ValueError(
                f"image size {image_size} must be a multiple of the VAE factor x patch size "
                f"({self.vae_factor} x {patch})"
            )
        self.image_size = image_size
        self.latent_channels = int(config.in_channels)
        self.scaling = float(vae_cfg.scaling_factor)
        self.shift = float(getattr(vae_cfg, "shift_factor", None) or 0.0)
        self.max_sequence_length = max_sequence_length
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()

    @property
    def sample_shape(self) -> tuple[int, ...]:
        side = self.image_size // self.vae_factor
        return (self.latent_channels, side, side)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    # ------------------------------------------------------------------ conditioning

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """``{"prompt_embeds": (B, 77 + msl, D), "pooled": (B, P)}``, cached per prompt."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            self._encode_into_cache(missing)
        for p in prompts:
            self._cache.move_to_end(p)
        embeds = torch.stack([self._cache[p][0] for p in prompts]).to(self.device)
        pooled = torch.stack([self._cache[p][1] for p in prompts]).to(self.device)
        self._evict()
        return {"prompt_embeds": embeds, "pooled": pooled}

    def conditions(self, prompts: Sequence[str]) -> dict[str, Any]:
        """``{prompt: (prompt_embeds, pooled)}`` of the unique ``prompts`` and the empty
        prompt (for guidance), in the transformer's dtype on the CPU (SD3.5-M at
        max_sequence_length 128: 2.7 MB per prompt in bf16)."""
        self.encode_prompts(list(dict.fromkeys([*prompts, ""])))  # fills the cache
        return {p: self._cache[p] for p in dict.fromkeys([*prompts, ""])}

    def add_conditions(self, conditions: dict[str, Any]) -> None:
        for prompt, (embeds, pooled) in conditions.items():
            self._cache[prompt] = (embeds, pooled)
            self._cache.move_to_end(prompt)
        self._evict()

    @torch.no_grad()
    def _encode_into_cache(self, prompts: list[str]) -> None:
        if not self.frozen.has_text_encoders:
            raise RuntimeError(
                f"no conditioning for {len(prompts)} prompt(s) (e.g. {prompts[0]!r}) and no text "
                "encoders loaded: a learner gets its prompts' conditionings with the samples "
                "(RolloutSamples.conditions)"
            )
        embeds, _, pooled, _ = self.frozen.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.frozen.pipe.text_encoder.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        dtype = next(self.transformer.parameters()).dtype
        for i, p in enumerate(prompts):
            self._cache[p] = (embeds[i].to("cpu", dtype), pooled[i].to("cpu", dtype))

    def _evict(self) -> None:
        while len(self._cache) > self.cache_size:
            oldest = next(iter(self._cache))
            if oldest == "":  # the unconditional prompt stays
                self._cache.move_to_end(oldest)
                if len(self._cache) == 1:
                    return
                continue
            del self._cache[oldest]

    def cached_prompts(self) -> list[str]:
        return list(self._cache)

    # ------------------------------------------------------------------ the denoiser

    def forward(self, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """Velocity (B, C, h, w) for latents ``x_t`` (B, C, h, w) at sigmas ``t`` (B,).

        The transformer runs in its own dtype (``model.dtype``); what goes in and out is
        float32, so samplers and the ELBO compute in float32 whatever the model's precision.
        """
        dtype = next(self.transformer.parameters()).dtype
        out = self.transformer(
            hidden_states=x_t.to(dtype),
            timestep=(t * 1000.0).to(dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            pooled_projections=cond["pooled"].to(dtype),
            return_dict=False,
        )[0]
        return out.float()

    # ------------------------------------------------------------------ pixels <-> latents

    @torch.no_grad()
    def to_images(self, x0: Tensor) -> np.ndarray:
        vae = self.frozen.vae
        z = x0.to(vae.device, vae.dtype) / self.scaling + self.shift
        return unit_to_images(vae.decode(z, return_dict=False)[0])

    @torch.no_grad()
    def from_images(self, images: np.ndarray) -> Tensor:
        """The VAE posterior's mean, in the transformer's latent coordinates."""
        vae = self.frozen.vae
        x = images_to_unit(images).to(vae.device, vae.dtype)
        z = vae.encode(x).latent_dist.mean
        return ((z - self.shift) * self.scaling).to(self.device)


def check_sd3_directory(path: str | Path, text_encoders: bool = True) -> Path:
    """``path`` as a diffusers SD3 directory, or a ``ValueError`` naming every missing part."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"model.path = {str(path)!r} is not a directory")
    needed = list(REQUIRED_PARTS)
    if text_encoders:
        needed += [p for pair in TEXT_PARTS for p in pair]
    missing = [p for p in needed if not (root / p).exists()]
    for part in ("transformer", "vae"):
        if (root / part).is_dir() and not any((root / part).glob("*.safetensors")):
            missing.append(f"{part}/*.safetensors (the weights)")
        if (root / part).is_dir() and not (root / part / "config.json").is_file():
            missing.append(f"{part}/config.json")
    if missing:
        raise ValueError(
            f"model.path = {str(path)!r} is not a complete diffusers SD3 directory: missing "
            f"{', '.join(missing)} (save one with StableDiffusion3Pipeline.save_pretrained)"
        )
    index = _read_json(root / "model_index.json")
    if index.get("_class_name") != "StableDiffusion3Pipeline":
        raise ValueError(
            f"model.path = {str(path)!r} holds a {index.get('_class_name')!r}, not a "
            "StableDiffusion3Pipeline: model.kind sd3 is for SD3 and SD3.5"
        )
    return root


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    return data


def _check_config(model: Any, image_size: int) -> None:
    """``model.path`` is a complete SD3 directory whose VAE and patch size fit ``image_size``."""
    root = check_sd3_directory(model.path)
    vae = _read_json(root / "vae" / "config.json")
    transformer = _read_json(root / "transformer" / "config.json")
    unit = 2 ** (len(vae.get("block_out_channels", [0])) - 1) * int(
        transformer.get("patch_size", 1)
    )
    if image_size % unit:
        raise ValueError(
            f"world.image_size = {image_size} is not a multiple of {unit} (the VAE's downscaling "
            f"x the transformer's patch size of model.path {model.path!r}); use e.g. "
            f"{max(unit, image_size // unit * unit)}"
        )


def _from_config(model: Any, image_size: int, text_encoders: bool = True) -> SD3Policy:
    policy = load_sd3(
        model.path,
        dtype=DTYPES[model.dtype],
        image_size=image_size,
        max_sequence_length=model.max_sequence_length,
        text_encoders=text_encoders,
    )
    if model.gradient_checkpointing:
        transformer: Any = policy.transformer
        transformer.enable_gradient_checkpointing()
    return policy


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
    import diffusers
    import transformers
    from diffusers import StableDiffusion3Pipeline

    root = check_sd3_directory(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for library in (diffusers, transformers):  # no loading bars in every actor's log
        library.utils.logging.disable_progress_bar()
    extra: dict[str, Any] = {}
    if not t5 or not text_encoders or not all((root / p).exists() for p in T5_PARTS):
        extra = {"text_encoder_3": None, "tokenizer_3": None}
    if not text_encoders:
        for part in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
            extra[part] = None
    pipe = StableDiffusion3Pipeline.from_pretrained(
        root, local_files_only=True, dtype=dtype, **extra
    )
    pipe.vae.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer
    pipe.transformer = None  # the policy owns it; the holder keeps the rest
    if image_size is None:
        factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        image_size = int(transformer.config.sample_size) * factor
    return SD3Policy(transformer, Frozen(pipe), image_size, max_sequence_length)


def _export(policy: Policy, directory: Path, merged: bool, provenance: dict[str, Any]) -> list[str]:
    """The trained transformer where diffusers loads it: the LoRA adapter in diffusers' LoRA
    format (``pipe.load_lora_weights(directory)``), or with ``merged`` (or for a fully
    fine-tuned model) the whole transformer (``transformer/``, ``save_pretrained``)."""
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    from policy.lora import has_lora, merge_lora

    assert isinstance(policy, SD3Policy)
    transformer: Any = policy.transformer
    if has_lora(policy) and not merged:
        StableDiffusion3Pipeline.save_lora_weights(
            directory,
            transformer_lora_layers=get_peft_model_state_dict(transformer),
            transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
        )
        return ["pytorch_lora_weights.safetensors"]
    if has_lora(policy):
        merge_lora(policy)
    transformer.save_pretrained(directory / "transformer")
    return ["transformer/"]


MODELS.add(
    "sd3",
    ModelKind(
        arch_config=None,
        build=None,
        load=None,
        lora_targets=LORA_TARGETS,
        from_path=_from_config,
        check_path=_check_config,
        export=_export,
    ),
)
