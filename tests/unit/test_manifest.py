"""The run manifest (``services/manifest.py``): versions, git state, config and model hashes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from services.config import load_config
from services.manifest import model_files, write_manifest

pytestmark = pytest.mark.unit


def test_model_files_are_hashed_once_and_cached_by_size_and_mtime(tmp_path: Path) -> None:
    model = tmp_path / "model"
    (model / "vae").mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    (model / "vae" / "w.safetensors").write_bytes(b"x" * 1000)
    cfg = load_config(None, ["model.kind=sd3", f"model.path={model}"])
    cache = tmp_path / "cache.json"
    first = model_files(cfg, cache)
    assert first["files"]["vae/w.safetensors"] == {
        "bytes": 1000,
        "sha256": hashlib.sha256(b"x" * 1000).hexdigest(),
    }
    # A second look reads the cache (here doctored, to show it is what answers).
    doctored = {k: "cached" for k in json.loads(cache.read_text())}
    cache.write_text(json.dumps(doctored))
    assert {f["sha256"] for f in model_files(cfg, cache)["files"].values()} == {"cached"}
    (model / "model_index.json").write_text('{"changed": 1}')  # new size and mtime: re-hashed
    again = model_files(cfg, cache)["files"]["model_index.json"]["sha256"]
    assert again == hashlib.sha256(b'{"changed": 1}').hexdigest()


def test_each_start_of_a_run_appends_an_entry(tmp_path: Path) -> None:
    cfg = load_config(None, [f"runs_dir={tmp_path}", "seed=5"])
    run = tmp_path / "run"
    run.mkdir()
    write_manifest(run, cfg, resume=False, cluster={"resources": {"CPU": 2.0}})
    write_manifest(run, cfg, resume=True, cluster={})
    starts = json.loads((run / "manifest.json").read_text())["starts"]
    assert [s["resume"] for s in starts] == [False, True]
    first = starts[0]
    assert first["seed"] == 5 and first["packages"]["torch"] and first["cluster"]["resources"]
    assert len(first["config_sha256"]) == 64 and "commit" in first["git"]
    assert first["model"]["files"]  # the shipped base's config.json and weights
