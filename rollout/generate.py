"""Drawing images from a policy: batching, seeding and classifier-free guidance.

Component layer (no Ray): the rollout actors and the evaluator both call ``generate``.
The initial noise of image ``i`` depends only on ``(seed, i)``, never on the batch size,
so the same seed gives the same images whatever batching a worker uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from algo.samplers import sample
from algo.seeds import image_seed, sde_seed
from common.config import SamplingConfig
from policy.base import Policy, guided_fn


@dataclass(frozen=True)
class Generated:
    """Samples of one ``generate`` call.

    ``x0`` (B, *sample_shape) model-space samples; ``images`` uint8 (B, H, W, 3);
    ``trajectory`` (B, S + 1, *sample_shape) and ``log_probs`` (B, S) for SDE rollouts.
    """

    x0: Tensor
    images: np.ndarray
    trajectory: Tensor | None = None
    log_probs: Tensor | None = None


def initial_noise(shape: tuple[int, ...], count: int, seed: int) -> Tensor:
    """Standard normal noise (count, *shape); image ``i`` uses its own ``(seed, i)`` stream."""
    out = torch.empty(count, *shape)
    for i in range(count):
        g = torch.Generator().manual_seed(image_seed(seed, i))
        out[i] = torch.randn(shape, generator=g)
    return out


@torch.no_grad()
def generate(
    policy: Policy,
    prompts: Sequence[str],
    sampling: SamplingConfig,
    seed: int,
    batch_size: int = 128,
    keep_trajectory: bool = False,
) -> Generated:
    """Sample one image per prompt with ``sampling``'s solver (prompts may repeat for groups)."""
    if not prompts:
        raise ValueError("generate() needs at least one prompt")
    device = next(policy.parameters()).device
    noise = initial_noise(policy.sample_shape, len(prompts), seed)
    if policy.initial_noise_scale != 1.0:
        noise = noise * policy.initial_noise_scale
    sde_gen = torch.Generator().manual_seed(sde_seed(seed))
    shift, grid = policy.sampling_grid(sampling.shift, sampling.grid)
    chunks: list[tuple[Tensor, Tensor | None, Tensor | None]] = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        cond = policy.encode_prompts(batch)
        cfg = sampling.guidance != 1.0 and policy.guidance_mode == "cfg"
        uncond = policy.encode_prompts([""] * len(batch)) if cfg else None
        fn = guided_fn(policy, cond, uncond, sampling.guidance)
        out = sample(
            fn,
            noise[start : start + batch_size].to(device),
            sampler=sampling.sampler,
            num_steps=sampling.num_steps,
            shift=shift,
            grid=grid,
            eta=sampling.eta,
            generator=sde_gen,
            return_trajectory=keep_trajectory,
        )
        chunks.append((out.x0.cpu(), _cpu(out.trajectory), _cpu(out.log_probs)))
    x0 = torch.cat([c[0] for c in chunks])
    traj = (
        torch.cat([c[1] for c in chunks if c[1] is not None]) if chunks[0][1] is not None else None
    )
    logp = (
        torch.cat([c[2] for c in chunks if c[2] is not None]) if chunks[0][2] is not None else None
    )
    return Generated(x0=x0, images=policy.to_images(x0), trajectory=traj, log_probs=logp)


def _cpu(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.cpu()
