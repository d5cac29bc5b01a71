"""Pretraining of the base policy: the learning-rate schedule, prompt balance, a few real steps."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from policy.config import PretrainConfig
from policy.pretrain import learning_rate, pretrain
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
