"""Bodies of the ``elborl`` subcommands (imported lazily by ``services.cli``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from services.config import ConfigError, RunConfig
from services.prompts import read_prompt_lines, resolve_prompts
from worlds.base import make_world

if TYPE_CHECKING:  # pretraining's modules load only when a command needs them
    from policy.pretrain import PretrainState

log = logging.getLogger("elborl")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _setup_torch() -> None:
    """Use every core unless OMP_NUM_THREADS says otherwise (tests and Ray workers set it)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))


def _pretrain_snapshots(cfg: RunConfig, out: Path, fresh: bool) -> Any:
    """Where ``elborl pretrain`` keeps resume snapshots, keyed by what shapes the result.

    The time budget, eval cadence and snapshot cadence may change between sittings; anything
    else (model, world, optimizer settings, seed) must match for a snapshot to be resumed.
    """
    from policy.pretrain import Snapshots, drop_snapshot

    settable = {"max_minutes", "eval_every", "snapshot_every", "output"}
    fingerprint = json.dumps(
        {
            "seed": cfg.seed,
            # What pretraining reads of the model settings (not LoRA or real-model fields).
            "model": cfg.model.model_dump(mode="json", include={"kind", "checkpoint", "arch"}),
            "world": cfg.world.model_dump(mode="json"),
            "pretrain": cfg.pretrain.model_dump(mode="json", exclude=settable),
        },
        sort_keys=True,
    )
    snapshots = Snapshots(path=out.with_name(out.name + ".resume"), fingerprint=fingerprint)
    if fresh:
        drop_snapshot(snapshots)
    return snapshots


