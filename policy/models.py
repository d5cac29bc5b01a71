"""Model kinds: how each family of policy is built, saved and loaded (``model.kind``).

A kind is one module that defines its ``Policy`` subclass and registers a ``ModelKind``::

    MODELS.add("tiny", ModelKind(arch_config=TinyArchConfig, build=..., load=..., save=...))

and one line here (``_BUILTIN_KINDS``) for a built-in kind; a user's own kind is named by
import path (``model.kind: mypkg.mymodel:KIND``). ``policy/tiny.py`` is the worked example
(docs/extending.md).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from algo.registry import Registry
from common.config import Section
from policy.base import Policy


@dataclass(frozen=True)
class ModelKind:
    """One model family.

    Attributes:
        arch_config: the settings of a model built from scratch (``model.arch``), or None for
            kinds that only load.
        build: ``(arch, image_size, vocabulary) -> Policy``, freshly initialised.
        load: ``(directory, meta) -> Policy`` from a saved directory (``meta`` is its
            ``config.json``).
        save: ``(policy) -> (meta, state)``: what ``config.json`` records besides the kind and
            provenance, and the tensors to write; None if the kind cannot be saved.
        lora_targets: the default ``model.lora.target_modules`` of the kind.
        from_path: ``(model config, image size, text_encoders) -> Policy`` for kinds whose
            weights come from a foreign directory (``model.path``, e.g. a diffusers
            pipeline), else None; ``text_encoders=False`` leaves frozen text encoders out (a
            learner rank, whose conditionings come with the samples).
        check_path: ``(model config, image size) -> None``, a cheap check of that directory
            (files only, nothing loaded) that raises ``ValueError`` naming what is missing or
            wrong; run before any actor starts.
        export: ``(policy, directory, merged, provenance) -> [files]``: write a trained
            policy where the family's own tools load it (``elborl export``), LoRA adapters
            merged into the weights when ``merged``; None if the kind cannot export.
    """

    arch_config: type[Section] | None
    build: Callable[[Any, int, list[str]], Policy] | None
    load: Callable[[Path, dict[str, Any]], Policy] | None
    save: Callable[[Policy], tuple[dict[str, Any], dict[str, Any]]] | None = None
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    from_path: Callable[[Any, int, bool], Policy] | None = None
    check_path: Callable[[Any, int], None] | None = None
    export: Callable[[Policy, Path, bool, dict[str, Any]], list[str]] | None = None


MODELS: Registry[ModelKind] = Registry("model kind", "model.kind")
_BUILTIN_KINDS = ("policy.tiny", "policy.sd3", "policy.flux", "policy.sd")


def model_kinds() -> Registry[ModelKind]:
    """The registry, with the built-in kinds imported."""
    for module in _BUILTIN_KINDS:
        importlib.import_module(module)
    return MODELS


def model_kind(name: str) -> ModelKind:
    return model_kinds().get(name)


def kind_of(policy: Policy) -> str:
    """The registered kind name of a policy instance."""
    name = getattr(policy, "kind", None)
    if not isinstance(name, str):
        raise TypeError(f"{type(policy).__name__} does not say which model kind it is")
    return name
