"""The microbatch reference loss (learner/microbatch.py): shared draws, the three passes, and the
normalisation contract (split over 2 simulated ranks x 2 microbatches == the whole batch ==
the mean over all (sample, timestep) pairs)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from algo.elbo import CosineVpSchedule, ElboOutput, NoiseDraw, VpSchedule, flow_elbo, vp_elbo
from algo.losses import (
    GlobalNormalizer,
    LossConfig,
    girsanov_kl_per_pair,
    policy_loss_per_pair,
)
from algo.microbatch import accumulate_microbatch, make_noise_draw, microbatch_loss

pytestmark = pytest.mark.unit

B, K, COND = 8, 3, 5
SHAPE = (B, 2, 3, 3)


class TinyModel(nn.Module):
    """pred = W flat(x) (1 + t) + cond @ U, in float64."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        dim = 18
        self.w = nn.Parameter(torch.randn(dim, dim, generator=gen, dtype=torch.float64) / dim)
        self.u = nn.Parameter(torch.randn(COND, dim, generator=gen, dtype=torch.float64))

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return (x.reshape(x.shape[0], -1) @ self.w * (1 + t.view(-1, 1)) + cond @ self.u).view_as(x)


def _perturbed(model: TinyModel, scale: float, seed: int) -> TinyModel:
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return other


def _batch() -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(11)
    return {
        "x0": torch.randn(SHAPE, generator=gen, dtype=torch.float64),
        "cond": torch.randn(B, COND, generator=gen, dtype=torch.float64),
        "adv": torch.randn(B, generator=gen, dtype=torch.float64),
        "t": 0.05 + 0.9 * torch.rand(B, K, generator=gen, dtype=torch.float64),
        "noise": torch.randn(B, K, *SHAPE[1:], generator=gen, dtype=torch.float64),
    }


def _score(
    model: Any,
    batch: dict[str, Tensor],
    draw: NoiseDraw,
    config: LossConfig,
    schedule: VpSchedule | None,
) -> ElboOutput:
    if schedule is None:
        return flow_elbo(model, batch["x0"], batch["cond"], draw, config.weighting)  # type: ignore[arg-type]
    return vp_elbo(model, batch["x0"], batch["cond"], draw, schedule, config.weighting)  # type: ignore[arg-type]


def _direct_pair_mean(model, old, ref, batch, config, schedule) -> Tensor:
    """The official objective written directly: mean over all B K pairs of loss + beta KL."""
    per_pair = []
    for k in range(K):
        draw = make_noise_draw(
            batch["x0"], batch["t"][:, k], config, schedule, noise=batch["noise"][:, k]
        )
        cur, prev, reference = (_score(m, batch, draw, config, schedule) for m in (model, old, ref))
        pair = policy_loss_per_pair(cur.elbo, prev.elbo, batch["adv"], config.loss)
        per_pair.append(
            pair + config.beta * girsanov_kl_per_pair(cur.prediction, reference.prediction)
        )
    return torch.stack(per_pair, dim=1).mean()


# (config, VP schedule, how far the old policy is from the current one). The grpo case sits
# near ratio 1 so that about half of its pairs are clipped and half are not.
CASES = [
    (LossConfig(loss="pepg", beta=1e-2), None, 0.05),
    (LossConfig(loss="grpo", beta=1e-2, weighting="exact"), None, 1e-4),
    (LossConfig(loss="par", beta=0.0, weighting="velocity_mse"), None, 0.05),
    (LossConfig(loss="epg", beta=1e-2, prediction="epsilon"), CosineVpSchedule(), 0.05),
]


@pytest.mark.parametrize(("config", "schedule", "old_distance"), CASES)
def test_rank_split_gives_the_same_loss_and_gradients(
    config: LossConfig, schedule: VpSchedule | None, old_distance: float
) -> None:
    base = TinyModel(seed=0)
    old, ref = _perturbed(base, old_distance, seed=1), _perturbed(base, 0.2, seed=2)
    ref_or_none = ref if config.beta > 0 else None
    batch = _batch()
    normalizer = GlobalNormalizer(num_samples=B, num_timesteps=K)

    whole = copy.deepcopy(base)
    metrics = accumulate_microbatch(
        whole,
        old,
        ref_or_none,
        batch["x0"],
        batch["cond"],
        batch["adv"],
        batch["t"],
        config,
        normalizer,
        schedule,
        noise=batch["noise"],
    )
    split_loss, rank_grads = 0.0, []
    for rank in range(2):
        replica = copy.deepcopy(base)
        for micro in range(2):
            rows = slice(4 * rank + 2 * micro, 4 * rank + 2 * micro + 2)
            m = accumulate_microbatch(
                replica,
                old,
                ref_or_none,
                batch["x0"][rows],
                batch["cond"][rows],
                batch["adv"][rows],
                batch["t"][rows],
                config,
                normalizer,
                schedule,
                noise=batch["noise"][rows],
            )
            split_loss += m["learner/loss"]
        rank_grads.append([p.grad for p in replica.parameters()])

    assert split_loss == pytest.approx(metrics["learner/loss"], rel=1e-10)
    for p, g0, g1 in zip(whole.parameters(), *rank_grads, strict=True):
        torch.testing.assert_close(g0 + g1, p.grad, rtol=1e-10, atol=1e-12)  # all_reduce(SUM)
    direct = _direct_pair_mean(base, old, ref, batch, config, schedule)
    assert metrics["learner/loss"] == pytest.approx(direct.item(), rel=1e-10)
    assert metrics["learner/num_pairs"] == B * K
    if config.loss == "grpo":
        assert 0.2 < metrics["learner/clip_frac"] < 0.8


