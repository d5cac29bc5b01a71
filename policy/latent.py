"""What every real-model kind shares: a diffusers denoiser in a VAE's latent space.

Component layer (no Ray). The denoiser is the policy's only ``nn.Module`` child, so the
learner's optimizer, its copies and the weight broadcast see it alone; the text encoders,
tokenizers and the VAE sit in a frozen holder that deep copies share (``Frozen``). Prompt
conditionings are cached per prompt (and can travel with the samples, so a learner needs no
text encoders); latents decode with the VAE's own ``scaling_factor`` and ``shift_factor``.
``policy/sd3.py`` and ``policy/flux.py`` are the families built on it.
"""

from __future__ import annotations

import json
import os
from abc import abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from policy.base import Policy, images_to_unit, unit_to_images

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


class Frozen:
    """What the policy uses but never trains: text encoders, tokenizers, VAE, scheduler config.

    Deep copies of the policy share it (``__deepcopy__`` returns ``self``).
    """

    def __init__(self, pipe: Any):
        self.pipe = pipe
        for name in ("vae", *TEXT_ENCODERS):
            module = getattr(pipe, name, None)
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


class LatentPolicy(Policy):
    """A diffusers denoiser over VAE latents ``(C, H / f, W / f)``, held as the attribute
    ``denoiser_name`` (``transformer``; SD1.5's ``unet``); it sees ``packing`` x ``packing``
    latent pixels per input position (FLUX: 2)."""

    packing: ClassVar[int] = 1
    denoiser_name: ClassVar[str] = "transformer"

    def __init__(
        self,
        denoiser: torch.nn.Module,
        frozen: Frozen,
        image_size: int,
        max_sequence_length: int = 128,
        cache_size: int = 1024,
    ):
        super().__init__()
        setattr(self, self.denoiser_name, denoiser)  # the one nn.Module child
        self.frozen = frozen
        vae_cfg = frozen.vae.config
        config: Any = denoiser.config
        self.vae_factor = 2 ** (len(vae_cfg.block_out_channels) - 1)
        unit = self.vae_factor * int(getattr(config, "patch_size", None) or 1) * self.packing
        if image_size % unit:
            raise ValueError(f"image size {image_size} must be a multiple of {unit}")
        self.image_size = image_size
        self.latent_channels = int(config.in_channels) // self.packing**2
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
    def denoiser(self) -> Any:
        """The trained network (``transformer`` or ``unet``)."""
        return getattr(self, self.denoiser_name)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def place(self, device: torch.device, text_encoders: str = "same") -> LatentPolicy:
        """The denoiser and the VAE to ``device``; the text encoders too, or to the CPU with
        ``text_encoders="cpu"`` (they run once per new prompt, the cache keeps the rest)."""
        self.to(device)
        pipe = self.frozen.pipe
        pipe.vae.to(device)
        encoder_device = torch.device("cpu") if text_encoders == "cpu" else device
        for name in TEXT_ENCODERS:
            module = getattr(pipe, name, None)
            if module is not None:
                module.to(encoder_device)
        return self

    # ------------------------------------------------------------------ conditioning

    @abstractmethod
    def _encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """``(prompt_embeds (B, L, D), pooled (B, P))`` from the pipeline's text encoders."""

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """``{"prompt_embeds": (B, L, D), "pooled": (B, P)}``, cached per prompt."""
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
        prompt (for guidance), in the denoiser's dtype on the CPU (SD3.5-M at
        max_sequence_length 128: 2.7 MB per prompt in bf16)."""
        unique = list(dict.fromkeys([*prompts, ""]))
        self.encode_prompts(unique)  # fills the cache
        return {p: self._cache[p] for p in unique}

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
        embeds, pooled = self._encode_text(prompts)
        for i, p in enumerate(prompts):
            self._cache[p] = (embeds[i].to("cpu", self.dtype), pooled[i].to("cpu", self.dtype))

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

    # ------------------------------------------------------------------ pixels <-> latents

    @torch.no_grad()
    def to_images(self, x0: Tensor) -> np.ndarray:
        vae = self.frozen.vae
        z = x0.to(vae.device, vae.dtype) / self.scaling + self.shift
        return unit_to_images(vae.decode(z, return_dict=False)[0])

    @torch.no_grad()
    def from_images(self, images: np.ndarray) -> Tensor:
        """The VAE posterior's mean, in the denoiser's latent coordinates."""
        vae = self.frozen.vae
        x = images_to_unit(images).to(vae.device, vae.dtype)
        z = vae.encode(x).latent_dist.mean
        return ((z - self.shift) * self.scaling).to(self.device)


def check_directory(
    path: str | Path, pipeline: str, parts: Sequence[str], weighted: Sequence[str]
) -> Path:
    """``path`` as a diffusers directory of ``pipeline`` with every one of ``parts``, the
    ``weighted`` ones holding weights and a config; a ``ValueError`` names what is missing."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"model.path = {str(path)!r} is not a directory")
    missing = [p for p in ["model_index.json", *parts] if not (root / p).exists()]
    for part in weighted:
        if (root / part).is_dir() and not any((root / part).glob("*.safetensors")):
            missing.append(f"{part}/*.safetensors (the weights)")
        if (root / part).is_dir() and not (root / part / "config.json").is_file():
            missing.append(f"{part}/config.json")
    if missing:
        raise ValueError(
            f"model.path = {str(path)!r} is not a complete diffusers {pipeline} directory: "
            f"missing {', '.join(missing)} (save one with {pipeline}.save_pretrained)"
        )
    index = read_json(root / "model_index.json")
    if index.get("_class_name") != pipeline:
        raise ValueError(
            f"model.path = {str(path)!r} holds a {index.get('_class_name')!r}, not a {pipeline}"
        )
    return root


