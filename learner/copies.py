"""The old (sampling), lagged and reference policies the learner compares the current one to.

Component layer (torch + peft, no Ray, no DeepSpeed). Two ways to hold them:

- ``DeepCopies`` (full fine-tuning): each is a frozen deep copy of the policy. A copy shares
  what a policy keeps frozen outside its modules (a real model's text encoders and VAE), so
  it costs one denoiser.
- ``AdapterCopies`` (LoRA): one base model holds them all. The current policy is the trained
  adapter ``default``; the old and lagged policies are two more, frozen adapters (``old``,
  ``lagged``) on the same layers; the reference is the base with every adapter disabled. A
  2 B-parameter denoiser is then held once, plus three adapters. ``policy.lora.adapter_pass``
  switches between them and restores every ``requires_grad`` flag afterwards (peft's switch
  flips them, which would silently leave the trained adapter without gradient).

Both keep exactly one lagged version (the old policy before the last update), for rollouts
made one update late. Weights are exchanged as dicts keyed by the *trained* parameter names
(``keys``), so a publication or checkpoint looks the same either way.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from algo.old_policy import ema_update_
from policy.base import Cond, Policy
from policy.config import LoraConfig
from policy.lora import adapter_pass, add_old_adapter

Forward = Callable[[Tensor, Tensor, Cond], Tensor]


class PolicyCopies(Protocol):
    """What the learner engine asks of its old, lagged and reference policies."""

    lagged_version: int | None

    def old(self) -> Forward: ...

    def lagged(self) -> Forward: ...

    def reference(self) -> Forward | None: ...

    def old_state(self) -> dict[str, Tensor]: ...

    def lagged_state(self) -> dict[str, Tensor] | None: ...

    def load(
        self, old: dict[str, Tensor], lagged: dict[str, Tensor] | None, lagged_version: int | None
    ) -> None: ...

    def update(self, current: dict[str, Tensor], decay: float, version: int) -> None: ...


def _check_keys(state: dict[str, Tensor], keys: list[str]) -> None:
    if set(state) != set(keys):
        raise ValueError(
            "the checkpoint's old-policy weights do not match this model's trained parameters "
            "(was it written with other model.lora settings?)"
        )


class DeepCopies:
    """Old, lagged and reference policies as frozen deep copies (full fine-tuning)."""

    def __init__(self, policy: Policy, keys: list[str], reference: Policy | None):
        """``reference``: a frozen copy of the base model made before any adapter was added,
        or None without a KL term."""
        self.keys = keys
        self._ref = reference
        self._old = frozen_copy(policy)
        self._lagged: Policy | None = None
        self.lagged_version: int | None = None

    def old(self) -> Forward:
        return self._old

    def lagged(self) -> Forward:
        assert self._lagged is not None, "no lagged version yet"
        return self._lagged

    def reference(self) -> Forward | None:
        return self._ref

    def old_state(self) -> dict[str, Tensor]:
        sd = self._old.state_dict()
        return {k: sd[k] for k in self.keys}

    def lagged_state(self) -> dict[str, Tensor] | None:
        if self._lagged is None:
            return None
        sd = self._lagged.state_dict()
        return {k: sd[k] for k in self.keys}

    def load(
        self, old: dict[str, Tensor], lagged: dict[str, Tensor] | None, lagged_version: int | None
    ) -> None:
        _check_keys(old, self.keys)
        self._old.load_state_dict(old, strict=False)
        self._lagged, self.lagged_version = None, lagged_version
        if lagged is not None:
            _check_keys(lagged, self.keys)
            self._lagged = copy.deepcopy(self._old)
            self._lagged.load_state_dict(lagged, strict=False)

    def update(self, current: dict[str, Tensor], decay: float, version: int) -> None:
        self._lagged, self.lagged_version = copy.deepcopy(self._old), version
        old_sd = self._old.state_dict()
        ema_update_({k: old_sd[k] for k in self.keys}, current, decay)


def frozen_copy(policy: Policy) -> Policy:
    return copy.deepcopy(policy).requires_grad_(False).eval()


class AdapterCopies:
    """Old and lagged policies as frozen adapters beside the trained one; the reference is
    the base model (adapters disabled). Must be built before the optimizer sees the policy."""

    OLD, LAGGED = "old", "lagged"

    def __init__(self, policy: Policy, keys: list[str], lora: LoraConfig, with_reference: bool):
        if not keys or not all(".default." in k for k in keys):
            raise ValueError(
                "AdapterCopies needs a policy whose trained parameters are the LoRA adapter "
                "'default' (policy.lora.add_lora)"
            )
        self.policy, self.keys, self.with_reference = policy, keys, with_reference
        add_old_adapter(policy, lora, self.OLD)
        add_old_adapter(policy, lora, self.LAGGED)
        self.lagged_version: int | None = None
        self._has_lagged = False

    def _params(self, adapter: str) -> dict[str, Tensor]:
        """The parameters of ``adapter``, keyed by the trained adapter's names."""
        params = dict(self.policy.named_parameters())
        return {k: params[k.replace(".default.", f".{adapter}.")] for k in self.keys}

    def _pass(self, adapter: str | None) -> Forward:
        policy = self.policy

        def forward(x: Tensor, t: Tensor, cond: Cond) -> Tensor:
            with adapter_pass(policy, adapter):
                out: Tensor = policy(x, t, cond)
            return out

        return forward

    def old(self) -> Forward:
        return self._pass(self.OLD)

    def lagged(self) -> Forward:
        assert self._has_lagged, "no lagged version yet"
        return self._pass(self.LAGGED)

    def reference(self) -> Forward | None:
        return self._pass(None) if self.with_reference else None

    def old_state(self) -> dict[str, Tensor]:
        return {k: p.detach() for k, p in self._params(self.OLD).items()}

    def lagged_state(self) -> dict[str, Tensor] | None:
        if not self._has_lagged:
            return None
        return {k: p.detach() for k, p in self._params(self.LAGGED).items()}

    @torch.no_grad()
    def load(
        self, old: dict[str, Tensor], lagged: dict[str, Tensor] | None, lagged_version: int | None
    ) -> None:
        _check_keys(old, self.keys)
        for k, p in self._params(self.OLD).items():
            p.copy_(old[k])
        self._has_lagged, self.lagged_version = lagged is not None, lagged_version
        if lagged is not None:
            _check_keys(lagged, self.keys)
            for k, p in self._params(self.LAGGED).items():
                p.copy_(lagged[k])

    @torch.no_grad()
    def update(self, current: dict[str, Tensor], decay: float, version: int) -> None:
        old = self._params(self.OLD)
        for k, p in self._params(self.LAGGED).items():
            p.copy_(old[k])
        self._has_lagged, self.lagged_version = True, version
        ema_update_(old, current, decay)
