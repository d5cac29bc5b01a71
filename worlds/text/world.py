"""The `text` world: free-text prompts from files, no verifier (any real model's prompts).

For training a real model (SD3.5, FLUX, SD1.5) on prompts no grammar describes, e.g.
GenEval's or PickScore's: ``world.train_prompts`` and ``world.eval_prompts`` are text files,
one prompt per line (blank lines and ``#`` comments skipped). There is nothing to verify, so
the rewards (``rewards.functions``, a reward model or a reward server) are what trains, and
held-out evaluation reports the means of ``eval.rewards``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from worlds.base import Verdict, World, WorldConfig, register_world


class TextConfig(WorldConfig):
    """The `text` world: prompts from files (``train_prompts``, ``eval_prompts``: paths)."""


def read_prompt_records(path: str) -> list[dict[str, Any]]:
    """A JSONL prompt file: one object per line with a ``prompt`` string and any metadata
    (GenEval's ``test_metadata.jsonl`` shape: ``tag``, ``include`` [{``class``, ``count``,
    ``color``, ``position``}], ``exclude``). ``ValueError`` naming the file and line."""
    import json

    records = []
    for number, line in enumerate(_decoded(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not a JSON object ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f'{path}:{number}: each line needs a "prompt" string')
        records.append(record)
    if not records:
        raise ValueError(f"prompt file {path!r} holds no prompt (one JSON object per line)")
    return records


def _decoded(path: str) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read prompt file {path!r}: {exc}") from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"{path}:{line}: prompt file is not valid UTF-8") from exc


def read_prompt_file(path: str) -> list[str]:
    """One prompt per line; blank lines and ``#`` comments skipped (a ``.jsonl`` file: the
    ``prompt`` of each record). ``ValueError`` naming the file (and line) when it cannot be
    read, is not UTF-8 or holds no prompt."""
    if path.endswith(".jsonl"):
        return [r["prompt"] for r in read_prompt_records(path)]
    prompts = [t.strip() for t in _decoded(path).splitlines()]
    prompts = [t for t in prompts if t and not t.startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {path!r} holds no prompt (one per line)")
    return prompts


@register_world
class TextWorld(World):
    """Prompts from files; scored by the configured rewards only."""

    name = "text"
    config_class = TextConfig
    verifies: ClassVar[bool] = False

    def __init__(self, cfg: WorldConfig | None = None):
        super().__init__(cfg)
        self._metadata: dict[str, dict[str, Any]] | None = None

    def prompts(self, spec: str) -> list[str]:
        return read_prompt_file(spec)

    def metadata(self, prompt: str) -> dict[str, Any] | None:
        """The record of ``prompt`` in the JSONL prompt files (``train_prompts``,
        ``eval_prompts``), less its ``prompt`` key; None for a plain text file."""
        if self._metadata is None:
            self._metadata = {}
            for path in (self.cfg.train_prompts, self.cfg.eval_prompts):
                if path.endswith(".jsonl") and Path(path).is_file():
                    for r in read_prompt_records(path):
                        self._metadata[r["prompt"]] = {k: v for k, v in r.items() if k != "prompt"}
        return self._metadata.get(prompt)

    def split_names(self) -> tuple[str, ...]:
        return ()

    def verify(self, images: np.ndarray, prompts: Sequence[str]) -> list[Verdict]:
        raise NotImplementedError(
            "the `text` world has no verifier: its images are scored by rewards "
            "(rewards.functions for training, eval.rewards for held-out evaluation)"
        )

    def summarize(self, verdicts: Sequence[Verdict], prompts: Sequence[str]) -> dict[str, Any]:
        raise NotImplementedError("the `text` world has no verifier")

    def vocabulary(self) -> list[str]:
        """Words of nothing in particular: the `text` world is for models with their own
        tokenizers (a `tiny` model needs a world with a fixed vocabulary)."""
        return sorted({w for w in re.findall(r"[a-z0-9]+", "a the and of")})
