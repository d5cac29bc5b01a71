"""The tiny policy, its save/load, guidance, and seeded generation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from policy.base import guided_fn, images_to_unit, unit_to_images
from policy.io import load_policy, save_policy
from rollout.generate import generate, initial_noise
from services.config import SamplingConfig
from tests.conftest import build_tiny
from worlds.shapes.world import ShapesWorld

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def policy() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_tiny(32, {"channels": (16, 32), "text_dim": 32, "text_layers": 1}).eval()


def test_forward_shape_and_conditioning(policy) -> None:
    x = torch.randn(3, 3, 32, 32)
    cond = policy.encode_prompts(["two red circles", "a blue square left of a red circle", ""])
    v = policy(x, torch.rand(3), cond)
    assert v.shape == x.shape and torch.isfinite(v).all()
    # Different prompts give different predictions for the same input.
    same_x = x[:1].expand(2, -1, -1, -1)
    v2 = policy(
        same_x,
        torch.full((2,), 0.5),
        policy.encode_prompts(["two red circles", "four cyan squares"]),
    )
    assert not torch.allclose(v2[0], v2[1])


def test_tokenizer_covers_the_grammar(policy) -> None:
    ids = policy.tokenizer(["Two RED circles", "zebra"])
    assert ids[0, 1:4].ne(2).all()  # no <unk> for grammar words, case-insensitive
    assert ids[1, 1] == 2  # unknown word -> <unk>
    assert {"circles", "left", "above", "four"} <= set(ShapesWorld().vocabulary())


def test_save_load_round_trip(policy, tmp_path: Path) -> None:
    save_policy(policy, tmp_path, {"note": "test"})
    again = load_policy(tmp_path)
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    c = policy.encode_prompts(["one green triangle", "two red circles"])
    torch.testing.assert_close(
        policy(x, t, c),
        again(x, t, again.encode_prompts(["one green triangle", "two red circles"])),
    )


def test_load_errors_name_the_problem(policy, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a saved policy"):
        load_policy(tmp_path)
    save_policy(policy, tmp_path, {})
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read weights"):
        load_policy(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupted"):
        load_policy(tmp_path)


def test_guidance_combines_cond_and_uncond(policy) -> None:
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    c, u = policy.encode_prompts(["two red circles"] * 2), policy.encode_prompts([""] * 2)
    vc, vu = policy(x, t, c), policy(x, t, u)
    torch.testing.assert_close(
        guided_fn(policy, c, u, 3.0)(x, t), vu + 3.0 * (vc - vu), rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(guided_fn(policy, c, u, 1.0)(x, t), vc)


def test_image_conversion_round_trip() -> None:
    imgs = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(unit_to_images(images_to_unit(imgs)), imgs)


def test_generation_is_seeded_and_batch_independent(policy) -> None:
    prompts = ["two red circles", "one blue square", "three cyan triangles"]
    cfg = SamplingConfig(sampler="euler", num_steps=3)
    a = generate(policy, prompts, cfg, seed=5, batch_size=3)
    b = generate(policy, prompts, cfg, seed=5, batch_size=2)
    c = generate(policy, prompts, cfg, seed=6, batch_size=3)
    torch.testing.assert_close(a.x0, b.x0, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a.x0, c.x0)
    assert a.images.shape == (3, 32, 32, 3) and a.images.dtype == np.uint8
    torch.testing.assert_close(initial_noise((2, 2), 3, 1)[2], initial_noise((2, 2), 5, 1)[2])


def test_sde_generation_keeps_trajectory(policy) -> None:
    out = generate(
        policy,
        ["two red circles"] * 2,
        SamplingConfig(sampler="sde", num_steps=4),
        seed=0,
        keep_trajectory=True,
    )
    assert out.trajectory is not None and out.trajectory.shape == (2, 5, 3, 32, 32)
    assert out.log_probs is not None and out.log_probs.shape == (2, 4)
