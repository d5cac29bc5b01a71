"""PickScore, CLIP score and the LAION aesthetic predictor (rewards/clip.py) on a tiny random
CLIP saved offline: they load from local directories, score batches by the anchors' formulas,
and name the missing directory or file when one is absent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rewards.clip import AestheticHead
from rewards.config import RewardSpec
from rewards.pool import RewardScorer
from tests.fixtures.tiny_models import save_tiny_clip

pytestmark = pytest.mark.integration

PROMPTS = ["a red circle", "two blue squares", "a cat", "a green triangle", "a dog"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


def _images(n: int = 5, size: int = 48) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _reward(name: str, **params: object) -> object:
    from rewards.base import build_reward

    return build_reward(name, params)


@pytest.mark.parametrize(("name", "divisor"), [("pickscore", 26.0), ("clip_score", 100.0)])
def test_similarity_rewards_follow_the_anchors_formula(
    clip_dir: Path, name: str, divisor: float
) -> None:
    from transformers import CLIPModel, CLIPProcessor

    reward = _reward(name, model=str(clip_dir), processor=str(clip_dir), batch_size=2)
    images = _images()
    out = reward.score(images, PROMPTS)  # type: ignore[attr-defined]
    assert out.scores.shape == (5,) and np.isfinite(out.scores).all()
    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        inputs = processor(text=PROMPTS, images=list(images), return_tensors="pt", padding=True)
        logits = model(**inputs).logits_per_image.diagonal()  # exp(scale) x cos
    np.testing.assert_allclose(out.scores, (logits / divisor).numpy(), rtol=1e-4, atol=1e-6)
    other = reward.score(images, ["a dog", *PROMPTS[1:]])  # type: ignore[attr-defined]
    assert other.scores[0] != out.scores[0]  # the prompt matters


def test_aesthetic_scores_with_its_head_file(clip_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    head = AestheticHead(16)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    spec = RewardSpec(
        name="aesthetic", params={"model": str(clip_dir), "head": str(tmp_path / "head.pth")}
    )
    scorer = RewardScorer([spec])

    class Batch:
        sample_ids = group_ids = np.arange(5)
        prompts = PROMPTS
        images = _images()
        version, seconds = 0, 0.0

    scored = scorer.score(Batch())
    assert scored.valid.all() and np.isfinite(scored.per_reward["aesthetic"]).all()
    # The same image scores the same whatever its prompt (the aesthetic model is image-only).
    assert len(set(np.round(scored.per_reward["aesthetic"], 6))) == 5
    wrong = AestheticHead(8)
    torch.save(wrong.state_dict(), tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="not the aesthetic MLP's weights for a 16-dimensional"):
        _reward("aesthetic", model=str(clip_dir), head=str(tmp_path / "wrong.pth"))


def test_missing_weights_are_named(clip_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a directory"):
        _reward("pickscore", model=str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"config\.json is missing"):
        _reward("clip_score", model=str(empty))
    with pytest.raises(ValueError, match=r"params\.head .* is not a file"):
        _reward("aesthetic", model=str(clip_dir), head=str(tmp_path / "absent.pth"))
    with pytest.raises(ValueError, match="missing a required argument: 'model'"):
        RewardSpec(name="pickscore", params={})
