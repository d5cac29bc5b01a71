"""The built-in tiny text-conditional flow-matching policy (pixel space).

An HxW RGB image in [-1, 1] is packed 2x2 into channels (pixel-unshuffle: (3, 32, 32) ->
(12, 16, 16)) and modelled by a small diffusers ``UNet2DConditionModel`` that cross-attends
to a word-level transformer prompt encoder. The packing is a permutation of pixels, so
losses and ELBOs computed on ``x0`` in image space are the same as in packed space; it just
lets a 1.7 M-parameter net see the whole image at a cost a 2-core CPU can train in minutes.

The prompt encoder is part of the policy and is trained with it (there is no pretrained
text model offline). Conditioning is a LongTensor of token ids (B, L); the empty prompt is
the unconditional one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from common.config import PositiveInt, Section
from policy.base import Policy, PredictionType, images_to_unit, unit_to_images
from policy.models import MODELS, ModelKind

PAD, BOS, UNK = "<pad>", "<bos>", "<unk>"
MAX_TOKENS = 16


class WordTokenizer:
    """Lower-case word-level tokenizer over a fixed vocabulary (saved with the checkpoint)."""

    def __init__(self, words: Sequence[str]):
        self.vocab = [PAD, BOS, UNK, *sorted(set(words) - {PAD, BOS, UNK})]
        self.index = {w: i for i, w in enumerate(self.vocab)}

    def __call__(self, prompts: Sequence[str]) -> Tensor:
        """Token ids (B, MAX_TOKENS): BOS, the words, then padding (id 0)."""
        ids = torch.zeros(len(prompts), MAX_TOKENS, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = re.findall(r"[a-z0-9]+", prompt.lower())[: MAX_TOKENS - 1]
            toks = [self.index[BOS], *(self.index.get(w, self.index[UNK]) for w in words)]
            ids[row, : len(toks)] = torch.tensor(toks)
        return ids


def sinusoidal_positions(length: int, dim: int) -> Tensor:
    """(1, length, dim) fixed sine/cosine position codes (Vaswani et al. 2017), each row of
    norm sqrt(dim / 2): the scale of N(0, 1) token embeddings, so word order is not drowned."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    codes = torch.zeros(length, dim)
    codes[:, 0::2] = torch.sin(pos * freq)
    codes[:, 1::2] = torch.cos(pos * freq)
    return codes[None]


