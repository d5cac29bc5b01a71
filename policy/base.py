"""The policy interface the learner and the rollout workers share.

A policy is a ``torch.nn.Module`` that predicts, for a noisy sample ``x_t`` at noise level
``t`` under a prompt conditioning ``cond``, either a velocity (flow matching, target
``eps - x0``) or an epsilon (VP diffusion, target ``eps``). Everything model-specific —
tokenisers, text encoders, a VAE between pixels and latents, LoRA plumbing — lives behind
this interface, so the pure math (ELBO, samplers) only ever sees ``fn(x_t, t, cond)``.

The built-in ``TinyFlowPolicy`` (pixel space) implements it today; diffusers SD3/SD3.5 and
FLUX transformers (flow) and SD1.5 UNets (epsilon) loaded from a local directory slot in as
further subclasses: their ``encode_prompts`` runs frozen text encoders and returns
embeddings, ``to_images`` decodes latents with the VAE.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor, nn

# Conditioning is opaque to the math layer: a batch-first tensor or a dict of them, produced
# by ``Policy.encode_prompts`` and passed back into ``Policy.forward`` unchanged.
Cond = Any
PredictionType = Literal["flow", "epsilon"]
GuidanceMode = Literal["cfg", "embedded", "none"]


class Policy(nn.Module, ABC):
    """A text-conditional generative policy over samples of shape ``sample_shape``."""

    prediction_type: ClassVar[PredictionType]
    kind: ClassVar[str]  # the registered model kind (``policy/models.py``)
    guidance_mode: GuidanceMode = "cfg"
    """How a guidance scale G acts: ``cfg`` (classifier-free: u + G (c - u), two passes),
    ``embedded`` (an input of the network, one pass: FLUX.1-dev), ``none`` (G must be 1)."""
    image_size: int  # side of the square RGB images ``to_images`` returns, in pixels

    @property
    @abstractmethod
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample ``x0`` in model space (no batch dimension), e.g. (C, H, W)."""

    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """Conditioning for a batch of prompts; the empty string is the unconditional prompt."""

    @abstractmethod
    def forward(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """Prediction for ``x_t`` (B, *sample_shape) at noise levels ``t`` (B,) in [0, 1]."""

    @abstractmethod
    def to_images(self, x0: Tensor) -> np.ndarray:
        """Decode samples (B, *sample_shape) to RGB images, uint8 (B, H, W, 3)."""

    def from_images(self, images: np.ndarray) -> Tensor:
        """Encode RGB images uint8 (B, H, W, 3) into model space (for supervised pretraining)."""
        raise NotImplementedError(f"{type(self).__name__} cannot encode images")

    @property
    def initial_noise_scale(self) -> float:
        """The sampling state at the grid's first level is ``initial_noise_scale x N(0, I)``:
        1 for flow models (their grid starts at pure noise); a VP model in the flow view
        starts where DDIM does (``algo.vp.initial_scale``)."""
        return 1.0

    def place(self, device: torch.device, text_encoders: str = "same") -> Policy:
        """Move the model to ``device`` for sampling or training; kinds with frozen parts
        outside their modules (text encoders, a VAE) move those too, the text encoders to the
        CPU when ``text_encoders`` is ``"cpu"``. Returns ``self``."""
        return self.to(device)

    def sampling_grid(self, shift: float, grid: str) -> tuple[float, str]:
        """``(shift, grid)`` to sample on: the configured ones, or for ``grid = "diffusers"``
        what the model's own pipeline uses (a kind's override: SD3's scheduler shift on
        diffusers' grid, FLUX's dynamic shift on the uniform grid)."""
        return shift, grid

    def conditions(self, prompts: Sequence[str]) -> dict[str, Any] | None:
        """The cached conditionings of ``prompts`` (one entry per unique prompt, on the CPU)
        for kinds whose text encoders are frozen, so that they can travel with the samples
        and a learner never runs (or loads) the encoders; None for kinds that train their
        text encoder (``tiny``), whose conditionings change with the weights."""
        return None

    def add_conditions(self, conditions: dict[str, Any]) -> None:
        """Put conditionings made by ``conditions`` (on another worker) into the cache."""
        raise TypeError(f"{type(self).__name__} does not take shipped conditionings")

    def with_guidance(self, cond: Cond, scale: float) -> Cond:
        """``cond`` with the guidance scale as the network's input (``embedded`` mode)."""
        raise TypeError(f"{type(self).__name__} takes no embedded guidance")

    def select(self, cond: Cond, index: Tensor) -> Cond:
        """Rows ``index`` of a conditioning batch (tensor or dict of tensors)."""
        if isinstance(cond, dict):
            return {k: v[index] for k, v in cond.items()}
        return cond[index]


def guided_fn(
    policy: Policy, cond: Cond, uncond: Cond | None, guidance: float
) -> Callable[[Tensor, Tensor], Tensor]:
    """Close over the conditioning: ``fn(x_t, t) -> prediction`` with classifier-free guidance.

    ``pred = uncond + G * (cond - uncond)``; with G == 1 (or no ``uncond``) the unconditional
    pass is skipped entirely. A policy with embedded guidance gets G as an input instead (one
    pass); one without guidance refuses G != 1.
    """
    _check_guidance(policy, guidance)
    if policy.guidance_mode == "embedded":
        guided = policy.with_guidance(cond, guidance)
        return lambda x, t: policy(x, t, guided)
    if guidance == 1.0 or uncond is None:
        return lambda x, t: policy(x, t, cond)

    return lambda x, t: _guided(policy, x, t, cond, uncond, guidance)


class GuidedModel:
    """``model(x_t, t, cond)`` with classifier-free guidance at ``scale`` (a ``ModelFn``).

    The learner's passes go through it so that the ELBO (and the trajectory baseline's
    log-probs) see the velocity the guidance scale defines: ``u + G (c - u)`` with the
    unconditional branch ``u`` from the empty prompt, in one doubled batch, gradients through
    both branches (as the paper's ``v_pred_fn``). With ``scale == 1`` it is ``model`` itself.
    """

    def __init__(self, model: Callable[..., Tensor], policy: Policy, scale: float):
        if scale < 1.0 and policy.guidance_mode == "cfg":
            raise ValueError(f"a guidance scale must be >= 1, got {scale}")
        _check_guidance(policy, scale)
        self.model, self.policy, self.scale = model, policy, scale

    def __call__(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        if self.policy.guidance_mode == "embedded":  # one pass, the scale as an input
            return self.model(x_t, t, self.policy.with_guidance(cond, self.scale))
        if self.scale == 1.0:
            return self.model(x_t, t, cond)
        uncond = self.policy.encode_prompts([""] * x_t.shape[0])
        return _guided(self.model, x_t, t, cond, uncond, self.scale)


def _check_guidance(policy: Policy, scale: float) -> None:
    if policy.guidance_mode == "none" and scale != 1.0:
        raise ValueError(
            f"{type(policy).__name__} has no guidance (e.g. FLUX.1-schnell); set "
            f"rollout.sampling.guidance (and learner.train_guidance) to 1, not {scale}"
        )


def _guided(
    model: Callable[..., Tensor], x: Tensor, t: Tensor, cond: Cond, uncond: Cond, scale: float
) -> Tensor:
    """``u + G (c - u)`` from one doubled batch: conditional rows first, then unconditional."""
    c, u = model(torch.cat([x, x]), torch.cat([t, t]), _cat_cond(cond, uncond)).chunk(2)
    return u + scale * (c - u)


def _cat_cond(a: Cond, b: Cond) -> Cond:
    if isinstance(a, dict):
        return {k: torch.cat([a[k], b[k]]) for k in a}
    return torch.cat([a, b])


def images_to_unit(images: np.ndarray) -> Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def unit_to_images(x: Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3), clamping out-of-range values."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
