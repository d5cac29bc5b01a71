"""LoRA adapters on a policy (peft through diffusers' adapter API), and LoRA-only state.

With ``model.lora.rank > 0`` only the adapter weights train: the learner's optimizer, the
old-policy EMA and the weight broadcast all cover the adapter alone (a few hundred kB for the
tiny model; SD3.5-M's at r = 32 is 72 MB in fp32), and the reference policy is the base model.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from policy.base import Policy
from policy.config import LoraConfig
from policy.models import kind_of, model_kind

log = logging.getLogger(__name__)


def add_lora(policy: Policy, cfg: LoraConfig) -> Policy:
    """Inject adapters into the policy's denoiser and freeze everything else (in place)."""
    if cfg.rank <= 0:
        raise ValueError("add_lora needs model.lora.rank > 0")
    denoiser = getattr(policy, "unet", None) or getattr(policy, "transformer", None)
    if denoiser is None or not hasattr(denoiser, "add_adapter"):
        raise ValueError(f"{type(policy).__name__} has no diffusers denoiser to adapt")
    targets = lora_targets(policy, cfg)
    try:
        denoiser.add_adapter(_peft_config(cfg, targets))
    except ValueError as exc:  # peft: "Target modules ... not found in the base model"
        raise ValueError(f"model.lora.target_modules = {targets}: {exc}") from None
    adapted = sum(1 for name, _ in denoiser.named_modules() if name.endswith(".lora_A"))
    _adapters_in_float32(denoiser)
    trained = 0
    for name, p in policy.named_parameters():
        p.requires_grad_("lora_" in name)
        trained += p.numel() if p.requires_grad else 0
    log.info(
        "LoRA r=%d alpha=%d on %d modules (targets %s): %.3g M trainable parameters",
        cfg.rank,
        cfg.alpha or 2 * cfg.rank,
        adapted,
        ", ".join(targets),
        trained / 1e6,
    )
    return policy


def _adapters_in_float32(denoiser: torch.nn.Module) -> None:
    """Adapter weights in float32 whatever the base's dtype (peft casts each LoRA layer's
    input to its weights' dtype and the result back): bf16 adapters would lose the small
    updates RL makes, and could not be published as numpy arrays."""
    for name, p in denoiser.named_parameters():
        if "lora_" in name and p.dtype != torch.float32:
            p.data = p.data.float()


def lora_targets(policy: Policy, cfg: LoraConfig) -> list[str]:
    """``model.lora.target_modules``, or the model kind's default when it is null."""
    if cfg.target_modules is not None:
        return list(cfg.target_modules)
    return list(model_kind(kind_of(policy)).lora_targets)


def has_lora(policy: torch.nn.Module) -> bool:
    return any("lora_" in name for name, _ in policy.named_parameters())


def merge_lora(policy: Policy) -> Policy:
    """Fold the active adapters into the denoiser's weights and remove them (in place): the
    policy then computes what it did with adapters, as a plain model."""
    denoiser = _denoiser(policy)
    denoiser.fuse_lora()
    denoiser.unload_lora()
    return policy


def trainable_keys(policy: torch.nn.Module) -> list[str]:
    """State-dict keys of the trainable parameters (all of them without LoRA)."""
    return [name for name, p in policy.named_parameters() if p.requires_grad]


def _peft_config(cfg: LoraConfig, targets: list[str]) -> Any:
    """peft's adapter settings for ``cfg`` (gaussian init: B = 0, so it starts as identity)."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha or 2 * cfg.rank,
        target_modules=targets,
        init_lora_weights="gaussian",
    )


def _denoiser(policy: torch.nn.Module) -> Any:
    denoiser = getattr(policy, "unet", None) or getattr(policy, "transformer", None)
    if denoiser is None or not hasattr(denoiser, "set_adapter"):
        raise ValueError(f"{type(policy).__name__} has no diffusers denoiser with adapters")
    return denoiser


def add_old_adapter(policy: Policy, cfg: LoraConfig, name: str = "old") -> None:
    """A second, frozen adapter ``name`` holding a copy of the trained (``default``) one.

    The old policy of a LoRA run can then live on the same base weights as the current one
    (``adapter_pass(policy, "old")``) instead of a deep copy of the whole denoiser; the
    reference policy is the base itself (``adapter_pass(policy, None)``). ``default`` stays the
    active, trainable adapter.
    """
    denoiser = _denoiser(policy)
    flags = {p: p.requires_grad for p in policy.parameters()}
    with warnings.catch_warnings():  # peft warns of a second adapter: that is the point
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        denoiser.add_adapter(_peft_config(cfg, lora_targets(policy, cfg)), adapter_name=name)
    denoiser.set_adapter("default")  # add_adapter made the new one active
    _adapters_in_float32(denoiser)
    params = dict(policy.named_parameters())
    with torch.no_grad():
        for key, p in params.items():
            if f".{name}." in key:
                p.copy_(params[key.replace(f".{name}.", ".default.")])
                p.requires_grad_(False)
            elif p in flags:
                p.requires_grad_(flags[p])


@contextmanager
def adapter_pass(policy: Policy, adapter: str | None) -> Iterator[None]:
    """Forward passes inside run with ``adapter`` active (``None``: all adapters disabled,
    i.e. the base model); on exit the active adapters and every ``requires_grad`` flag are
    what they were.

    peft's ``set_adapter``/``disable_adapters`` flip ``requires_grad``; a trained adapter left
    with the flag off before ``backward()`` silently gets no gradient, so a reference or old
    pass after the current forward must not leave it so (``../shared/REAL_MODELS.md`` 1.5).
    """
    denoiser = _denoiser(policy)
    flags = [(p, p.requires_grad) for p in policy.parameters()]
    active = list(denoiser.active_adapters())
    try:
        if adapter is None:
            denoiser.disable_adapters()
        else:
            denoiser.set_adapter(adapter)
        yield
    finally:
        if adapter is None:
            denoiser.enable_adapters()
        denoiser.set_adapter(active)
        for p, flag in flags:
            p.requires_grad_(flag)
