"""The real-model recipe configs (configs/sd35m-geneval.yaml, flux-dev-pickscore.yaml,
sd15-aesthetic.yaml) validate, hold the recipe they claim, and with their model directory
swapped for a tiny one of the same family pass the start-up checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from policy.io import check_model_config
from services.config import load_config
from tests.conftest import REPO
from tests.fixtures.tiny_models import save_tiny_flux, save_tiny_sd, save_tiny_sd3

pytestmark = pytest.mark.integration


def test_the_sd35m_config_is_the_papers_released_recipe() -> None:
    cfg = load_config(str(REPO / "configs" / "sd35m-geneval.yaml"))
    assert (cfg.model.kind, cfg.model.lora.rank, cfg.model.lora.alpha) == ("sd3", 32, 64)
    assert cfg.learner.lr == 3e-4 and cfg.learner.weight_decay == 1e-4
    assert cfg.learner.grad_clip == 5.0 and cfg.learner.num_timesteps == 9
    assert (cfg.learner.elbo_weighting, cfg.learner.advantage) == ("adaptive", "exact")
    assert cfg.learner.kl_beta == 1e-4 and cfg.learner.estimator == "elbo"
    assert (cfg.rollout.prompts_per_round, cfg.rollout.images_per_prompt) == (48, 24)
    s = cfg.rollout.sampling
    assert (s.sampler, s.num_steps, s.guidance) == ("dpm2", 10, 1.0)
    assert cfg.world.image_size == 512 and cfg.world.name == "text"
    assert (cfg.eval.sampling.sampler, cfg.eval.sampling.num_steps) == ("euler", 40)
    assert cfg.rewards.functions[0].params["reward"] == "geneval"
    assert cfg.world.train_prompts.endswith(".jsonl")  # GenEval's metadata reaches the reward


@pytest.mark.parametrize(
    ("config", "save"),
    [
        ("sd35m-geneval.yaml", lambda d: save_tiny_sd3(d, "sd35")),
        ("flux-dev-pickscore.yaml", lambda d: save_tiny_flux(d, "dev")),
        ("sd15-aesthetic.yaml", save_tiny_sd),
    ],
)
def test_each_recipe_passes_the_start_up_checks_on_a_tiny_model(
    tmp_path: Path, config: str, save: object
) -> None:
    model_dir = save(tmp_path / "model")  # type: ignore[operator]
    cfg = load_config(str(REPO / "configs" / config), [f"model.path={model_dir}"])
    check_model_config(cfg.model, 32)  # the tiny models are 32 px
    assert cfg.model.lora.rank > 0 and cfg.model.dtype in ("bfloat16", "float16")
    assert cfg.eval.rewards  # every recipe watches held-out rewards
