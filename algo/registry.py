"""Named choices as registries: one decorated definition per loss, sampler, estimator, ...

Every named choice in a config (``learner.loss``, ``rollout.sampling.sampler``,
``model.kind``, ...) is looked up in exactly one ``Registry``; the config validates the name
against the same registry, so the list of allowed names exists once. A name of the form
``package.module:Name`` is imported on first use, which lets a user plug their own entry in
without editing elborl (it must be importable on every node, e.g. shipped in the Ray job's
``working_dir``).

Adapted from the pattern of verl's ``register_policy_loss`` / ``register_adv_est``: the
registry holds plain objects (functions, classes or instances), nothing more.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> entry for one kind of choice (``kind`` names it in error messages)."""

    def __init__(self, kind: str, field: str | None = None):
        self.kind = kind
        self.field = field  # the config field that names an entry, for error messages
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REG.register("name")`` adds the decorated object under ``name``."""

        def deco(entry: T) -> T:
            self.add(name, entry)
            return entry

        return deco

    def add(self, name: str, entry: T) -> None:
        """Register ``entry`` under ``name``; a name is registered once (``ValueError`` twice)."""
        if not name or ":" in name:
            raise ValueError(f"invalid {self.kind} name {name!r}")
        if name in self._entries and self._entries[name] is not entry:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry

    def remove(self, name: str) -> None:
        """Unregister ``name`` (tests that register a toy entry clean up with this)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        """The entry named ``name``, importing ``package.module:Name`` forms on first use."""
        if name in self._entries:
            return self._entries[name]
        module, sep, attr = name.partition(":")
        if sep and module and attr.isidentifier():
            try:
                entry: T = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as exc:
                raise ValueError(f"{self._what()} {name!r} cannot be imported: {exc}") from exc
            return entry
        raise ValueError(self.unknown(name))

    def check(self, name: str) -> str:
        """``name`` if it is registered or an import path (``package.module:Name``); else a
        ``ValueError`` listing what is allowed. Import paths are resolved later, where they run."""
        module, sep, attr = name.partition(":")
        if name in self._entries or (sep and module and attr.isidentifier()):
            return name
        raise ValueError(self.unknown(name))

    def unknown(self, name: str) -> str:
        """The error message for an unregistered ``name``: what is allowed instead."""
        field = f" (`{self.field}`)" if self.field else ""
        return (
            f"unknown {self.kind} {name!r}{field}; registered: {', '.join(self.names())} "
            "(or your own as `package.module:Name`)"
        )

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def _what(self) -> str:
        return f"{self.kind} (`{self.field}`)" if self.field else self.kind
