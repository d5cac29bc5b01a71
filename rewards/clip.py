"""Reward models from local weights that run in elborl's own environment (transformers' CLIP):
PickScore, CLIP score and the LAION aesthetic predictor.

Component layer (torch + transformers, no Ray). Each loads from local directories only (never
a hub): a missing directory or weight file fails at construction, when the reward actors
start, naming the file. Scores are batched on the actor's device (``device``: ``auto`` is the
GPU when one is visible). The formulas are the anchors' (flow_grpo's ``pickscore_scorer.py``
and ``aesthetic_scorer.py``, DiffusionNFT's ``clip_scorer.py``):

- ``pickscore``: ``exp(logit_scale) * cos(image, prompt) / 26`` (PickScore_v1 with the
  CLIP-ViT-H-14 processor); about 0.7-0.95 on real images;
- ``clip_score``: ``exp(logit_scale) * cos(image, prompt) / 100`` (CLIP ViT-L/14: the cosine);
- ``aesthetic``: an MLP (768 -> 1024 -> 128 -> 64 -> 16 -> 1, LAION's
  ``sac+logos+ava1-l14-linearMSE.pth``) on the normalised CLIP-L image embedding; about 1-10.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rewards.base import Reward, RewardOutput, register


def _check_dir(path: str | None, what: str) -> Path:
    """A local model directory with a config and weights, or a ``ValueError`` naming it."""
    if not path:
        raise ValueError(f"{what}: params.model is required (a local directory)")
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"{what}: {path!r} is not a directory")
    if not (root / "config.json").is_file() and not (root / "preprocessor_config.json").is_file():
        raise ValueError(f"{what}: {root / 'config.json'} is missing")
    return root


def _device(setting: str) -> torch.device:
    from policy.placement import resolve_device

    return resolve_device(setting)


class _ClipSimilarity(Reward):
    """exp(logit_scale) x cosine similarity of image and prompt, divided by ``divisor``."""

    divisor: float = 1.0

    def __init__(
        self,
        model: str,
        processor: str | None = None,
        device: str = "auto",
        batch_size: int = 32,
    ):
        from transformers import AutoModel, AutoProcessor

        what = f"reward {self.name!r}"
        root = _check_dir(model, what)
        if not any(root.glob("*.safetensors")) and not any(root.glob("*.bin")):
            raise ValueError(f"{what}: no weights (*.safetensors) in {root}")
        proc_root = _check_dir(processor, what) if processor else root
        if batch_size < 1:
            raise ValueError(f"{what}: params.batch_size must be >= 1")
        self.device, self.batch_size = _device(device), batch_size
        self.processor = AutoProcessor.from_pretrained(proc_root, local_files_only=True)
        self.model = AutoModel.from_pretrained(root, local_files_only=True).eval().to(self.device)
        self.model.requires_grad_(False)

    @torch.no_grad()
    def embed(self, images: np.ndarray, prompts: Sequence[str]) -> tuple[torch.Tensor, ...]:
        """Normalised image and text embeddings (B, D) each, and ``exp(logit_scale)``."""
        inputs = self.processor(
            text=list(prompts),
            images=list(images),
            return_tensors="pt",
            padding=True,
            truncation=True,
        ).to(self.device)
        out = self.model(**inputs)
        img = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
        txt = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
        return img, txt, self.model.logit_scale.exp()

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        self.check_batch(images, prompts)
        scores = []
        for lo in range(0, len(prompts), self.batch_size):
            img, txt, scale = self.embed(
                images[lo : lo + self.batch_size], prompts[lo : lo + self.batch_size]
            )
            scores.append((scale * (img * txt).sum(-1) / self.divisor).float().cpu())
        return RewardOutput(scores=torch.cat(scores).numpy().astype(np.float64))


@register("pickscore")
class PickScore(_ClipSimilarity):
    """PickScore (Kirstain et al. 2023): ``params.model`` the PickScore_v1 directory,
    ``params.processor`` the CLIP-ViT-H-14 processor's directory."""

    name = "pickscore"
    divisor = 26.0


@register("clip_score")
class ClipScore(_ClipSimilarity):
    """CLIP score: ``params.model`` a CLIP directory (e.g. openai/clip-vit-large-patch14)."""

    name = "clip_score"
    divisor = 100.0


class AestheticHead(nn.Module):
    """LAION's aesthetic MLP (the keys of ``sac+logos+ava1-l14-linearMSE.pth``)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out


@register("aesthetic")
class Aesthetic(_ClipSimilarity):
    """LAION aesthetic score: ``params.model`` a CLIP ViT-L/14 directory, ``params.head`` the
    MLP's weight file (``sac+logos+ava1-l14-linearMSE.pth``)."""

    name = "aesthetic"

    def __init__(self, model: str, head: str, processor: str | None = None, **kw: Any):
        super().__init__(model, processor, **kw)
        path = Path(head)
        if not path.is_file():
            raise ValueError(f"reward 'aesthetic': params.head {head!r} is not a file")
        dim = int(self.model.config.projection_dim)
        self.head = AestheticHead(dim)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.head.load_state_dict(state)
        except (RuntimeError, OSError, ValueError) as exc:
            raise ValueError(
                f"reward 'aesthetic': {path} is not the aesthetic MLP's weights for a "
                f"{dim}-dimensional CLIP embedding: {exc}"
            ) from exc
        self.head.eval().requires_grad_(False).to(self.device)

    @torch.no_grad()
    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        self.check_batch(images, prompts)
        scores = []
        for lo in range(0, len(images), self.batch_size):
            batch = list(images[lo : lo + self.batch_size])
            pixels = self.processor(images=batch, return_tensors="pt").to(self.device)
            emb = self.model.get_image_features(**pixels)
            emb = emb if isinstance(emb, torch.Tensor) else emb.pooler_output
            emb = emb / emb.norm(dim=-1, keepdim=True)
            scores.append(self.head(emb).squeeze(-1).float().cpu())
        return RewardOutput(scores=torch.cat(scores).numpy().astype(np.float64))
