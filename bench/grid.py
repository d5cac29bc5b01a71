"""The paper's central comparison on ``shapes``: likelihood estimator x sampler x loss.

Cells (same base model, prompts, seeds, rounds and images per round):

- trajectory + SDE with its own GRPO loss: the Flow-GRPO baseline;
- ELBO + SDE and ELBO + ODE (dpm2), each with EPG, PEPG, PAR and GRPO.

Every cell is a real ``elborl train`` run (a subprocess with its own local Ray cluster).
Recorded per cell: held-out accuracy and mean reward at each evaluation, training reward per
round, wall-clock, and the time to reach a target accuracy (the base model's held-out accuracy
+ ``--target-gain``). The headline pair (trajectory + SDE vs ELBO + ODE with PEPG) runs with
several seeds. Writes ``grid.json``, ``grid.md`` (a table in the shape of the paper's
Table B) and ``grid_curves.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.common import BASE, REPO, RESULTS, fmt, machine

LOSSES = ("epg", "pepg", "par", "grpo")
HEADLINE = (("trajectory", "sde", "grpo"), ("elbo", "ode", "pepg"))


def cells() -> list[tuple[str, str, str]]:
    out = [("trajectory", "sde", "grpo")]
    out += [("elbo", sampler, loss) for sampler in ("sde", "ode") for loss in LOSSES]
    return out


def label(est: str, sampler: str, loss: str) -> str:
    return f"{'Trajectory' if est == 'trajectory' else 'ELBO'} + {sampler.upper()}, {loss.upper()}"


def cell_config(
    est: str, sampler: str, loss: str, seed: int, runs_dir: str, quick: bool
) -> dict[str, Any]:
    prompts, images, rounds = (2, 4, 1) if quick else (8, 8, 12)
    return {
        "name": f"{est}-{sampler}-{loss}-s{seed}",
        "seed": seed,
        "runs_dir": runs_dir,
        "model": {"checkpoint": str(BASE)},
        "eval": {
            "max_prompts": 8 if quick else None,
            "images_per_prompt": 1,
            "sampling": {"sampler": "euler", "num_steps": 4 if quick else 20},
        },
        "rollout": {
            "prompts_per_round": prompts,
            "images_per_prompt": images,
            "resources": {"num_cpus": 0.5, "torch_threads": 2},
            "sampling": {"sampler": "dpm2" if sampler == "ode" else "sde", "num_steps": 10},
        },
        "rewards": {
            "functions": [
                {"name": "shapes", "weight": 0.5},
                {"name": "shapes_strict", "weight": 0.5},
            ],
            "resources": {"num_cpus": 0.25, "torch_threads": 1},
        },
        "learner": {
            "estimator": est,
            "loss": loss,
            # GRPO as the method defines it: the standard advantage, std over the round
            **({"advantage": "standard", "advantage_std": "round"} if loss == "grpo" else {}),
            "num_timesteps": 2,
            "microbatch_size": 8 if quick else 32,
            "lr": 1e-4,
            "kl_beta": 0.01,
            "resources": {"num_cpus": 1, "torch_threads": 2},
        },
        "train": {
            "rounds": rounds,
            "eval_every": rounds // 2 if not quick else 0,
            "checkpoint_every": 0,
            "sample_grid_every": 0,
        },
    }


def run_cell(cfg: dict[str, Any], tmp: Path) -> dict[str, Any]:
    path = tmp / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", "train", "--config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        raise RuntimeError(f"{cfg['name']} failed:\n{proc.stderr[-3000:]}")
    wall = time.monotonic() - start
    lines = (Path(cfg["runs_dir"]) / cfg["name"] / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    t0 = recs[0]["time"] - recs[0]["timing/round"]
    return {
        "wall_s": wall,
        "rounds": [r["round"] for r in recs],
        "elapsed_s": [r["time"] - t0 for r in recs],
        "reward": [r["reward/mean"] for r in recs],
        "evals": [
            {
                "round": r["round"],
                "elapsed_s": r["time"] - t0,
                "accuracy": r["eval/accuracy"],
                "mean_reward": r["eval/mean_reward"],
            }
            for r in recs
            if "eval/accuracy" in r
        ],
    }


def base_accuracy(quick: bool, seed: int) -> dict[str, float]:
    cmd = [sys.executable, "-m", "services.cli", "eval", "--json", "--seed", str(seed + 1)]
    cmd += ["--num-images", "1", "--set", "eval.sampling.sampler=euler"]
    cmd += ["--max-prompts", "8", "--set", "eval.sampling.num_steps=4"] if quick else []
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    summary = json.loads(proc.stdout)
    return {"accuracy": summary["accuracy"], "mean_reward": summary["mean_reward"]}


def time_to(evals: list[dict[str, Any]], target: float) -> float:
    """Seconds until the first evaluation at or above ``target`` (NaN if never)."""
    return next((e["elapsed_s"] for e in evals if e["accuracy"] >= target), math.nan)


def summarize(
    results: dict[str, list[dict[str, Any]]], base: float, gain: float
) -> list[dict[str, Any]]:
    rows = []
    for name, runs in results.items():
        final = [r["evals"][-1]["accuracy"] for r in runs if r["evals"]]
        final_r = [r["evals"][-1]["mean_reward"] for r in runs if r["evals"]]
        ttt = [time_to(r["evals"], base + gain) for r in runs]
        rows.append(
            {
                "cell": name,
                "seeds": len(runs),
                "final held-out acc": float(np.mean(final)) if final else math.nan,
                "acc spread (sd)": float(np.std(final)) if len(final) > 1 else math.nan,
                "final held-out reward": float(np.mean(final_r)) if final_r else math.nan,
                "train reward, last 3 rounds": float(
                    np.mean([np.mean(r["reward"][-3:]) for r in runs])
                ),
                "wall s per run": float(np.mean([r["wall_s"] for r in runs])),
                "s per round": float(
                    np.mean([r["elapsed_s"][-1] / len(r["rounds"]) for r in runs])
                ),
                f"s to acc >= {base + gain:.3f}": float(np.nanmedian(ttt))
                if not all(map(math.isnan, ttt))
                else math.nan,
            }
        )
    return rows


def plot(results: dict[str, list[dict[str, Any]]], base: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, runs in results.items():
        style = "-" if "ODE" in name else "--" if "SDE, " in name and "ELBO" in name else ":"
        lw = 2.5 if name in {label(*h) for h in HEADLINE} else 1.0
        r0 = runs[0]
        rew = np.mean([r["reward"] for r in runs], axis=0)
        axes[0].plot(r0["rounds"], rew, style, lw=lw, label=name)
        ev_round = [e["round"] for e in r0["evals"]]
        acc = np.mean([[e["accuracy"] for e in r["evals"]] for r in runs], axis=0)
        ev_time = np.mean([[e["elapsed_s"] for e in r["evals"]] for r in runs], axis=0)
        axes[1].plot([0, *ev_round], [base["accuracy"], *acc], style, marker="o", lw=lw, label=name)
        axes[2].plot([0, *ev_time], [base["accuracy"], *acc], style, marker="o", lw=lw, label=name)
    axes[0].set(
        xlabel="round", ylabel="training reward (mean over seeds)", title="reward vs rounds"
    )
    axes[1].set(xlabel="round", ylabel="held-out accuracy", title="accuracy vs rounds")
    axes[2].set(
        xlabel="wall-clock s (2-core CPU)",
        ylabel="held-out accuracy",
        title="accuracy vs wall-clock",
    )
    for ax in axes[1:]:
        ax.axhline(base["accuracy"], color="grey", lw=0.8)
    axes[2].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.grid", description=__doc__)
    p.add_argument("--quick", action="store_true", help="two cells, one round: a smoke test")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--seeds", type=int, default=3, help="seeds of the headline pair")
    p.add_argument("--target-gain", type=float, default=0.02, help="accuracy over the base")
    args = p.parse_args(argv)
    todo = [(c, 0) for c in (HEADLINE if args.quick else cells())]
    todo += [(h, s) for h in HEADLINE for s in range(1, 1 if args.quick else args.seeds)]
    results: dict[str, list[dict[str, Any]]] = {}
    base = base_accuracy(args.quick, 0)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (cell, seed) in enumerate(todo, 1):
            print(f"[{i}/{len(todo)}] {label(*cell)} seed {seed}", file=sys.stderr, flush=True)
            cfg = cell_config(*cell, seed, str(Path(tmp) / "runs"), args.quick)
            results.setdefault(label(*cell), []).append(run_cell(cfg, Path(tmp)))
    rows = summarize(results, base["accuracy"], args.target_gain)
    traj, ode = (next(r for r in rows if r["cell"] == label(*h)) for h in HEADLINE)
    key = next(k for k in rows[0] if k.startswith("s to acc"))
    ratio = (
        traj[key] / ode[key] if not (math.isnan(traj[key]) or math.isnan(ode[key])) else math.nan
    )
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "grid",
        "command": "python -m bench.grid" + (" --quick" if args.quick else ""),
        "quick": args.quick,
        "machine": machine(),
        "base": base,
        "target_accuracy": base["accuracy"] + args.target_gain,
        "headline": {
            "wall_clock_to_target_trajectory_over_elbo_ode": ratio,
            "s_per_round_trajectory_over_elbo_ode": traj["s per round"] / ode["s per round"],
        },
        "rows": rows,
        "runs": results,
    }
    (args.out / "grid.json").write_text(json.dumps(record, indent=1, default=float) + "\n")
    md = [
        f"### `{record['command']}`",
        "",
        f"Base model: held-out accuracy {base['accuracy']:.3f}, "
        f"mean reward {base['mean_reward']:.3f}; target = base + {args.target_gain}.",
        "",
    ]
    keys = list(rows[0])
    md += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    md += ["", "| headline | value |", "|---|---|"]
    md += [f"| {k} | {fmt(v)} |" for k, v in record["headline"].items()]
    (args.out / "grid.md").write_text("\n".join(md) + "\n")
    plot(results, base, args.out / "grid_curves.png")
    print("\n".join(md))


if __name__ == "__main__":
    main()
