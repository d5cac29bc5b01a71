"""Pretraining of the base policy: the learning-rate schedule, prompt balance, a few real steps."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from policy.config import PretrainConfig
from policy.pretrain import Snapshots, learning_rate, pretrain
from tests.conftest import build_tiny
from worlds.shapes.grammar import all_prompts
from worlds.shapes.world import ShapesConfig, ShapesWorld

pytestmark = pytest.mark.unit


def test_constant_schedule_is_warmup_then_flat() -> None:
    cfg = PretrainConfig(lr=1e-3, warmup_steps=10, steps=100)
    assert learning_rate(cfg, 0) == pytest.approx(1e-4)
    assert learning_rate(cfg, 9) == pytest.approx(1e-3)
    assert learning_rate(cfg, 99) == pytest.approx(1e-3)


def test_cosine_schedule_decays_from_lr_to_the_floor() -> None:
    cfg = PretrainConfig(
        lr=1e-3, warmup_steps=10, steps=110, lr_schedule="cosine", min_lr_ratio=0.1
    )
    assert learning_rate(cfg, 4) == pytest.approx(5e-4)  # still warming up
    assert learning_rate(cfg, 10) == pytest.approx(1e-3)  # cosine starts at the peak
    assert learning_rate(cfg, 60) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half way
    assert learning_rate(cfg, 110) == pytest.approx(1e-4)  # the floor, and no further
    lrs = [learning_rate(cfg, s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_pretraining_captions_are_noisy_but_images_follow_the_true_prompts() -> None:
    world = ShapesWorld(ShapesConfig(caption_noise=0.5))
    prompts = world.prompts("pretrain")
    captions, images = world.pretraining_batch(prompts, 256, np.random.default_rng(0))
    assert images.shape == (256, 32, 32, 3) and len(captions) == 256
    passed = [v.passed for v in world.verify(images, captions)]
    # About half the captions were corrupted in a detail the verifier checks (a dropped detail
    # may still pass), the rest describe their image exactly.
    assert 0.4 < float(np.mean(passed)) < 0.8


def test_a_few_real_steps_change_the_weights_and_return_a_frozen_ema_copy() -> None:
    torch.manual_seed(0)
    policy = build_tiny(32, {"channels": (16, 32), "text_dim": 32, "text_layers": 1})
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    cfg = PretrainConfig(
        steps=6, batch_size=8, lr=1e-3, warmup_steps=2, lr_schedule="cosine", eval_every=0
    )
    prompts = [p.text for p in all_prompts()[:50]]
    ema, state = pretrain(policy, ShapesWorld(), prompts, cfg, seed=0)
    assert state.step == 6 and math.isfinite(state.loss_ema)
    trained = policy.state_dict()
    assert any(not torch.equal(before[k], trained[k]) for k in before)
    assert ema is not policy
    assert not any(p.requires_grad for p in ema.parameters())


class _CrashingWorld(ShapesWorld):
    """A world whose pretraining data source dies on its ``fail_at``-th batch (0-based)."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.calls, self.fail_at = 0, fail_at

    def pretraining_batch(
        self, prompts: Sequence[str], n: int, rng: np.random.Generator
    ) -> tuple[list[str], np.ndarray]:
        if self.calls == self.fail_at:
            raise RuntimeError("data source died")
        self.calls += 1
        return super().pretraining_batch(prompts, n, rng)


def _tiny_run(
    world: ShapesWorld, tmp_path: Path, fingerprint: str = "a", max_minutes: float | None = None
) -> tuple[dict, int]:
    torch.manual_seed(0)
    policy = build_tiny(32, {"channels": (16, 32), "text_dim": 32, "text_layers": 1})
    cfg = PretrainConfig(
        steps=6,
        batch_size=4,
        warmup_steps=2,
        lr_schedule="cosine",
        eval_every=0,
        snapshot_every=2,
        max_minutes=max_minutes,
    )
    prompts = [p.text for p in all_prompts()[:50]]
    snaps = Snapshots(path=tmp_path / "snap", fingerprint=fingerprint)
    ema, state = pretrain(policy, world, prompts, cfg, seed=0, snapshots=snaps)
    return ema.state_dict(), state.step


def test_an_interrupted_pretraining_resumes_to_the_same_weights(tmp_path: Path) -> None:
    straight, _ = _tiny_run(ShapesWorld(), tmp_path / "straight")
    with pytest.raises(RuntimeError, match="data source died"):
        _tiny_run(_CrashingWorld(fail_at=3), tmp_path / "resumed")  # dies in step 4
    assert (tmp_path / "resumed" / "snap" / "snapshot.pt").exists()  # the one of step 2
    resumed, steps = _tiny_run(ShapesWorld(), tmp_path / "resumed")
    assert steps == 6
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_run_stopped_by_its_time_budget_continues_with_a_larger_one(tmp_path: Path) -> None:
    straight, _ = _tiny_run(ShapesWorld(), tmp_path / "straight")
    _, steps = _tiny_run(ShapesWorld(), tmp_path / "budget", max_minutes=1e-9)  # 1 step
    assert steps == 1 and (tmp_path / "budget" / "snap" / "snapshot.pt").exists()
    resumed, steps = _tiny_run(ShapesWorld(), tmp_path / "budget", max_minutes=None)
    assert steps == 6
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_snapshot_made_with_other_settings_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        _tiny_run(_CrashingWorld(fail_at=3), tmp_path)
    with pytest.raises(ValueError, match=r"other settings.*--fresh"):
        _tiny_run(ShapesWorld(), tmp_path, fingerprint="b")
