"""The Flow-GRPO trajectory baseline (learner/trajectory.py): rescoring stored SDE rollouts and the
clipped loss over steps. (The SDE step's own density is tested in test_samplers.py.)"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

from algo.losses import GlobalNormalizer
from algo.samplers import sample
from algo.trajectory import (
    flow_grpo_loss,
    flow_grpo_microbatch_loss,
    gather_steps,
    sde_mean_kl,
    trajectory_log_probs,
)

pytestmark = pytest.mark.unit

SHAPE = (4, 2, 3, 3)  # (B, C, H, W)


class TinyVelocity(nn.Module):
    """v = W flat(x) (1 + t) + cond @ U: a conditional velocity with parameters to differentiate."""

    def __init__(self, dim: int, cond_dim: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(dim, dim, generator=gen, dtype=torch.float64) / dim)
        self.u = nn.Parameter(torch.randn(cond_dim, dim, generator=gen, dtype=torch.float64))

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1) @ self.w * (1 + t.view(-1, 1)) + cond @ self.u
        return flat.view_as(x)


def _rollout(model: TinyVelocity, cond: Tensor, sde_steps: int | None = None):
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        return sample(
            lambda x, t: model(x, t, cond),
            noise,
            sampler="sde",
            num_steps=6,
            eta=0.7,
            generator=gen,
            sde_steps=sde_steps,
        )


def _setup() -> tuple[TinyVelocity, Tensor]:
    cond = torch.randn(SHAPE[0], 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return TinyVelocity(18, 5, seed=0), cond


def test_rescoring_a_rollout_with_its_own_weights_gives_the_stored_log_probs() -> None:
    model, cond = _setup()
    out = _rollout(model, cond)
    assert out.trajectory is not None and out.log_probs is not None
    with torch.no_grad():
        log_probs = trajectory_log_probs(model, out.trajectory, out.timesteps, cond)
    torch.testing.assert_close(log_probs, out.log_probs)
    # per-row shuffled steps (the official per-sample time permutation)
    gen = torch.Generator().manual_seed(3)
    idx = torch.stack([torch.randperm(6, generator=gen)[:4] for _ in range(SHAPE[0])])
    with torch.no_grad():
        picked = trajectory_log_probs(model, out.trajectory, out.timesteps, cond, step_indices=idx)
    torch.testing.assert_close(picked, out.log_probs.gather(1, idx))


def test_partial_sde_rollouts_rescore_their_stochastic_steps() -> None:
    model, cond = _setup()
    out = _rollout(model, cond, sde_steps=3)
    assert out.trajectory is not None and out.log_probs is not None
    idx = torch.arange(3).expand(SHAPE[0], -1)
    with torch.no_grad():
        log_probs = trajectory_log_probs(
            model, out.trajectory, out.timesteps, cond, step_indices=idx
        )
    torch.testing.assert_close(log_probs, out.log_probs)


def test_flow_grpo_loss_hand_values_and_clipping() -> None:
    lp = torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([-1.0, -2.5, -2.5], dtype=torch.float64)
    adv = torch.tensor([2.0, 1.0, -9.0], dtype=torch.float64)
    normalizer = GlobalNormalizer(num_samples=3, num_timesteps=2)
    loss, metrics = flow_grpo_loss(lp, old, adv, normalizer)
    # pair 0: r = 1 -> -A r = -2 (inside the trust region, gradient -A);
    # pair 1: r = e^0.5 > 1.001 with A > 0 -> clipped: -1 * 1.001, no gradient;
    # pair 2: A = -9 clamped to -5, r = e^-0.5 < 0.999 -> max(5 e^-0.5, 5 * 0.999) = 4.995.
    assert 5.0 * math.exp(-0.5) < 5.0 * 0.999
    assert loss.item() == pytest.approx((-2.0 - 1.001 + 4.995) / 6)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([-2.0, 0.0, 0.0], dtype=torch.float64) / 6)
    assert metrics["learner/clip_frac"] == pytest.approx(2 / 3)


def test_flow_grpo_gradient_at_ratio_one_is_reinforce_on_step_log_probs() -> None:
    model, cond = _setup()
    out = _rollout(model, cond)
    assert out.trajectory is not None and out.log_probs is not None
    adv = torch.tensor([1.0, -0.5, 0.25, 2.0], dtype=torch.float64)
    step = torch.tensor([0, 2, 5, 3])
    normalizer = GlobalNormalizer(num_samples=4, num_timesteps=6)
    loss, metrics = flow_grpo_microbatch_loss(
        model, None, out.trajectory, out.timesteps, out.log_probs, step, cond, adv, normalizer
    )
    loss.backward()
    assert metrics["learner/ratio_mean"] == pytest.approx(1.0)
    got = [torch.clone(p.grad) for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    lp = trajectory_log_probs(
        model, out.trajectory, out.timesteps, cond, step_indices=step.view(-1, 1)
    )[:, 0]
    (-(adv * lp).sum() / normalizer.num_pairs).backward()
    for g, p in zip(got, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)


def test_kl_to_the_reference_is_zero_for_itself_and_matches_the_formula() -> None:
    model, cond = _setup()
    out = _rollout(model, cond)
    assert out.trajectory is not None and out.log_probs is not None
    adv = torch.zeros(SHAPE[0], dtype=torch.float64)
    step = torch.tensor([1, 1, 4, 0])
    normalizer = GlobalNormalizer(num_samples=4, num_timesteps=1)
    _, same = flow_grpo_microbatch_loss(
        model,
        copy.deepcopy(model),
        out.trajectory,
        out.timesteps,
        out.log_probs,
        step,
        cond,
        adv,
        normalizer,
        beta=0.5,
    )
    assert same["learner/kl_mean"] == pytest.approx(0.0, abs=1e-20)
    ref = TinyVelocity(18, 5, seed=9)
    loss, metrics = flow_grpo_microbatch_loss(
        model,
        ref,
        out.trajectory,
        out.timesteps,
        out.log_probs,
        step,
        cond,
        adv,
        normalizer,
        beta=0.5,
    )
    assert metrics["learner/kl_mean"] > 0
    assert loss.item() == pytest.approx(0.5 * metrics["learner/kl_mean"] * 4 / 4)
    mean, ref_mean, std = torch.zeros(2, 3), torch.ones(2, 3), torch.full((2, 1), 2.0)
    torch.testing.assert_close(sde_mean_kl(mean, ref_mean, std), torch.full((2,), 1 / 8))


def test_argument_errors() -> None:
    traj, sigmas = torch.zeros(2, 4, 3), torch.linspace(1, 0, 4)
    with pytest.raises(ValueError, match="step_index must lie"):
        gather_steps(traj, sigmas, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="int64"):
        gather_steps(traj, sigmas, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="sigmas"):
        gather_steps(traj, sigmas[:3], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="kl must be given"):
        flow_grpo_loss(
            torch.zeros(2), torch.zeros(2), torch.zeros(2), GlobalNormalizer(2, 1), beta=0.1
        )
    model, cond = _setup()
    with pytest.raises(ValueError, match="ref_model"):
        flow_grpo_microbatch_loss(
            model,
            model,
            torch.zeros(4, 7, *SHAPE[1:]),
            torch.linspace(1, 0, 7),
            torch.zeros(4, 6),
            torch.zeros(4, dtype=torch.long),
            cond,
            torch.zeros(4),
            GlobalNormalizer(4, 1),
        )
