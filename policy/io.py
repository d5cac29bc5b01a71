"""Building, saving and loading policies of any registered model kind.

A saved policy is a directory with ``config.json`` (its ``kind``, what the kind needs to
rebuild the network, and the provenance of the weights) and ``model.safetensors`` (the
weights). Real models (``sd3``) load from their own diffusers directory instead
(``model.path``): ``model_from_config`` picks the way the kind loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from policy.base import Policy
from policy.config import ModelConfig
from policy.models import kind_of, model_kind

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def build_policy(model: ModelConfig, image_size: int, vocabulary: list[str]) -> Policy:
    """A freshly initialised policy of ``model.kind`` with ``model.arch``."""
    kind = model_kind(model.kind)
    if kind.build is None:
        raise ValueError(f"model kind {model.kind!r} cannot be built from scratch")
    return kind.build(model.arch_settings(), image_size, vocabulary)


def save_policy(policy: Policy, directory: str | Path, provenance: dict[str, Any]) -> Path:
    """Write ``config.json`` and ``model.safetensors`` atomically-enough (weights last)."""
    name = kind_of(policy)
    kind = model_kind(name)
    if kind.save is None:
        raise TypeError(f"saving a {name!r} policy is not supported")
    meta, state = kind.save(policy)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    tmp = out / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(out / WEIGHTS_NAME)
    record = {"kind": name, **meta, "provenance": provenance}
    (out / CONFIG_NAME).write_text(json.dumps(record, indent=2) + "\n")
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


def model_from_config(model: ModelConfig, image_size: int, text_encoders: bool = True) -> Policy:
    """The policy a run starts from: loaded from ``model.path`` for kinds that read a foreign
    directory (a diffusers pipeline; without its frozen text encoders if ``text_encoders`` is
    False), else from the saved ``model.checkpoint``."""
    kind = model_kind(model.kind)
    if kind.from_path is not None:
        return kind.from_path(model, image_size, text_encoders)
    if not model.checkpoint:
        raise ValueError("model.checkpoint must name a saved policy directory for RL training")
    return load_policy(model.checkpoint)


def check_model_config(model: ModelConfig, image_size: int) -> None:
    """Cheap checks of the model's files before anything starts (``ValueError`` naming the
    field and what is wrong); a kind loading from ``model.path`` checks its directory."""
    kind = model_kind(model.kind)
    if kind.from_path is not None:
        if kind.check_path is not None:
            kind.check_path(model, image_size)
        return
    if not model.checkpoint or not Path(model.checkpoint, CONFIG_NAME).exists():
        raise ValueError(
            f"model.checkpoint = {model.checkpoint!r} is not a saved policy; run "
            "`elborl pretrain` or point it at one"
        )


def load_policy(directory: str | Path) -> Policy:
    """Rebuild a saved policy and load its weights (strictly: every tensor must match)."""
    meta = read_policy_meta(directory)
    try:
        kind = model_kind(str(meta.get("kind")))
    except ValueError as exc:
        raise ValueError(f"{directory}: {exc}") from None
    if kind.load is None:
        raise ValueError(f"{directory}: model kind {meta.get('kind')!r} is not saved this way")
    policy = kind.load(Path(directory), meta)
    weights = Path(directory) / WEIGHTS_NAME
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"cannot read weights {weights}: {exc}") from exc
    policy.load_state_dict(state, strict=True)
    return policy.eval()
