"""The real ``elborl`` entry point as a subprocess: help, config errors, eval of the base model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BASE_CHECKPOINT, REPO, SHIPPED_BASE

pytestmark = pytest.mark.e2e


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


@pytest.mark.parametrize("sub", [[], ["pretrain"], ["eval"], ["train"], ["config"]])
def test_help(sub: list[str]) -> None:
    out = _run([*sub, "--help"], timeout=30)
    assert out.returncode == 0, out.stderr
    assert "usage: elborl" in out.stdout
    if not sub:
        for name in ("pretrain", "train", "eval"):
            assert name in out.stdout


# Each bad config must be rejected before Ray/diffusers/DeepSpeed are imported, which is what
# keeps the exit fast (torch is imported: the registries of named choices live beside their
# math); the probe asserts that directly.
PROBE = (
    "import sys; from services.cli import main; rc = main(sys.argv[1:]); "
    "heavy = [m for m in ('ray', 'diffusers', 'deepspeed') if m in sys.modules]; "
    "assert not heavy, heavy; sys.exit(rc)"
)


@pytest.mark.parametrize(
    ("yaml_text", "sets", "needle"),
    [
        ("learner:\n  lr: 1e-4\n  lrate: 2\n", [], "learner.lrate (line 3): unknown key"),
        ("rollout:\n  images_per_prompt: many\n", [], "rollout.images_per_prompt (line 2)"),
        ("rollout: {prompts_per_round: 3, images_per_prompt: 5}\n", [], "learner.microbatch_size"),
        ("seed: 0\n", ["learner.num_workers=0"], "learner.num_workers"),
    ],
    ids=["unknown-key", "wrong-type", "impossible-sizes", "bad-override"],
)
@pytest.mark.parametrize("command", ["train", "pretrain", "eval"])
def test_bad_config_fails_fast(
    tmp_path: Path, yaml_text: str, sets: list[str], needle: str, command: str
) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    args = [command, "--config", str(cfg), *(f"--set={s}" for s in sets)]
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=20, cwd=REPO
    )
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert str(cfg) in out.stderr and needle in out.stderr, out.stderr


def test_eval_base_model_json() -> None:
    if not (SHIPPED_BASE / "model.safetensors").exists():
        pytest.fail(f"the shipped base checkpoint {SHIPPED_BASE} is missing")
    args = ["eval", "--checkpoint", str(SHIPPED_BASE), "--max-prompts", "12", "--json"]
    fast = ["--set", "eval.sampling.num_steps=8", "--set", "eval.images_per_category=8"]
    out = _run([*args, "--pass-k", "2", *fast])
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # The held-out prompts take the six categories in turn: 12 prompts are two of each, and
    # each gets max(2 k, 8 images per category / 2 prompts) = 4 images.
    assert result["num_prompts"] == 12 and result["num_images"] == 12 * 4
    assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["mean_reward"] <= 1.0
    assert set(result["clause_accuracy"]) <= {"colour", "shape", "count", "position"}
    cats = result["category_accuracy"]
    assert len(cats) == 6 and result["overall"] == pytest.approx(sum(cats.values()) / 6)
    table = result["pass_at_k"]
    assert table["k"] == 2 and set(table["categories"]) == set(cats)
    for row in table["categories"].values():
        assert 0.0 <= row["pass@1"] <= row["pass@2"] <= 1.0


def test_eval_table_and_grid(tmp_path: Path) -> None:
    grid = tmp_path / "grid.png"
    out = _run(
        ["eval", "--checkpoint", str(BASE_CHECKPOINT), "--max-prompts", "4", "--grid", str(grid)]
    )
    assert out.returncode == 0, out.stderr
    assert "accuracy" in out.stdout and grid.stat().st_size > 1000


def test_eval_bad_prompts_file(tmp_path: Path) -> None:
    bad = tmp_path / "prompts.txt"
    bad.write_text("two red circles\nthree green hexagons\n")
    out = _run(["eval", "--checkpoint", str(BASE_CHECKPOINT), "--prompts", str(bad)], timeout=60)
    assert out.returncode == 2
    assert f"{bad}:2" in out.stderr


def test_eval_missing_checkpoint(tmp_path: Path) -> None:
    out = _run(["eval", "--checkpoint", str(tmp_path / "none")], timeout=60)
    assert out.returncode == 2 and "not a saved policy" in out.stderr


def test_eval_with_rewards_on_a_real_model_and_a_free_text_prompt_file(tmp_path: Path) -> None:
    """``elborl eval --rewards``: a tiny SD3.5 from its diffusers directory, prompts no
    grammar parses, each configured reward's mean, a grid; a bad prompt file is named."""
    import yaml

    from tests.fixtures.tiny_models import save_tiny_sd3

    model_dir = save_tiny_sd3(tmp_path / "sd35", "sd35")
    config = tmp_path / "eval.yaml"
    rewards = [{"name": "jpeg_compressibility"}, {"name": "jpeg_incompressibility", "weight": 0.5}]
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"kind": "sd3", "path": str(model_dir)},
                "world": {"image_size": 32},
                "rewards": {"functions": rewards},
                "eval": {"images_per_prompt": 2, "sampling": {"sampler": "euler", "num_steps": 3}},
            }
        )
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# evaluation prompts\na photo of a cat\n\nan astronaut riding a horse\n")
    grid = tmp_path / "grid.png"
    base = ["eval", "--config", str(config), "--rewards", "--prompts", str(prompts)]
    out = _run([*base, "--json", "--grid", str(grid)], timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["num_prompts"] == 2 and result["num_images"] == 4
    assert set(result["rewards"]) == {"jpeg_compressibility", "jpeg_incompressibility"}
    for row in result["rewards"].values():
        assert row["valid"] == 1.0 and row["std"] >= 0.0
    means = {name: row["mean"] for name, row in result["rewards"].items()}
    expected = means["jpeg_compressibility"] + 0.5 * means["jpeg_incompressibility"]
    assert result["total"] == pytest.approx(expected, rel=1e-6)
    assert grid.stat().st_size > 1000
    table = _run(base, timeout=300)
    assert table.returncode == 0 and "jpeg_compressibility" in table.stdout, table.stderr
    prompts.write_text("# only a comment\n")
    empty = _run(base, timeout=300)
    assert empty.returncode == 2 and "holds no prompt" in empty.stderr, empty.stderr