def test_the_three_passes_share_one_draw_and_only_the_current_gets_gradients() -> None:
    calls: list[tuple[str, Tensor, Tensor, object]] = []

    def spy(name: str, model: TinyModel):
        def fn(x: Tensor, t: Tensor, cond: object) -> Tensor:
            calls.append((name, x, t, cond))
            return model(x, t, cond)

        return fn

    base = TinyModel(seed=0)
    old, ref = _perturbed(base, 0.05, seed=1), _perturbed(base, 0.2, seed=2)
    batch = _batch()
    draw = make_noise_draw(batch["x0"], batch["t"][:, 0], LossConfig(), noise=batch["noise"][:, 0])
    loss, _ = microbatch_loss(
        spy("cur", base),
        spy("old", old),
        spy("ref", ref),
        batch["x0"],
        batch["cond"],
        batch["adv"],
        draw,
        LossConfig(beta=1e-3),
        GlobalNormalizer(B, K),
    )
    loss.backward()
    assert sorted(c[0] for c in calls) == ["cur", "old", "ref"]
    assert all(c[1] is draw.x_t and c[2] is draw.t and c[3] is batch["cond"] for c in calls)
    assert all(p.grad is not None for p in base.parameters())
    assert all(p.grad is None for p in (*old.parameters(), *ref.parameters()))


def test_identical_old_policy_gives_ratio_one_and_the_reinforce_gradient() -> None:
    base = TinyModel(seed=0)
    batch = _batch()
    config = LossConfig(loss="pepg", beta=0.0)
    normalizer = GlobalNormalizer(B, 1)
    draw = make_noise_draw(batch["x0"], batch["t"][:, 0], config, noise=batch["noise"][:, 0])
    loss, metrics = microbatch_loss(
        base,
        copy.deepcopy(base),
        None,
        batch["x0"],
        batch["cond"],
        batch["adv"],
        draw,
        config,
        normalizer,
    )
    loss.backward()
    assert metrics["learner/ratio_mean"] == pytest.approx(1.0)
    got = [torch.clone(p.grad) for p in base.parameters() if p.grad is not None]
    base.zero_grad()
    elbo = flow_elbo(base, batch["x0"], batch["cond"], draw).elbo
    (-(batch["adv"] * elbo).sum() / B).backward()
    for g, p in zip(got, base.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)


def test_reference_pass_is_skipped_when_beta_is_zero_and_errors() -> None:
    def never(x: Tensor, t: Tensor, cond: object) -> Tensor:
        raise AssertionError("the reference must not be called when beta == 0")

    base = TinyModel(seed=0)
    batch = _batch()
    args = (batch["x0"], batch["cond"], batch["adv"])
    config = LossConfig(beta=0.0)
    draw = make_noise_draw(batch["x0"], batch["t"][:, 0], config, noise=batch["noise"][:, 0])
    _, metrics = microbatch_loss(base, base, None, *args, draw, config, GlobalNormalizer(B, K))
    assert "learner/kl_mean" not in metrics
    with pytest.raises(ValueError, match="ref_model"):
        microbatch_loss(base, base, never, *args, draw, config, GlobalNormalizer(B, K))
    with pytest.raises(ValueError, match="ref_model"):
        microbatch_loss(
            base, base, None, *args, draw, LossConfig(beta=1e-4), GlobalNormalizer(B, K)
        )
    with pytest.raises(ValueError, match="vp_schedule"):
        make_noise_draw(batch["x0"], batch["t"][:, 0], LossConfig(prediction="epsilon"))
    with pytest.raises(ValueError, match="advantages"):
        microbatch_loss(
            base,
            base,
            None,
            batch["x0"],
            batch["cond"],
            batch["adv"][:3],
            draw,
            config,
            GlobalNormalizer(B, K),
        )
    with pytest.raises(ValueError, match="noise"):
        accumulate_microbatch(
            base,
            base,
            None,
            *args,
            batch["t"],
            config,
            GlobalNormalizer(B, K),
            noise=batch["noise"][:, :1],
        )