def run_pretrain(
    cfg: RunConfig,
    output: str | None,
    config_path: str | None,
    overrides: list[str],
    fresh: bool = False,
) -> int:
    """``elborl pretrain``: train the base policy from scratch and save its EMA weights."""
    from policy.io import build_policy, save_policy
    from policy.pretrain import drop_snapshot, pretrain
    from rollout.evaluate import evaluate

    _setup_torch()
    out = Path(output or cfg.pretrain.output)
    snapshots = _pretrain_snapshots(cfg, out, fresh)
    world = make_world(cfg.world)
    train = resolve_prompts(world, cfg.world.train_prompts, "world.train_prompts")
    heldout = resolve_prompts(world, cfg.world.eval_prompts, "world.eval_prompts")
    try:
        policy = build_policy(cfg.model, cfg.world.image_size, world.vocabulary())
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    nparams = sum(p.numel() for p in policy.parameters())
    log.info(
        "pretraining a %.2f M-parameter policy on %d prompts -> %s", nparams / 1e6, len(train), out
    )

    def held_out(model: Any) -> dict[str, Any]:
        return evaluate(model, world, heldout, cfg.eval, seed=cfg.seed + 1).summary

    try:
        ema, state = pretrain(
            policy, world, train, cfg.pretrain, cfg.seed, evaluate=held_out, snapshots=snapshots
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    save_policy(ema, out, _pretrain_provenance(cfg, state, nparams, config_path, overrides))
    if state.step >= cfg.pretrain.steps:
        drop_snapshot(snapshots)
    else:
        log.warning(
            "stopped by the time budget at step %d of %d: %s holds the model so far; rerun the "
            "same command with a larger --set pretrain.max_minutes to continue from step %d "
            "(the snapshot in %s is kept)",
            state.step,
            cfg.pretrain.steps,
            out,
            state.step,
            snapshots.path,
        )
    last = state.evals[-1] if state.evals else {}
    log.info(
        "saved %s after %d steps (%.1f min); held-out accuracy %s",
        out,
        state.step,
        state.seconds / 60,
        last.get("accuracy", "n/a"),
    )
    return 0


def _pretrain_provenance(
    cfg: RunConfig,
    state: PretrainState,
    nparams: int,
    config_path: str | None,
    overrides: list[str],
) -> dict[str, Any]:
    """What a pretrained checkpoint records of how it was made (its ``provenance``)."""
    command = ["elborl pretrain", *(["--config", config_path] if config_path else [])]
    return {
        "command": " ".join([*command, *(f"--set {o}" for o in overrides)]),
        "seed": cfg.seed,
        "steps": state.step,
        "seconds": round(state.seconds, 1),
        "final_loss_ema": round(state.loss_ema, 5),
        "evals": state.evals,
        "parameters": nparams,
        "pretrain": cfg.pretrain.model_dump(mode="json"),
        "eval": cfg.eval.model_dump(mode="json"),
        "git_commit": _git_commit(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _eval_policy(cfg: RunConfig, args: argparse.Namespace) -> tuple[Any, str]:
    """The policy ``elborl eval`` samples, and what to call it: ``--checkpoint`` or the config's
    ``model.checkpoint`` (a saved policy), or a real model's ``model.path``."""
    from policy.io import check_model_config, load_policy, model_from_config
    from policy.models import model_kind

    from_path = model_kind(cfg.model.kind).from_path is not None
    if from_path and args.checkpoint:
        raise ConfigError(
            f"--checkpoint is for saved policies; model.kind {cfg.model.kind!r} loads "
            "model.path (drop --checkpoint, or set --set model.path=DIR)"
        )
    try:
        if from_path:
            check_model_config(cfg.model, cfg.world.image_size)
            return model_from_config(cfg.model, cfg.world.image_size), str(cfg.model.path)
        checkpoint = args.checkpoint or cfg.model.checkpoint
        if not checkpoint:
            raise ConfigError("no checkpoint: pass --checkpoint DIR or set model.checkpoint")
        return load_policy(checkpoint), str(checkpoint)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def run_eval(cfg: RunConfig, args: argparse.Namespace) -> int:
    """``elborl eval``: sample held-out prompts, verify, print JSON or a table."""
    from policy.placement import resolve_device
    from rollout.evaluate import evaluate

    world = make_world(cfg.world)
    prompts = _eval_prompts(cfg, args, world)
    scorer = _reward_scorer(cfg) if args.rewards else None
    policy, checkpoint = _eval_policy(cfg, args)
    try:
        device = resolve_device(cfg.model.device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    policy = policy.place(device, cfg.model.text_encoder_device)
    _setup_torch()
    eval_cfg = cfg.eval.model_copy(
        update={
            k: v
            for k, v in (
                ("images_per_prompt", args.num_images),
                ("max_prompts", args.max_prompts),
                ("pass_k", args.pass_k),
            )
            if v is not None
        }
    )
    seed = cfg.seed if args.seed is None else args.seed
    start = time.monotonic()
    if scorer is not None:
        return _reward_eval(policy, scorer, prompts, eval_cfg, seed, args, str(checkpoint))
    report = evaluate(policy, world, prompts, eval_cfg, seed=seed)
    summary = {
        **report.summary,
        "checkpoint": str(checkpoint),
        "seed": seed,
        "sampler": eval_cfg.sampling.sampler,
        "num_steps": eval_cfg.sampling.num_steps,
        "seconds": round(time.monotonic() - start, 2),
    }
    if args.grid:
        from services.viz import save_sample_grid

        k = min(32, len(report.prompts))
        save_sample_grid(
            args.grid, report.images[:k], report.prompts[:k], [r.score for r in report.results[:k]]
        )
    if args.json:
        print(json.dumps(summary))
    else:
        _print_eval_table(summary)
    return 0


def _eval_prompts(cfg: RunConfig, args: argparse.Namespace, world: Any) -> list[str]:
    """The prompts ``elborl eval`` samples, after checking its options against each other."""
    for flag, value in (
        ("--num-images", args.num_images),
        ("--max-prompts", args.max_prompts),
        ("--pass-k", args.pass_k),
    ):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if not world.verifies and not args.rewards:
        raise ConfigError(
            f"world.name = {cfg.world.name} has no verifier: pass --rewards (the images are "
            "scored by rewards.functions)"
        )
    if args.rewards and args.pass_k is not None:
        raise ConfigError("--pass-k needs the world's verifier; drop it or drop --rewards")
    if args.rewards and args.prompts:
        return read_prompt_lines(args.prompts, "--prompts")
    if args.prompts:
        return resolve_prompts(world, args.prompts, "--prompts")
    return resolve_prompts(world, cfg.world.eval_prompts, "world.eval_prompts")


def _reward_scorer(cfg: RunConfig) -> Any:
    """The configured rewards, built (a missing reward or weight file fails here)."""
    from rewards.pool import RewardScorer

    try:
        return RewardScorer(cfg.rewards.functions)
    except ValueError as exc:
        raise ConfigError(f"rewards.functions: {exc}") from exc


def _reward_eval(
    policy: Any,
    scorer: Any,
    prompts: list[str],
    cfg: Any,
    seed: int,
    args: argparse.Namespace,
    checkpoint: str,
) -> int:
    """``elborl eval --rewards``: ``images_per_prompt`` images of each prompt scored by every
    configured reward; per reward the mean, standard deviation and valid fraction."""
    from rollout.engine import RolloutImages
    from rollout.generate import generate

    start = time.monotonic()
    chosen = prompts[: cfg.max_prompts] if cfg.max_prompts else prompts
    texts = [p for p in chosen for _ in range(cfg.images_per_prompt)]
    policy.eval()
    out = generate(policy, texts, cfg.sampling, seed=seed, batch_size=cfg.batch_size)
    ids = np.arange(len(texts))
    scored = scorer.score(RolloutImages(ids, ids, texts, out.images, 0, 0.0))
    per_reward = {}
    for name, scores in scored.per_reward.items():
        ok = np.isfinite(scores)
        per_reward[name] = {
            "mean": float(scores[ok].mean()) if ok.any() else float("nan"),
            "std": float(scores[ok].std()) if ok.any() else float("nan"),
            "valid": float(ok.mean()),
        }
    summary = {
        "rewards": per_reward,
        "total": float(scored.total[scored.valid].mean()) if scored.valid.any() else None,
        "num_prompts": len(chosen),
        "num_images": len(texts),
        "checkpoint": checkpoint,
        "seed": seed,
        "sampler": cfg.sampling.sampler,
        "num_steps": cfg.sampling.num_steps,
        "seconds": round(time.monotonic() - start, 2),
    }
    if args.grid:
        from services.viz import save_sample_grid

        k = min(32, len(texts))
        save_sample_grid(args.grid, out.images[:k], texts[:k], list(scored.total[:k]))
    if args.json:
        print(json.dumps(summary))
    else:
        _print_reward_table(summary)
    return 0


def _print_reward_table(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"elborl eval --rewards: {summary['checkpoint']}")
    for column in ("reward", "mean", "std", "valid"):
        table.add_column(column, justify="left" if column == "reward" else "right")
    for name, row in summary["rewards"].items():
        table.add_row(name, f"{row['mean']:.4f}", f"{row['std']:.4f}", f"{row['valid']:.0%}")
    total = summary["total"]
    table.add_row("weighted total", "-" if total is None else f"{total:.4f}", "", "")
    Console(file=sys.stdout).print(table)
    print(
        f"{summary['num_prompts']} prompts, {summary['num_images']} images, "
        f"{summary['sampler']} {summary['num_steps']} steps, {summary['seconds']:.1f} s"
    )


def _print_eval_table(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"elborl eval: {summary['checkpoint']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    if "overall" in summary:
        table.add_row("overall (mean over categories)", f"{summary['overall']:.3f}")
        for cat, acc in summary["category_accuracy"].items():
            images = summary["category_images"][cat]
            table.add_row(f"  {cat}", f"{acc:.3f}  ({images} images)")
    table.add_row("accuracy (all images)", f"{summary['accuracy']:.3f}")
    table.add_row("mean reward", f"{summary['mean_reward']:.3f}")
    for clause, acc in sorted(summary["clause_accuracy"].items()):
        table.add_row(f"  {clause}", f"{acc:.3f}")
    if "pass_at_k" in summary:
        k, pk = summary["pass_at_k"]["k"], summary["pass_at_k"]
        table.add_row(f"pass@1 / pass@{k} overall", _pass_row(pk["overall"], k))
        for cat, row in pk["categories"].items():
            table.add_row(f"  {cat}", _pass_row(row, k))
    table.add_row("prompts / images", f"{summary['num_prompts']} / {summary['num_images']}")
    table.add_row("sampler", f"{summary['sampler']}, {summary['num_steps']} steps")
    table.add_row("seconds", f"{summary['seconds']:.1f}")
    Console(file=sys.stdout).print(table)


def _pass_row(row: dict[str, float], k: int) -> str:
    return f"{row['pass@1']:.3f} / {row[f'pass@{k}']:.3f}"


def run_train(cfg: RunConfig, args: argparse.Namespace) -> int:
    """``elborl train``: the distributed RL driver (see services/driver.py)."""
    from services.driver import train

    return train(cfg, address=args.address, resume=args.resume, config_path=args.config)
