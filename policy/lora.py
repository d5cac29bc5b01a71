"""LoRA adapters on a policy (peft through diffusers' adapter API), and LoRA-only state.

With ``model.lora.rank > 0`` only the adapter weights train: the learner's optimizer, the
old-policy EMA and the weight broadcast all cover the adapter alone (a few hundred kB for the
tiny model; SD3.5-M's at r = 32 is 72 MB in fp32), and the reference policy is the base model.
"""

from __future__ import annotations

import torch

from policy.base import Policy
from policy.config import LoraConfig


def add_lora(policy: Policy, cfg: LoraConfig) -> Policy:
    """Inject adapters into the policy's denoiser and freeze everything else (in place)."""
    from peft import LoraConfig as PeftLoraConfig

    if cfg.rank <= 0:
        raise ValueError("add_lora needs model.lora.rank > 0")
    denoiser = getattr(policy, "unet", None) or getattr(policy, "transformer", None)
    if denoiser is None or not hasattr(denoiser, "add_adapter"):
        raise ValueError(f"{type(policy).__name__} has no diffusers denoiser to adapt")
    denoiser.add_adapter(
        PeftLoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha or 2 * cfg.rank,
            target_modules=list(cfg.target_modules),
            init_lora_weights="gaussian",
        )
    )
    for name, p in policy.named_parameters():
        p.requires_grad_("lora_" in name)
    return policy


def trainable_keys(policy: torch.nn.Module) -> list[str]:
    """State-dict keys of the trainable parameters (all of them without LoRA)."""
    return [name for name, p in policy.named_parameters() if p.requires_grad]
