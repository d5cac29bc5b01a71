"""Typed configuration: defaults, overrides, and clear errors for every kind of mistake."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from services import config as C
from services.config import ConfigError, RunConfig, load_config

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_defaults_are_valid_and_every_field_is_described() -> None:
    cfg = RunConfig()
    assert cfg.rollout.images_per_round == 64

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")

    walk(RunConfig, "")


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    assert isinstance(load_config(path), RunConfig)


def test_overrides_parse_yaml_scalars(tmp_path: Path) -> None:
    cfg = load_config(
        _write(tmp_path, "learner: {lr: 0.1}\n"),
        ["learner.lr=1e-4", "train.async_rollout=true", "rollout.sampling.sampler=euler"],
    )
    assert cfg.learner.lr == pytest.approx(1e-4)
    assert cfg.train.async_rollout is True
    assert cfg.rollout.sampling.sampler == "euler"


def test_unknown_key_names_file_line_and_field(tmp_path: Path) -> None:
    path = _write(tmp_path, "seed: 1\nlearner:\n  lr: 0.1\n  lrr: 0.2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "learner.lrr" in msg and "line 4" in msg and "unknown key" in msg


def test_wrong_type_names_field_and_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"learner\.lr \(line 2\).*'fast'"):
        load_config(_write(tmp_path, "learner:\n  lr: fast\n"))


def test_named_choices_list_the_registered_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"learner\.loss \(line 1\).*'ppo'.*epg, .*pepg"):
        load_config(_write(tmp_path, "learner: {loss: ppo}\n"))


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["learner.num_workers=3"], "learner.num_workers"),
        (["learner.microbatch_size=7"], "learner.microbatch_size"),
        (["learner.num_timesteps=11"], "rollout.sampling.num_steps"),
        (["learner.estimator=trajectory"], "rollout.sampling.sampler"),
    ],
)
def test_impossible_sizes_are_rejected(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, overrides)


def test_bad_yaml_reports_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"line 2, column 12 is not valid YAML"):
        load_config(_write(tmp_path, "seed: 1\nlearner: lr: 3\n"))


def test_non_mapping_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_bad_override_syntax(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["learner.lr"])
    with pytest.raises(ConfigError, match="is a value"):
        load_config(_write(tmp_path, "seed: 1\n"), ["seed.x=1"])


def test_config_is_frozen_and_round_trips() -> None:
    cfg = RunConfig()
    with pytest.raises(Exception, match="frozen"):
        cfg.seed = 3  # type: ignore[misc]
    again = RunConfig.model_validate(yaml.safe_load(C.config_to_yaml(cfg)))
    assert again == cfg


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["model.kind=sd3"], "needs model.path"),
        (["model.kind=sd3", "model.path=/m", "model.checkpoint=ckpt"], "model.checkpoint must"),
        (["model.path=/m"], "loads from model.checkpoint, not model.path"),
        (["model.dtype=bfloat16"], "float32 only"),
        (["model.kind=sd3", "model.path=/m", "model.dtype=bfloat16"], "needs LoRA"),
    ],
)
def test_model_weights_come_from_where_the_kind_reads_them(
    overrides: list[str], needle: str
) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(None, overrides)


def test_a_real_model_kind_drops_the_tiny_checkpoint_default() -> None:
    cfg = load_config(None, ["model.kind=sd3", "model.path=/models/sd35m"])
    assert cfg.model.checkpoint is None and cfg.model.path == "/models/sd35m"
    assert cfg.model.lora.target_modules is None  # the kind's default targets


def test_rewards_whose_metrics_would_collide_are_rejected(tmp_path: Path) -> None:
    twice = "rewards: {functions: [{name: shapes}, {name: shapes, weight: 2}]}\n"
    with pytest.raises(ConfigError, match=r"rewards\.functions.*\['shapes'\].*more than once"):
        load_config(_write(tmp_path, twice))
    reserved = "rewards: {functions: [{name: shapes}, {name: 'mypkg.rewards:accuracy'}]}\n"
    with pytest.raises(ConfigError, match=r"overwrite the summary metric `reward/accuracy`"):
        load_config(_write(tmp_path, reserved))
    watched = "eval: {rewards: [{name: jpeg_compressibility}, {name: jpeg_compressibility}]}\n"
    with pytest.raises(ConfigError, match=r"eval\.rewards.*more than once"):
        load_config(_write(tmp_path, watched))
    # The same reward trained on and watched is fine: their metrics live apart.
    both = "rewards: {functions: [{name: shapes}]}\neval: {rewards: [{name: shapes}]}\n"
    assert load_config(_write(tmp_path, both)).eval.rewards[0].name == "shapes"
