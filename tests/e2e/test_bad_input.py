"""Bad input files for ``elborl train``: a clear error naming the file (and line) before any
Ray actor starts, exit status 2, and nothing in a run directory written or overwritten."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import BASE_CHECKPOINT
from tests.e2e.helpers import run_train, tiny_config

pytestmark = pytest.mark.e2e


def _snapshot(root: Path) -> dict[str, tuple[str, float]]:
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _refused(args: list[str], *needles: str) -> str:
    out = run_train(args, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    for ray_started in ("Started a local Ray instance", "Connected to Ray cluster"):
        assert ray_started not in out.stderr  # refused before Ray started or was joined
    for needle in needles:
        assert needle in out.stderr, (needle, out.stderr[-2000:])
    return out.stderr


def _bad_prompt_file(tmp_path: Path, kind: str) -> tuple[Path, str]:
    path = tmp_path / f"{kind}.txt"
    if kind == "empty":
        path.write_text("# nothing but a comment\n\n")
        return path, "has no prompts"
    if kind == "binary":
        path.write_bytes(b"a red circle\n\x00\xff\xfe\x89PNG\x00\x00")
        return path, str(path)
    path.write_text("a red circle\n" + "a blue square " * 200 + "\n")
    return path, f"{path}:2: line is"


@pytest.mark.parametrize("kind", ["empty", "binary", "long"])
def test_bad_prompt_files_are_named_before_anything_starts(tmp_path: Path, kind: str) -> None:
    prompts, needle = _bad_prompt_file(tmp_path, kind)
    cfg = tiny_config(tmp_path, world={"train_prompts": str(prompts)})
    _refused(["--config", str(cfg)], needle, "world.train_prompts")
    assert not (tmp_path / "runs" / "t").exists()


def test_malformed_yaml_and_unknown_keys_name_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nrollout:\n  prompts_per_round: [1, 2\n")
    _refused(["--config", str(bad)], str(bad), "line 3")
    typo = tiny_config(tmp_path, name="typo", learner={"lr_rate": 1e-4})
    _refused(["--config", str(typo)], str(typo), "learner.lr_rate")


def test_a_model_checkpoint_from_another_config_or_corrupted_is_named(tmp_path: Path) -> None:
    other = tmp_path / "other-ckpt"
    shutil.copytree(BASE_CHECKPOINT, other)
    meta = json.loads((other / "config.json").read_text())
    meta["image_size"] = 16
    (other / "config.json").write_text(json.dumps(meta))
    cfg = tiny_config(tmp_path, name="a", model={"checkpoint": str(other)})
    _refused(["--config", str(cfg)], str(other), "16px", "world.image_size = 32")

    broken = tmp_path / "broken-ckpt"
    shutil.copytree(BASE_CHECKPOINT, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    cfg = tiny_config(tmp_path, name="b", model={"checkpoint": str(broken)})
    _refused(["--config", str(cfg)], str(broken), "model.checkpoint")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_resume_refuses_a_corrupted_or_foreign_checkpoint_and_touches_nothing(
    tmp_path: Path,
) -> None:
    cfg = tiny_config(tmp_path, name="r", train={"rounds": 1, "eval_every": 0})
    assert run_train(["--config", str(cfg)]).returncode == 0
    run = tmp_path / "runs" / "r"
    extra = run / "checkpoints" / "round_00001" / "learner" / "learner_extra.pt"
    data = bytearray(extra.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, different content
    extra.write_bytes(bytes(data))
    before = _snapshot(run)
    _refused(["--config", str(cfg), "--resume"], str(extra), "corrupted")
    assert _snapshot(run) == before

    foreign = yaml.safe_load(cfg.read_text())
    foreign["learner"].update(loss="grpo", advantage="standard")
    other = tmp_path / "foreign.yaml"
    other.write_text(yaml.safe_dump(foreign))
    _refused(["--config", str(other), "--resume"], str(run / "config.yaml"), "different run")
    assert _snapshot(run) == before
