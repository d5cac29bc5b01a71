"""Weights as plain numpy dicts: what the learner publishes and rollout workers load.

A dict of numpy arrays is read zero-copy from Ray's object store by actors on the same node;
the checksum lets every reader report which weights it holds.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

StateDict = dict[str, np.ndarray]


def checksum(state: StateDict) -> str:
    """A cheap, order-stable fingerprint of a weight dict (crc32 of every array's bytes)."""
    crc = 0
    for name in sorted(state):
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(np.ascontiguousarray(state[name]).view(np.uint8).data, crc)
    return f"{crc:08x}"


def published_keys(module: torch.nn.Module) -> list[str]:
    """The state-dict keys a weight publication covers: the LoRA adapters when the module
    has them (its base weights never change), else every key."""
    keys = list(module.state_dict())
    lora = [k for k in keys if "lora_" in k]
    return lora or keys


def to_numpy_state(module: torch.nn.Module, keys: list[str] | None = None) -> StateDict:
    """Weights (all, or only ``keys``) as numpy arrays, read zero-copy by Ray actors."""
    sd = module.state_dict()
    return {k: sd[k].detach().cpu().numpy().copy() for k in (keys or list(sd))}


def load_numpy_state(module: torch.nn.Module, state: StateDict) -> None:
    """Copy a (possibly partial, e.g. LoRA-only) numpy weight dict into ``module``.

    Every key of ``state`` must exist in the module; arrays may be read-only (Ray's store).
    """
    result = module.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=False
    )
    if result.unexpected_keys:
        raise ValueError(f"weights for unknown parameters: {result.unexpected_keys[:5]}")
