"""``elborl train`` on a real model family: a tiny random SD3.5 pipeline saved in the
diffusers format, loaded from ``model.path``, trained with LoRA through real Ray actors and
DeepSpeed, checkpointed and resumed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.e2e.helpers import metrics, run_train, tiny_config
from tests.fixtures.tiny_models import save_tiny_sd3

pytestmark = pytest.mark.e2e


def _sd3_config(tmp: Path, model_dir: Path, rounds: int, **extra: dict[str, Any]) -> Path:
    return tiny_config(
        tmp,
        model={"kind": "sd3", "path": str(model_dir), "checkpoint": None, "lora": {"rank": 4}},
        world={"image_size": 32},
        # A reward that varies on a random model (the shapes verifier would give all zeros).
        rewards={"functions": [{"name": "jpeg_compressibility"}]},
        rollout={"prompts_per_round": 2},
        eval={"max_prompts": 4},
        train={"rounds": rounds, "eval_every": 2, "checkpoint_every": 1, "sample_grid_every": 2},
        **extra,
    )


def test_two_rounds_of_lora_on_a_tiny_sd35_then_resume(tmp_path: Path) -> None:
    model_dir = save_tiny_sd3(tmp_path / "tiny-sd35", variant="sd35")
    out = run_train(["--config", str(_sd3_config(tmp_path, model_dir, rounds=2))], timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    run = tmp_path / "runs" / "t"
    rounds = metrics(run)
    assert [r["round"] for r in rounds] == [1, 2]
    for i, r in enumerate(rounds, start=1):
        assert r["rollout/images"] == 8 and r["perf/samples_trained_total"] == 8 * i
        assert r["rollout/version"] == i - 1 and r["weights/version"] == i
        # Only the adapters are published: the 8 targets x 2 blocks x (A, B) of rank 4.
        assert 0 < r["weights/bytes"] < 1e6
        assert math.isfinite(r["learner/loss"]) and math.isfinite(r["learner/improvement"])
    ckpt = run / "checkpoints" / "round_00002"
    assert (ckpt / "COMPLETE").exists()
    # LoRA-only run checkpoints: the frozen base transformer is not written again.
    # LoRA-only run checkpoints: of the transformer's parameters only the adapters are
    # written (DeepSpeed keeps the module's buffers), and the old policy likewise.
    extra = torch.load(ckpt / "learner" / "learner_extra.pt", weights_only=True)
    assert extra["old"] and all("lora_" in k for k in extra["old"])
    (states,) = (ckpt / "learner" / "deepspeed").rglob("*model_states.pt")
    saved = torch.load(states, weights_only=False)
    params = [k for k in saved["module"] if k not in set(saved["buffer_names"])]
    assert params and all("lora_" in k for k in params)

    resumed = run_train(
        ["--config", str(_sd3_config(tmp_path, model_dir, rounds=3)), "--resume"], timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    rounds = metrics(run)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[-1]["weights/version"] == 3 and rounds[-1]["rollout/version"] == 2
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished"


def test_an_incomplete_model_directory_fails_before_any_actor_starts(tmp_path: Path) -> None:
    model_dir = save_tiny_sd3(tmp_path / "tiny-sd3")
    for f in (model_dir / "vae").glob("*.safetensors"):
        f.unlink()
    out = run_train(["--config", str(_sd3_config(tmp_path, model_dir, rounds=1))], timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "vae/*.safetensors" in out.stderr and "model.path" in out.stderr
    assert "Started a local Ray instance" not in out.stderr
    assert not (tmp_path / "runs" / "t").exists()