def read_json(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    return data


def check_image_size(root: Path, image_size: int, packing: int = 1) -> None:
    """``world.image_size`` fits the VAE's downscaling x the patch size (x ``packing``)."""
    vae = read_json(root / "vae" / "config.json")
    denoiser = "unet" if (root / "unet").is_dir() else "transformer"
    net = read_json(root / denoiser / "config.json")
    factor = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    unit = factor * int(net.get("patch_size") or 1) * packing
    if image_size % unit:
        raise ValueError(
            f"world.image_size = {image_size} is not a multiple of {unit} (the VAE's downscaling "
            f"x the {denoiser}'s patch size of model.path {str(root)!r}); use e.g. "
            f"{max(unit, image_size // unit * unit)}"
        )


def load_pipeline(pipeline_class: Any, root: Path, dtype: torch.dtype, **parts: Any) -> Any:
    """``pipeline_class.from_pretrained(root)`` offline, quietly, with the VAE in float32 and
    the denoiser taken out (the policy owns it); ``parts`` override components (None = skip)."""
    import diffusers
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for library in (diffusers, transformers):  # no loading bars in every actor's log
        library.utils.logging.disable_progress_bar()
    pipe = pipeline_class.from_pretrained(root, local_files_only=True, dtype=dtype, **parts)
    pipe.vae.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def take_denoiser(pipe: Any, name: str, image_size: int | None) -> tuple[Any, int]:
    """Take the denoiser ``name`` out of ``pipe`` (the policy owns it; the frozen holder keeps
    the rest); with the image size, by default the denoiser's ``sample_size`` x the VAE's
    downscaling."""
    denoiser = getattr(pipe, name)
    setattr(pipe, name, None)
    if image_size is None:
        factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        image_size = int(denoiser.config.sample_size) * factor
    return denoiser, image_size


def export_transformer(
    policy: Policy, directory: Path, merged: bool, pipeline_class: Any
) -> list[str]:
    """Write a trained denoiser where diffusers loads it: the LoRA adapter in diffusers' LoRA
    format with its alpha metadata (``pipe.load_lora_weights(directory)``), or with ``merged``
    (or for a fully fine-tuned model) the whole transformer (``transformer/``)."""
    from peft.utils import get_peft_model_state_dict

    from policy.lora import has_lora, merge_lora

    assert isinstance(policy, LatentPolicy)
    name, denoiser = policy.denoiser_name, policy.denoiser
    if has_lora(policy) and not merged:
        pipeline_class.save_lora_weights(
            directory,
            **{
                f"{name}_lora_layers": get_peft_model_state_dict(denoiser),
                f"{name}_lora_adapter_metadata": denoiser.peft_config["default"].to_dict(),
            },
        )
        return ["pytorch_lora_weights.safetensors"]
    if has_lora(policy):
        merge_lora(policy)
    denoiser.save_pretrained(directory / name)
    return [f"{name}/"]


def latent_kind(
    load: Any, check: Any, lora_targets: tuple[str, ...], pipeline_class: str, packing: int = 1
) -> Any:
    """The ``ModelKind`` of a family on ``LatentPolicy``: ``load(path, dtype=, image_size=,
    max_sequence_length=, text_encoders=)`` builds the policy, ``check(path)`` checks its
    directory, ``pipeline_class`` (a diffusers class name) writes its LoRA exports."""
    from policy.models import ModelKind

    def from_path(model: Any, image_size: int, text_encoders: bool = True) -> Policy:
        policy = load(
            model.path,
            dtype=DTYPES[model.dtype],
            image_size=image_size,
            max_sequence_length=model.max_sequence_length,
            text_encoders=text_encoders,
        )
        if model.gradient_checkpointing:
            policy.denoiser.enable_gradient_checkpointing()
        return policy

    def check_path(model: Any, image_size: int) -> None:
        check_image_size(check(model.path), image_size, packing)

    def export(policy: Policy, out: Path, merged: bool, provenance: dict[str, Any]) -> list[str]:
        import diffusers

        # A family with several pipelines (``sd``: SD1.x and SDXL) names its own.
        name = getattr(type(policy), "pipeline", pipeline_class)
        return export_transformer(policy, out, merged, getattr(diffusers, name))

    return ModelKind(
        arch_config=None,
        build=None,
        load=None,
        lora_targets=lora_targets,
        from_path=from_path,
        check_path=check_path,
        export=export,
    )
