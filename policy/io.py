"""Building, saving and loading policies.

A saved policy is a directory with ``config.json`` (what to build: kind, image size,
architecture, tokenizer vocabulary, and the provenance of the weights) and
``model.safetensors`` (the weights). Real models (SD3.5, FLUX, SD1.5) will load from their
diffusers directory instead, selected by ``ModelConfig.kind``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from policy.base import Policy
from policy.tiny import TinyFlowPolicy

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def shapes_vocab() -> list[str]:
    """Every word of the built-in ``shapes`` grammar (the tiny model's vocabulary)."""
    from worlds.shapes.grammar import all_prompts

    words = {w for p in all_prompts() for w in re.findall(r"[a-z0-9]+", p.text.lower())}
    return sorted(words)


def build_tiny(
    image_size: int, arch: dict[str, Any], vocab: list[str] | None = None
) -> TinyFlowPolicy:
    """A freshly initialised tiny policy (``arch`` as in ``TinyArchConfig``)."""
    return TinyFlowPolicy(vocab or shapes_vocab(), image_size=image_size, **arch)


def save_policy(policy: Policy, directory: str | Path, provenance: dict[str, Any]) -> Path:
    """Write ``config.json`` and ``model.safetensors`` atomically-enough (weights last)."""
    if not isinstance(policy, TinyFlowPolicy):
        raise TypeError(f"saving {type(policy).__name__} is not supported yet")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "kind": "tiny",
        "image_size": policy.image_size,
        "arch": policy.arch,
        "vocab": policy.tokenizer.vocab[3:],
        "provenance": provenance,
    }
    state = {k: v.detach().contiguous().cpu() for k, v in policy.state_dict().items()}
    tmp = out / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(out / WEIGHTS_NAME)
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def read_policy_meta(directory: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a saved policy, with a clear error if it is not one."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise ValueError(
            f"{directory} is not a saved policy (no {CONFIG_NAME}); run `elborl pretrain` or "
            "point model.checkpoint at a directory written by it"
        )
    try:
        meta: dict[str, Any] = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is corrupted: {exc}") from exc
    return meta


def load_policy(directory: str | Path) -> TinyFlowPolicy:
    """Rebuild a saved policy and load its weights (strictly: every tensor must match)."""
    meta = read_policy_meta(directory)
    if meta.get("kind") != "tiny":
        raise ValueError(f"{directory}: unsupported model kind {meta.get('kind')!r} (known: tiny)")
    policy = build_tiny(meta["image_size"], meta["arch"], meta["vocab"])
    weights = Path(directory) / WEIGHTS_NAME
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"cannot read weights {weights}: {exc}") from exc
    policy.load_state_dict(state, strict=True)
    return policy.eval()
