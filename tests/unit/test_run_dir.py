"""Run directories, checkpoints that are only picked up when complete, and prompt dealing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.config import ConfigError, RunConfig
from services.prompts import PromptDealer
from services.run import RunDir, read_driver_state

pytestmark = pytest.mark.unit


def _cfg(tmp_path: Path, **kw: object) -> RunConfig:
    return RunConfig.model_validate({"runs_dir": str(tmp_path), "name": "r", **kw})


def test_partial_checkpoints_are_never_picked_up(tmp_path: Path) -> None:
    run = RunDir(_cfg(tmp_path), resume=False)
    assert run.latest_checkpoint() is None
    done = run.commit_checkpoint(run.new_checkpoint(2), 2, {"round": 2})
    tmp = run.new_checkpoint(4)  # a crash here leaves a partial checkpoint behind
    (tmp / "driver.json").write_text('{"round": 4}')
    broken = run.ckpt_root / "round_00006"  # a directory without its COMPLETE marker
    broken.mkdir()
    assert run.latest_checkpoint() == done
    assert read_driver_state(done)["round"] == 2


def test_damaged_checkpoint_names_the_file(tmp_path: Path) -> None:
    run = RunDir(_cfg(tmp_path), resume=False)
    done = run.commit_checkpoint(run.new_checkpoint(1), 1, {"round": 1})
    (done / "driver.json").write_text("{nope")
    with pytest.raises(ConfigError, match=r"round_00001.*damaged"):
        read_driver_state(done)


def test_resume_checks_the_config_and_never_overwrites(tmp_path: Path) -> None:
    RunDir(_cfg(tmp_path), resume=False).log_metrics(1, {"reward/mean": 0.5})
    with pytest.raises(ConfigError, match="already exists"):
        RunDir(_cfg(tmp_path), resume=False)
    with pytest.raises(ConfigError, match="different run"):
        RunDir(_cfg(tmp_path, learner={"loss": "epg"}), resume=True)
    again = RunDir(_cfg(tmp_path, train={"rounds": 500}), resume=True)  # more rounds is fine
    assert again.history()[0]["reward/mean"] == 0.5
    again.log_metrics(2, {"reward/mean": 0.6})
    again.truncate_history(1)
    assert [r["round"] for r in again.history()] == [1]
    with pytest.raises(ConfigError, match="holds no run"):
        RunDir(_cfg(tmp_path, name="other"), resume=True)


def test_prompt_dealer_is_seeded_and_resumable() -> None:
    prompts = [f"p{i}" for i in range(10)]
    a = PromptDealer(prompts, seed=3)
    rounds = [a.deal(r, 4, 2) for r in range(1, 6)]
    assert rounds[0].prompts[:2] == [rounds[0].prompts[0]] * 2  # K-repeat groups
    np.testing.assert_array_equal(rounds[1].sample_ids, np.arange(16, 24))
    first_epoch = [p for r in rounds[:3] for p in r.prompts[::2]][:10]
    assert sorted(first_epoch) == sorted(prompts)  # every prompt once per epoch
    b = PromptDealer(prompts, seed=3)
    b.deal(1, 4, 2), b.deal(2, 4, 2)
    c = PromptDealer(prompts, seed=3, **b.state())
    assert [c.deal(r, 4, 2).prompts for r in (3, 4, 5)] == [r.prompts for r in rounds[2:]]
