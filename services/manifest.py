"""The run manifest: what a run was made with, so that its results can be traced and redone.

``manifest.json`` in the run directory gets one entry per start of the run (the first and
every ``--resume``): package versions, the git commit of the code (and whether the tree had
uncommitted changes), the SHA-256 of the resolved config, the size and SHA-256 of every file
of the model's weights (``model.path`` or ``model.checkpoint``), the seed, and the devices of
the driver's machine and the Ray cluster's resources. Hashes of large weight files are cached
by (path, size, mtime) under the runs root, so a resume does not re-read 20 GB.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from services.config import RunConfig, config_to_yaml
from services.run import sha256_file

PACKAGES = (
    "elborl",
    "torch",
    "ray",
    "deepspeed",
    "diffusers",
    "transformers",
    "peft",
    "pydantic",
    "numpy",
)
HASH_CACHE = ".elborl-hash-cache.json"


def write_manifest(run_path: Path, cfg: RunConfig, resume: bool, cluster: dict[str, Any]) -> Path:
    """Append this start's entry to ``run_path/manifest.json`` (written atomically)."""
    path = run_path / "manifest.json"
    entries: list[dict[str, Any]] = []
    if path.is_file():
        try:
            entries = list(json.loads(path.read_text()).get("starts", []))
        except (json.JSONDecodeError, AttributeError):
            entries = []  # a damaged manifest is replaced, not fatal to the run
    entries.append(
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "resume": resume,
            "packages": package_versions(),
            "git": git_state(Path(__file__).resolve().parent.parent),
            "python": platform.python_version(),
            "config_sha256": hashlib.sha256(config_to_yaml(cfg).encode()).hexdigest(),
            "seed": cfg.seed,
            "model": model_files(cfg, cfg.runs_root() / HASH_CACHE),
            "devices": devices(),
            "cluster": cluster,
        }
    )
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"starts": entries}, indent=1))
    tmp.replace(path)
    return path


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state(root: Path) -> dict[str, Any]:
    """``{"commit", "dirty"}`` of the code's checkout, or ``{"commit": None}`` outside one."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status)}


def model_files(cfg: RunConfig, cache_path: Path) -> dict[str, Any]:
    """Size and SHA-256 of every file of the model's directory (``model.path`` or
    ``model.checkpoint``), relative paths as keys."""
    where = cfg.model.path or cfg.model.checkpoint
    if not where or not Path(where).is_dir():
        return {"directory": where, "files": {}}
    root = Path(where).resolve()
    cache = _read_cache(cache_path)
    files: dict[str, dict[str, Any]] = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = f.stat()
        key = f"{f}:{stat.st_size}:{stat.st_mtime_ns}"
        if key not in cache:
            cache[key] = sha256_file(f)
        files[str(f.relative_to(root))] = {"bytes": stat.st_size, "sha256": cache[key]}
    _write_cache(cache_path, cache)
    return {"directory": str(root), "files": files}


def devices() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cuda": torch.version.cuda if cuda else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda
        else [],
    }


def _read_cache(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, cache: dict[str, str]) -> None:
    try:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(path)
    except OSError:
        pass  # a read-only runs root only costs the next start a re-hash
