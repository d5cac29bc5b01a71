"""``elborl train`` on a real model family: a tiny random SD3.5 pipeline saved in the
diffusers format, loaded from ``model.path``, trained with LoRA through real Ray actors and
DeepSpeed, checkpointed, resumed and exported. The learner rank loads no text encoders
(``text_encoders=False``): it trains on the conditionings the rollouts ship with the samples,
and would stop with "no text encoders loaded" on any prompt they did not."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import REPO
from tests.e2e.helpers import metrics, run_train, tiny_config
from tests.fixtures.tiny_models import save_tiny_sd3

pytestmark = pytest.mark.e2e

PROMPTS = ["a red circle", "two blue squares"]


def _sd3_config(
    tmp: Path, model_dir: Path, rounds: int, name: str = "t", **extra: dict[str, Any]
) -> Path:
    return tiny_config(
        tmp,
        name=name,
        model={"kind": "sd3", "path": str(model_dir), "checkpoint": None, "lora": {"rank": 4}},
        world={"image_size": 32},
        # A reward that varies on a random model (the shapes verifier would give all zeros).
        rewards={"functions": [{"name": "jpeg_compressibility"}]},
        rollout={"prompts_per_round": 2},
        learner={"lr": 3e-3},  # so that the adapters move visibly in 3 steps (export test)
        eval={"max_prompts": 4},
        train={"rounds": rounds, "eval_every": 2, "checkpoint_every": 1, "sample_grid_every": 2},
        **extra,
    )


@pytest.fixture(scope="module")
def sd35_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """Two rounds of LoRA on a tiny SD3.5, then a resumed third: (run dir, model dir); the
    two commands' outputs are checked by the first test."""
    tmp = tmp_path_factory.mktemp("sd35")
    model_dir = save_tiny_sd3(tmp / "tiny-sd35", variant="sd35")
    first = run_train(["--config", str(_sd3_config(tmp, model_dir, rounds=2))], timeout=600)
    assert first.returncode == 0, first.stderr[-4000:]
    run = tmp / "runs" / "t"
    (tmp / "first_round_metrics.json").write_text(json.dumps(metrics(run)))
    resumed = run_train(
        ["--config", str(_sd3_config(tmp, model_dir, rounds=3)), "--resume"], timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    yield run, model_dir


def test_two_rounds_of_lora_on_a_tiny_sd35_then_resume(sd35_run: tuple[Path, Path]) -> None:
    run, _ = sd35_run
    rounds = json.loads((run.parent.parent / "first_round_metrics.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2]
    for i, r in enumerate(rounds, start=1):
        assert r["rollout/images"] == 8 and r["perf/samples_trained_total"] == 8 * i
        assert r["rollout/version"] == i - 1 and r["weights/version"] == i
        # Only the adapters are published: the 8 targets x 2 blocks x (A, B) of rank 4.
        assert 0 < r["weights/bytes"] < 1e6
        assert math.isfinite(r["learner/loss"]) and math.isfinite(r["learner/improvement"])
    ckpt = run / "checkpoints" / "round_00002"
    assert (ckpt / "COMPLETE").exists()
    # LoRA-only run checkpoints: of the transformer only the adapters are written, no frozen
    # weight and no buffer (SD3.5's persistent position table: 0.9 GB at full size), and the
    # old policy likewise; the resume below loads them onto the base from model.path.
    extra = torch.load(ckpt / "learner" / "learner_extra.pt", weights_only=True)
    assert extra["old"] and all("lora_" in k for k in extra["old"])
    (states,) = (ckpt / "learner" / "deepspeed").rglob("*model_states.pt")
    saved = torch.load(states, weights_only=False)
    assert any("pos_embed" in k for k in saved["buffer_names"])  # the model has one...
    assert saved["module"] and all("lora_" in k for k in saved["module"])  # ...not saved
    # The resumed run continued from round 2's checkpoint.
    rounds = metrics(run)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[-1]["weights/version"] == 3 and rounds[-1]["rollout/version"] == 2
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    # The manifest has both starts, with the model directory's files hashed.
    starts = json.loads((run / "manifest.json").read_text())["starts"]
    assert [s["resume"] for s in starts] == [False, True]
    assert "transformer/config.json" in starts[0]["model"]["files"]
    assert starts[0]["packages"]["diffusers"] and starts[0]["config_sha256"]


def test_the_resumed_run_equals_a_straight_one(sd35_run: tuple[Path, Path]) -> None:
    """Round 3 after ``--resume`` from round 2's checkpoint is round 3 of an uninterrupted run:
    the same rollouts, rewards and update (LoRA adapters, old policy and optimizer restored)."""
    run, model_dir = sd35_run
    tmp = run.parent.parent
    straight = run_train(["--config", str(_sd3_config(tmp, model_dir, 3, name="s"))], timeout=600)
    assert straight.returncode == 0, straight.stderr[-4000:]
    resumed, whole = metrics(run)[-1], metrics(tmp / "runs" / "s")[-1]
    assert resumed["round"] == whole["round"] == 3
    keys = [k for k in whole if k.startswith(("reward/", "learner/loss", "learner/ratio", "eval/"))]
    assert "learner/loss" in keys and "reward/mean" in keys
    assert {k: resumed[k] for k in keys} == {k: whole[k] for k in keys}


def test_an_incomplete_model_directory_fails_before_any_actor_starts(tmp_path: Path) -> None:
    model_dir = save_tiny_sd3(tmp_path / "tiny-sd3")
    for f in (model_dir / "vae").glob("*.safetensors"):
        f.unlink()
    out = run_train(["--config", str(_sd3_config(tmp_path, model_dir, rounds=1))], timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "vae/*.safetensors" in out.stderr and "model.path" in out.stderr
    assert "Started a local Ray instance" not in out.stderr
    assert not (tmp_path / "runs" / "t").exists()


def _export(run: Path, out: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "services.cli", "export", str(run), "--out", str(out), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]


def _trained_policy(run: Path, model_dir: Path) -> Any:
    from learner.engine import read_trained_weights
    from policy.config import LoraConfig, ModelConfig
    from policy.io import model_from_config
    from policy.lora import add_lora

    model = ModelConfig(kind="sd3", path=str(model_dir), lora=LoraConfig(rank=4))
    policy = add_lora(model_from_config(model, 32), model.lora)
    ckpt = sorted((run / "checkpoints").glob("round_*"))[-1]
    policy.load_state_dict(read_trained_weights(ckpt / "learner"), strict=False)
    return policy.eval()


def _latents(pipe: Any, noise: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = pipe(
        PROMPTS,
        latents=noise.clone(),
        sigmas=torch.linspace(1.0, 0.0, 5)[:-1].tolist(),
        num_inference_steps=4,
        guidance_scale=1.0,
        max_sequence_length=128,
        output_type="latent",
    ).images
    return out


def test_the_exported_lora_reproduces_the_trained_policy_in_diffusers(
    tmp_path: Path, sd35_run: tuple[Path, Path]
) -> None:
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from algo.samplers import sample

    run, model_dir = sd35_run
    _export(run, tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    card = (tmp_path / "lora" / "README.md").read_text()
    assert "load_lora_weights" in card and "round 3" in card
    policy = _trained_policy(run, model_dir)
    noise = torch.randn((2, *policy.sample_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = policy.encode_prompts(PROMPTS)
        fn = lambda x, t: policy(x, t, cond)  # noqa: E731
        ours = sample(fn, noise, sampler="euler", num_steps=4, shift=3.0).x0
    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    base = _latents(pipe, noise)
    pipe.load_lora_weights(tmp_path / "lora")
    assert (_latents(pipe, noise) - ours).abs().max().item() <= 1e-5
    assert (base - ours).abs().max().item() > 1e-4  # the adapters changed the output

    _export(run, tmp_path / "merged", "--merged")
    merged = SD3Transformer2DModel.from_pretrained(tmp_path / "merged" / "transformer")
    pipe = StableDiffusion3Pipeline.from_pretrained(
        model_dir, transformer=merged, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    assert (_latents(pipe, noise) - ours).abs().max().item() <= 1e-5


def test_two_rounds_of_lora_on_a_tiny_flux_dev_with_embedded_guidance_and_its_export(
    tmp_path: Path,
) -> None:
    from diffusers import FluxPipeline

    from algo.samplers import sample
    from learner.engine import read_trained_weights
    from policy.config import LoraConfig, ModelConfig
    from policy.io import model_from_config
    from policy.lora import add_lora
    from tests.fixtures.tiny_models import save_tiny_flux

    model_dir = save_tiny_flux(tmp_path / "tiny-flux-dev", variant="dev")
    cfg = tiny_config(
        tmp_path,
        model={"kind": "flux", "path": str(model_dir), "checkpoint": None, "lora": {"rank": 4}},
        world={"image_size": 32},
        rewards={"functions": [{"name": "jpeg_compressibility"}]},
        rollout={
            "prompts_per_round": 2,
            "sampling": {"sampler": "euler", "num_steps": 4, "guidance": 3.5, "grid": "diffusers"},
        },
        eval={"max_prompts": 4, "sampling": {"guidance": 3.5}},
        learner={"lr": 3e-3},
        train={"rounds": 2, "eval_every": 2, "checkpoint_every": 2, "sample_grid_every": 2},
    )
    out = run_train(["--config", str(cfg)], timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    run = tmp_path / "runs" / "t"
    rounds = metrics(run)
    assert [r["round"] for r in rounds] == [1, 2] and "eval/accuracy" in rounds[-1]
    # One embedded-guidance pass, the same in rollout and learner: the first ratio is 1.
    assert rounds[0]["learner/ratio_max"] == pytest.approx(1.0, abs=1e-5)

    _export(run, tmp_path / "lora")
    model = ModelConfig(kind="flux", path=str(model_dir), lora=LoraConfig(rank=4))
    policy = add_lora(model_from_config(model, 32), model.lora)
    ckpt = run / "checkpoints" / "round_00002" / "learner"
    policy.load_state_dict(read_trained_weights(ckpt), strict=False)
    noise = torch.randn((2, *policy.sample_shape), generator=torch.Generator().manual_seed(0))
    shift, grid = policy.eval().sampling_grid(1.0, "diffusers")
    with torch.no_grad():
        cond = policy.with_guidance(policy.encode_prompts(PROMPTS), 3.5)
        fn = lambda x, t: policy(x, t, cond)  # noqa: E731
        ours = sample(fn, noise, sampler="euler", num_steps=4, shift=shift, grid=grid).x0
    pipe = FluxPipeline.from_pretrained(model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(tmp_path / "lora")
    theirs = pipe(
        PROMPTS,
        latents=_pack(noise),
        height=32,
        width=32,
        num_inference_steps=4,
        guidance_scale=3.5,
        max_sequence_length=128,
        output_type="latent",
    ).images
    assert (_pack(ours) - theirs).abs().max().item() <= 1e-5


def _pack(x: torch.Tensor) -> torch.Tensor:
    """FLUX's 2x2 packing of (B, C, h, w) latents into (B, h w / 4, 4 C) tokens."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


@pytest.mark.gpu
def test_two_rounds_on_a_gpu_with_half_a_gpu_per_role(tmp_path: Path) -> None:
    """Ray gives the rollout worker and the learner rank half a GPU each; both run on it
    (``model.device = cuda`` fails at start-up otherwise) and the run trains as on the CPU."""
    model_dir = save_tiny_sd3(tmp_path / "tiny-sd35", variant="sd35")
    config = _sd3_config(tmp_path, model_dir, rounds=2)
    gpus = ["model.device=cuda", "rollout.resources.num_gpus=0.5", "learner.resources.num_gpus=0.5"]
    overrides = [arg for setting in gpus for arg in ("--set", setting)]
    out = run_train(["--config", str(config), *overrides], timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    rounds = metrics(tmp_path / "runs" / "t")
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(math.isfinite(r["learner/loss"]) for r in rounds)
    assert rounds[-1]["weights/version"] == 2


def test_two_rounds_of_lora_on_a_tiny_sd15_under_guidance_and_its_export(tmp_path: Path) -> None:
    """SD1.5 in the flow view: DPM2 rollouts on the trailing DDIM grid at CFG 4, the learner's
    ELBO on the same grid (first ratio 1), and the exported LoRA reproduces the trained policy
    in diffusers' DDIM pipeline."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from algo.samplers import sample
    from learner.engine import read_trained_weights
    from policy.base import guided_fn
    from policy.config import LoraConfig, ModelConfig
    from policy.io import model_from_config
    from policy.lora import add_lora
    from tests.fixtures.tiny_models import save_tiny_sd

    model_dir = save_tiny_sd(tmp_path / "tiny-sd15")
    cfg = tiny_config(
        tmp_path,
        model={"kind": "sd", "path": str(model_dir), "checkpoint": None, "lora": {"rank": 4}},
        world={"image_size": 32},
        rewards={"functions": [{"name": "jpeg_compressibility"}]},
        rollout={"prompts_per_round": 2, "sampling": {"guidance": 4.0}},
        eval={"max_prompts": 4},
        learner={"lr": 3e-3},
        train={"rounds": 2, "eval_every": 2, "checkpoint_every": 2, "sample_grid_every": 2},
    )
    out = run_train(["--config", str(cfg)], timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    run = tmp_path / "runs" / "t"
    rounds = metrics(run)
    assert [r["round"] for r in rounds] == [1, 2] and "eval/accuracy" in rounds[-1]
    assert rounds[0]["learner/ratio_max"] == pytest.approx(1.0, abs=1e-5)

    _export(run, tmp_path / "lora")
    model = ModelConfig(kind="sd", path=str(model_dir), lora=LoraConfig(rank=4))
    policy = add_lora(model_from_config(model, 32), model.lora).eval()
    ckpt = run / "checkpoints" / "round_00002" / "learner"
    policy.load_state_dict(read_trained_weights(ckpt), strict=False)
    noise = torch.randn((2, *policy.sample_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        uncond = policy.encode_prompts([""] * 2)
        fn = guided_fn(policy, policy.encode_prompts(PROMPTS), uncond, 4.0)
        start = noise * policy.initial_noise_scale
        ours = sample(fn, start, sampler="euler", num_steps=4, grid="sd_trailing").x0
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(tmp_path / "lora")
    theirs = pipe(
        PROMPTS,
        latents=noise,
        height=32,
        width=32,
        num_inference_steps=4,
        guidance_scale=4.0,
        output_type="latent",
    ).images
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_a_tiny_sd35_on_free_text_prompts_watched_by_held_out_rewards(tmp_path: Path) -> None:
    """The `text` world: prompts from files no grammar parses, trained on one reward, held
    out evaluated by others (eval.rewards) in the driver: eval/reward_<name> each evaluation."""
    model_dir = save_tiny_sd3(tmp_path / "tiny-sd35", variant="sd35")
    train, held = tmp_path / "train.txt", tmp_path / "held.txt"
    train.write_text("a photo of a bench\na dog on a skateboard\n# a comment\n")
    held.write_text("an astronaut riding a horse\na red car\n")
    cfg = tiny_config(
        tmp_path,
        model={"kind": "sd3", "path": str(model_dir), "checkpoint": None, "lora": {"rank": 4}},
        world={
            "name": "text",
            "image_size": 32,
            "train_prompts": str(train),
            "eval_prompts": str(held),
        },
        rewards={"functions": [{"name": "jpeg_compressibility"}]},
        rollout={"prompts_per_round": 2},
        eval={"rewards": [{"name": "jpeg_incompressibility"}, {"name": "jpeg_compressibility"}]},
        train={"rounds": 2, "eval_every": 2, "eval_at_start": True},
    )
    out = run_train(["--config", str(cfg)], timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    run = tmp_path / "runs" / "t"
    evals = [r for r in metrics(run, include_start=True) if "eval/reward_valid_fraction" in r]
    assert [r["round"] for r in evals] == [0, 2]
    for r in evals:
        assert "eval/accuracy" not in r and r["eval/reward_valid_fraction"] == 1.0
        inc, comp = r["eval/reward_jpeg_incompressibility"], r["eval/reward_jpeg_compressibility"]
        assert inc > 0 and comp == pytest.approx(-inc)  # plus and minus the JPEG kB
    assert (run / "samples" / "eval_round_00002.png").is_file() and (run / "curves.png").is_file()
