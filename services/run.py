"""A run directory: its config, metrics (JSONL + TensorBoard), sample grids and checkpoints.

Layout of ``runs/<name>/``::

    config.yaml            the resolved config of the run (checked again on --resume)
    metrics.jsonl          one JSON object per round (and per evaluation)
    ledger.jsonl           per round, every sample id with its reward and whether it was
                           trained on, dropped or invalid (the exactly-once audit trail)
    tensorboard/           the same metrics for TensorBoard
    samples/round_XXXXX.png  sample grids with prompts and rewards
    checkpoints/round_XXXXX/ complete checkpoints (a ``COMPLETE`` marker is written last);
                           partial ones live under ``.tmp-*`` names and are never picked up
    status.json            the driver's latest state (for the status service)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from services.config import ConfigError, RunConfig, config_to_yaml

log = logging.getLogger(__name__)
COMPLETE = "COMPLETE"


class RunDir:
    """Owns the files of one run; never overwrites another run's files."""

    def __init__(self, cfg: RunConfig, resume: bool):
        self.path = cfg.runs_root() / cfg.name
        self.ckpt_root = self.path / "checkpoints"
        config_file = self.path / "config.yaml"
        if resume:
            if not config_file.exists():
                raise ConfigError(f"--resume: {self.path} holds no run (no config.yaml)")
            saved = RunConfig.model_validate(_load_yaml(config_file))
            if _run_identity(saved) != _run_identity(cfg):
                raise ConfigError(
                    f"--resume: {config_file} describes a different run (model, world, sizes or "
                    "loss differ); resume with the same config or choose another `name`"
                )
        elif self.path.exists() and any(self.path.iterdir()):
            raise ConfigError(
                f"run directory {self.path} already exists; pass --resume to continue it, or set "
                "a new `name` (e.g. --set name=my-run-2)"
            )
        for sub in ("samples", "checkpoints", "tensorboard"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)
        if not resume:
            config_file.write_text(config_to_yaml(cfg))
        self._tb: Any = None

    # ------------------------------------------------------------------ metrics
    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        """Append one JSON line and write the scalars to TensorBoard."""
        record = {"round": step, "time": time.time(), **metrics}
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        tb = self._writer()
        for key, value in metrics.items():
            if isinstance(value, int | float) and math.isfinite(value):
                tb.add_scalar(key, value, step)
        tb.flush()

    def _writer(self) -> Any:
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.path / "tensorboard"))
        return self._tb

    def history(self) -> list[dict[str, Any]]:
        """Every metrics record written so far."""
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def log_ledger(self, step: int, record: dict[str, Any]) -> None:
        """Append one round's per-sample ledger line (ids, rewards, status, trained)."""
        with open(self.path / "ledger.jsonl", "a") as f:
            f.write(json.dumps({"round": step, **record}) + "\n")

    def truncate_history(self, last_round: int) -> None:
        """Drop records after ``last_round`` (rounds redone after a resume count once)."""
        for name in ("metrics.jsonl", "ledger.jsonl"):
            path = self.path / name
            if not path.exists():
                continue
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if _round_of(ln) <= last_round]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept))
            tmp.replace(path)

    def write_status(self, status: dict[str, Any]) -> None:
        """Atomically replace ``status.json`` (read by the status service)."""
        tmp = self.path / "status.json.tmp"
        tmp.write_text(json.dumps(status, default=str, indent=1))
        tmp.replace(self.path / "status.json")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()

    # ------------------------------------------------------------------ checkpoints
    def new_checkpoint(self, round_: int) -> Path:
        """A fresh temporary directory to write round ``round_``'s checkpoint into."""
        tmp = self.ckpt_root / f".tmp-round_{round_:05d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit_checkpoint(self, tmp: Path, round_: int, driver_state: dict[str, Any]) -> Path:
        """Write the driver state and the COMPLETE marker, then rename into place atomically.

        The marker holds a manifest (size and SHA-256 of every file) that ``verify_checkpoint``
        checks before a resume starts any actor.
        """
        (tmp / "driver.json").write_text(json.dumps(driver_state, indent=1))
        _fsync_dir(tmp)
        return self.seal_checkpoint(tmp, round_)

    def seal_checkpoint(self, tmp: Path, round_: int) -> Path:
        """Every file of ``tmp`` is written: add the manifest and rename it into place."""
        manifest = {"round": round_, "files": _manifest(tmp)}
        marker = tmp / COMPLETE
        marker.write_text(json.dumps(manifest, indent=1))
        _fsync_dir(tmp)
        final = self.ckpt_root / f"round_{round_:05d}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        return final

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint whose COMPLETE marker exists, or None."""
        return latest_complete(self.ckpt_root)


def latest_complete(ckpt_root: Path) -> Path | None:
    """The newest ``round_*`` checkpoint under ``ckpt_root`` with its COMPLETE marker, or None."""
    done = sorted(p for p in ckpt_root.glob("round_*") if (p / COMPLETE).exists())
    return done[-1] if done else None


def verify_checkpoint(ckpt: Path) -> None:
    """Raise ``ConfigError`` naming the file if any file of ``ckpt`` differs from its manifest."""
    try:
        manifest = json.loads((ckpt / COMPLETE).read_text())
        files: dict[str, list[Any]] = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"checkpoint {ckpt}: unreadable {COMPLETE} manifest ({exc})") from exc
    for rel, (size, digest) in files.items():
        path = ckpt / rel
        if not path.is_file():
            raise ConfigError(f"checkpoint file {path} is missing; {_DELETE_HINT}")
        if path.stat().st_size != size or sha256_file(path) != digest:
            raise ConfigError(f"checkpoint file {path} is corrupted (checksum); {_DELETE_HINT}")


_DELETE_HINT = (
    "delete that checkpoint directory to resume from the previous one, or start a new run"
)


def _manifest(root: Path) -> dict[str, list[Any]]:
    return {
        str(p.relative_to(root)): [p.stat().st_size, sha256_file(p)]
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _round_of(line: str) -> int:
    return int(json.loads(line)["round"])


def read_driver_state(ckpt: Path) -> dict[str, Any]:
    """The driver state of a complete checkpoint, with a clear error if it is damaged."""
    try:
        state: dict[str, Any] = json.loads((ckpt / "driver.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"checkpoint {ckpt} is damaged ({exc}); delete it to resume from the previous one"
        ) from exc
    return state


def _run_identity(cfg: RunConfig) -> dict[str, Any]:
    """The parts of a config that must match to resume (not rounds, intervals or the service)."""
    d = cfg.model_dump(mode="json")
    for key in ("train", "service", "eval", "runs_dir"):
        d.pop(key, None)
    return d


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(path.read_text())
    return data if isinstance(data, dict) else {}


def _fsync_dir(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