class PromptEncoder(nn.Module):
    """Token ids (B, L) -> hidden states (B, L, D) and a key mask (B, L), True = real token.

    ``positions``: ``learned`` (initialised at zero: the first base model's, which stayed ~3 %
    of the token embeddings' size, leaving the encoder nearly order-blind) or ``sinusoidal``
    (fixed, at the token scale: "a red circle left of a blue square" and its mirror "a blue
    square left of a red circle" then encode differently).
    """

    def __init__(self, vocab_size: int, dim: int, layers: int, positions: str = "learned"):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos: Tensor
        if positions == "sinusoidal":
            self.register_buffer("pos", sinusoidal_positions(MAX_TOKENS, dim), persistent=False)
        else:
            self.pos = nn.Parameter(torch.zeros(1, MAX_TOKENS, dim))
        layer = nn.TransformerEncoderLayer(
            dim, nhead=4, dim_feedforward=4 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        mask = ids != 0
        h = self.embed(ids) + self.pos[:, : ids.shape[1]]
        h = self.encoder(h, src_key_padding_mask=~mask)
        return self.norm(h), mask


class TinyArchConfig(Section):
    """Architecture of the built-in tiny text-conditional flow model (pixel space)."""

    channels: tuple[PositiveInt, ...] = Field(
        (32, 64, 64), description="UNet block widths (channels) from the top level down."
    )
    layers_per_block: PositiveInt = Field(1, description="ResNet layers per UNet block.")
    text_dim: PositiveInt = Field(64, description="Width of the word-level prompt encoder.")
    text_layers: PositiveInt = Field(2, description="Transformer layers in the prompt encoder.")
    pack: PositiveInt = Field(
        2, description="Pixel-unshuffle factor: an HxW RGB image is modelled as (3p^2, H/p, W/p)."
    )
    text_positions: Literal["learned", "sinusoidal"] = Field(
        "learned",
        description="Word positions in the prompt encoder: `learned` (zero-initialised; the "
        "first base model's, nearly order-blind) or `sinusoidal` (fixed, at the token scale).",
    )
    coord_channels: bool = Field(
        False,
        description="Add two input channels holding each pixel's x and y in [-1, 1], so the "
        "UNet knows where left and right are without inferring it from the borders.",
    )
    pooled_text: bool = Field(
        False,
        description="Also condition every ResNet block on the mean of the prompt's hidden "
        "states (added to the timestep embedding), besides cross-attention.",
    )


class TinyFlowPolicy(Policy):
    """Velocity-predicting pixel-space policy for the built-in ``shapes`` world."""

    prediction_type: ClassVar[PredictionType] = "flow"
    kind: ClassVar[str] = "tiny"

    def __init__(
        self,
        vocab: Sequence[str],
        image_size: int = 32,
        channels: Sequence[int] = (32, 64, 64),
        layers_per_block: int = 1,
        text_dim: int = 64,
        text_layers: int = 2,
        pack: int = 2,
        text_positions: str = "learned",
        coord_channels: bool = False,
        pooled_text: bool = False,
    ):
        super().__init__()
        if image_size % pack:
            raise ValueError(f"image_size {image_size} must be a multiple of pack {pack}")
        self.tokenizer = WordTokenizer(vocab)
        self.image_size, self.pack = image_size, pack
        # What ``policy.io.save_policy`` records to rebuild this exact network.
        self.arch = {
            "channels": list(channels),
            "layers_per_block": layers_per_block,
            "text_dim": text_dim,
            "text_layers": text_layers,
            "pack": pack,
            "text_positions": text_positions,
            "coord_channels": coord_channels,
            "pooled_text": pooled_text,
        }
        self.coord_channels, self.pooled_text = coord_channels, pooled_text
        vocab_size = len(self.tokenizer.vocab)
        self.text = PromptEncoder(vocab_size, text_dim, text_layers, text_positions)
        from diffusers import UNet2DConditionModel  # heavy: imported when a model is built

        n = len(channels)
        self.unet = UNet2DConditionModel(
            sample_size=image_size // pack,
            in_channels=3 * pack * pack + (2 if coord_channels else 0),
            out_channels=3 * pack * pack,
            block_out_channels=tuple(channels),
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
            layers_per_block=layers_per_block,
            cross_attention_dim=text_dim,
            attention_head_dim=8,
            norm_num_groups=8,
            class_embed_type="projection" if pooled_text else None,
            projection_class_embeddings_input_dim=text_dim if pooled_text else None,
        )
        side = image_size // pack
        grid = torch.linspace(-1.0, 1.0, side)
        coords = torch.stack(torch.meshgrid(grid, grid, indexing="ij"))[None]  # (1, 2, h, w)
        self.coords: Tensor
        self.register_buffer("coords", coords, persistent=False)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (3, self.image_size, self.image_size)

    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        return self.tokenizer(prompts).to(self.coords.device)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """Velocity (B, 3, H, W) for images ``x_t`` (B, 3, H, W) at ``t`` (B,) in [0, 1]."""
        hidden, mask = self.text(cond)
        packed = F.pixel_unshuffle(x_t, self.pack)  # (B, 3p^2, H/p, W/p)
        if self.coord_channels:
            packed = torch.cat([packed, self.coords.expand(packed.shape[0], -1, -1, -1)], 1)
        pooled = None
        if self.pooled_text:  # masked mean over the real tokens (B, D)
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        out = self.unet(  # type: ignore[operator]  # diffusers' ModelMixin is untyped here
            packed,
            t * 1000.0,
            encoder_hidden_states=hidden,
            encoder_attention_mask=mask,
            class_labels=pooled,
        ).sample
        return F.pixel_shuffle(out, self.pack)

    def to_images(self, x0: Tensor) -> np.ndarray:
        return unit_to_images(x0)

    def from_images(self, images: np.ndarray) -> Tensor:
        return images_to_unit(images).to(self.coords.device)


def _build(arch: TinyArchConfig, image_size: int, vocabulary: list[str]) -> TinyFlowPolicy:
    if image_size % arch.pack:
        raise ValueError(
            f"world.image_size = {image_size} must be a multiple of model.arch.pack = {arch.pack}"
        )
    return TinyFlowPolicy(vocabulary, image_size=image_size, **arch.model_dump())


def _load(directory: Path, meta: dict[str, Any]) -> TinyFlowPolicy:
    return TinyFlowPolicy(meta["vocab"], image_size=meta["image_size"], **meta["arch"])


def _save(policy: Policy) -> tuple[dict[str, Any], dict[str, Any]]:
    assert isinstance(policy, TinyFlowPolicy)
    meta = {
        "image_size": policy.image_size,
        "arch": policy.arch,
        "vocab": policy.tokenizer.vocab[3:],
    }
    return meta, policy.state_dict()


def _export(policy: Policy, directory: Path, merged: bool, provenance: dict[str, Any]) -> list[str]:
    """A saved policy (``config.json`` + ``model.safetensors``, usable as model.checkpoint);
    adapters are always merged (a tiny policy's directory holds one set of weights)."""
    from policy.io import save_policy
    from policy.lora import has_lora, merge_lora

    if has_lora(policy):
        merge_lora(policy)
    save_policy(policy, directory, provenance)
    return ["config.json", "model.safetensors"]


MODELS.add(
    "tiny",
    ModelKind(arch_config=TinyArchConfig, build=_build, load=_load, save=_save, export=_export),
)
