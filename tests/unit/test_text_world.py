"""The `text` world: prompts from files, no verifier; evaluation reports no verifier metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.config import ConfigError, RunConfig
from services.controller import eval_metrics
from services.prompts import read_prompt_lines, resolve_prompts
from worlds.base import WorldConfig, make_world

pytestmark = pytest.mark.unit


def test_prompts_come_from_the_file_comments_and_blanks_skipped(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("# GenEval-like\na photo of a bench\n\n  two dogs left of a cat  \n")
    world = make_world(WorldConfig(name="text"))
    assert world.prompts(str(f)) == ["a photo of a bench", "two dogs left of a cat"]
    assert resolve_prompts(world, str(f), "world.train_prompts") == world.prompts(str(f))
    assert not world.verifies and world.split_names() == () and world.category("x") is None
    with pytest.raises(NotImplementedError, match="no verifier"):
        world.verify(None, ["x"])  # type: ignore[arg-type]


def test_bad_prompt_files_are_named(tmp_path: Path) -> None:
    world = make_world(WorldConfig(name="text"))
    with pytest.raises(ConfigError, match="neither a split"):
        resolve_prompts(world, str(tmp_path / "missing.txt"), "world.train_prompts")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ConfigError, match=r"world\.eval_prompts: .*holds no prompt"):
        resolve_prompts(world, str(empty), "world.eval_prompts")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(ConfigError, match=r"--prompts: .*bin\.txt:2: prompt file is not valid"):
        read_prompt_lines(str(binary), "--prompts")


def test_a_text_run_config_with_eval_rewards_validates() -> None:
    cfg = RunConfig.model_validate(
        {
            "world": {"name": "text", "train_prompts": "a.txt", "eval_prompts": "b.txt"},
            "rewards": {"functions": [{"name": "jpeg_compressibility"}]},
            "eval": {"rewards": [{"name": "jpeg_incompressibility", "weight": 2.0}]},
        }
    )
    assert cfg.world.name == "text" and cfg.eval.rewards[0].weight == 2.0
    assert eval_metrics({"num_prompts": 2, "num_images": 4}) == {}  # no verifier: none of its
    with pytest.raises(ValueError, match="unknown reward 'hpsv2'"):
        RunConfig.model_validate({"eval": {"rewards": [{"name": "hpsv2"}]}})
