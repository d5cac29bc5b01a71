"""The paper's central comparison on ``shapes``: likelihood estimator x sampler x loss.

Twelve cells, {trajectory + SDE, ELBO + SDE, ELBO + ODE (dpm2)} x {EPG, PEPG, PAR, GRPO}.
GRPO cells use the method's settings: the standard advantage with the round-level std. Each
cell is the main job (``configs/shapes.yaml``, read when the grid runs) with only the cell's
fields changed: estimator, loss, rollout sampler, advantage, seed, name and run root (plus
``--rounds`` / ``--eval-every`` when given). Every cell is a real ``elborl train`` run: a
subprocess with its own local Ray cluster.

The headline pair runs ``--seeds`` seeds: trajectory + SDE with GRPO (Flow-GRPO) and ELBO +
ODE with PEPG (the paper's recipe). The other cells run seed 0. The base model's held-out
GenEval score (``overall``, the mean over categories) is each run's round 0 when
``train.eval_at_start`` is set. Otherwise ``elborl eval --json`` measures it with the run's
eval settings and seed. The target is base + ``--target-gain``. Time-to-target is the
wall-clock (and rollout images) until held-out overall first reaches it.

Resumable: each finished (cell, seed) is saved as ``OUT/grid_runs/<name>.json``. A rerun skips
the saved ones whose settings (config and base checkpoint) still match. It then rebuilds the
summary from every matching saved run. Writes ``grid.json``, ``grid.md``, ``grid_curves.png``
and ``grid_categories.png``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import math
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.common import REPO, RESULTS, fmt, machine

Cell = tuple[str, str, str]  # (estimator, sampler, loss)
Run = dict[str, Any]
Results = dict[str, list[Run]]  # cell label -> its runs, by seed

LOSSES = ("epg", "pepg", "par", "grpo")
ESTIMATOR_SAMPLERS = (("trajectory", "sde"), ("elbo", "sde"), ("elbo", "ode"))
HEADLINE: tuple[Cell, Cell] = (("trajectory", "sde", "grpo"), ("elbo", "ode", "pepg"))
SAMPLER = {"sde": "sde", "ode": "dpm2"}
CONFIG = REPO / "configs" / "shapes.yaml"
PAPER_RATIO = 4.6  # the paper's wall-clock speed-up of ELBO + ODE over Flow-GRPO


def cells() -> list[Cell]:
    return [(e, s, loss) for e, s in ESTIMATOR_SAMPLERS for loss in LOSSES]


def label(cell: Cell) -> str:
    est, sampler, loss = cell
    return f"{'Trajectory' if est == 'trajectory' else 'ELBO'} + {sampler.upper()}, {loss.upper()}"


def short(cell: Cell) -> str:
    return "-".join(cell)


def parse_cells(spec: str | None, quick: bool) -> list[Cell]:
    """``--cells``: short names or labels (themselves holding a comma), comma-separated;
    default all (quick: the headline pair)."""
    if not spec:
        return list(HEADLINE) if quick else cells()
    names = {_norm(short(c)): c for c in cells()} | {_norm(label(c)): c for c in cells()}
    parts, chosen = [_norm(p) for p in spec.split(",") if p.strip()], []
    while parts:
        pair = ",".join(parts[:2])
        n = 2 if pair in names and len(parts) > 1 else 1
        key = pair if n == 2 else parts[0]
        if key not in names:
            raise SystemExit(f"unknown cell {key!r}; choose from {', '.join(map(short, cells()))}")
        chosen.append(names[key])
        parts = parts[n:]
    return [c for c in cells() if c in chosen]


def _norm(text: str) -> str:
    return "".join(text.lower().split())


def plan(chosen: list[Cell], seeds: int) -> list[tuple[Cell, int]]:
    """The headline pair first (seed by seed, so a partial grid still pairs), then the rest."""
    head = [(c, s) for s in range(seeds) for c in HEADLINE if c in chosen]
    return head + [(c, 0) for c in chosen if c not in HEADLINE]


def run_name(cell: Cell, seed: int, quick: bool) -> str:
    return f"{'quick-' if quick else ''}{short(cell)}-s{seed}"


# ---------------------------------------------------------------------------- configs
def cell_config(cell: Cell, seed: int, runs_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    """The main job's config with only the cell's fields (and the size options) changed."""
    est, sampler, loss = cell
    cfg: dict[str, Any] = yaml.safe_load(Path(args.config).read_text())
    cfg.update(name=run_name(cell, seed, args.quick), seed=seed, runs_dir=runs_dir)
    learner = cfg.setdefault("learner", {})
    learner.update(estimator=est, loss=loss)
    if loss == "grpo":  # GRPO as the method defines it: standard advantage, round-level std
        learner.update(advantage="standard", advantage_std="round")
    cfg.setdefault("rollout", {}).setdefault("sampling", {})["sampler"] = SAMPLER[sampler]
    if args.quick:
        shrink(cfg)
    train = cfg.setdefault("train", {})
    if args.rounds is not None:
        train["rounds"] = args.rounds
    if args.eval_every is not None:
        train["eval_every"] = args.eval_every
    return cfg


def shrink(cfg: dict[str, Any]) -> None:
    """``--quick``: one round of 2 x 4 images, 24 eval images with 4 Euler steps."""
    roll = cfg.setdefault("rollout", {})
    roll.update(prompts_per_round=2, images_per_prompt=4)
    roll.setdefault("sampling", {})["num_steps"] = 4
    cfg["eval"] = {
        **cfg.get("eval", {}),
        "images_per_prompt": 1,
        "images_per_category": 4,
        "max_prompts": 12,  # two per category: the held-out list alternates categories
        "sampling": {"sampler": "euler", "num_steps": 4},
    }
    cfg.setdefault("learner", {})["microbatch_size"] = 8
    cfg.setdefault("train", {}).update(
        rounds=1, eval_every=0, checkpoint_every=0, sample_grid_every=0
    )


def fingerprint(cfg: dict[str, Any]) -> dict[str, Any]:
    """What a saved run must match to be reused: its config (bar the run root) and the
    base checkpoint's bytes."""
    ckpt = Path(cfg.get("model", {}).get("checkpoint") or "")
    return {
        "config": {k: v for k, v in cfg.items() if k != "runs_dir"},
        "checkpoint_sha256": checkpoint_digest(ckpt if ckpt.is_absolute() else REPO / ckpt),
    }


@functools.cache
def checkpoint_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(path.glob("*")) if path.is_dir() else []:
        digest.update(f.name.encode() + f.read_bytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------- runs
def run_cell(cfg: dict[str, Any], tmp: Path) -> Run:
    """One ``elborl train`` run; its metrics as a run record."""
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
    run = parse_metrics([json.loads(line) for line in lines if line.strip()], cfg)
    run["wall_s"] = wall
    if run["base"] is None:
        run["base"] = base_eval(path, int(cfg["seed"]))
    return run


def eval_point(r: dict[str, Any]) -> dict[str, Any]:
    """One evaluation's figures from a ``metrics.jsonl`` record."""
    cats = {k.removeprefix("eval/category_"): v for k, v in r.items() if "eval/category_" in k}
    return {
        "overall": r.get("eval/overall", r["eval/accuracy"]),
        "accuracy": r["eval/accuracy"],
        "mean_reward": r["eval/mean_reward"],
        "categories": cats,
    }


def parse_metrics(recs: list[dict[str, Any]], cfg: dict[str, Any]) -> Run:
    """Rounds, elapsed seconds (since round 1 started), training reward and evaluations.

    Elapsed counts from the end of the round-0 evaluation of the base when there is one,
    else from round 1's start (its ``time`` less ``timing/round`` and its evaluation)."""
    roll = cfg["rollout"]
    per_round = int(roll["prompts_per_round"]) * int(roll["images_per_prompt"])
    start = next((r for r in recs if r["round"] == 0), None)
    train = [r for r in recs if r["round"] > 0]
    first = train[0]
    t0 = (
        start["time"]
        if start
        else first["time"] - first["timing/round"] - first.get("timing/eval", 0.0)
    )
    train_s = np.cumsum([r["timing/round"] for r in train]).tolist()
    evals = [
        {
            "round": r["round"],
            "elapsed_s": r["time"] - t0 if r["round"] else 0.0,
            "train_s": train_s[r["round"] - 1] if r["round"] else 0.0,
            "images": r["round"] * per_round,
            **eval_point(r),
        }
        for r in recs
        if "eval/accuracy" in r
    ]
    return {
        "rounds": [r["round"] for r in train],
        "elapsed_s": [r["time"] - t0 for r in train],
        "round_s": [r["timing/round"] for r in train],
        "reward": [r["reward/mean"] for r in train],
        "images_per_round": per_round,
        "evals": evals,
        "base": eval_point(start) if start else None,
    }


def base_eval(config: Path, seed: int) -> dict[str, Any]:
    """The base model's held-out figures with the run's eval settings and eval seed (for a
    config without ``train.eval_at_start``)."""
    from algo.seeds import EVAL_OFFSET

    cmd = [sys.executable, "-m", "services.cli", "eval", "--config", str(config), "--json"]
    cmd += ["--seed", str(seed + EVAL_OFFSET)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    s = json.loads(proc.stdout)
    return {
        "overall": s.get("overall", s["accuracy"]),
        "accuracy": s["accuracy"],
        "mean_reward": s["mean_reward"],
        "categories": s.get("category_accuracy", {}),
    }


def save(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=float) + "\n")
    tmp.replace(path)


def matches(run: Run, args: argparse.Namespace) -> bool:
    """Whether a saved run was made with today's settings (config and base checkpoint)."""
    cell = tuple(run["key"])
    want = fingerprint(cell_config((cell[0], cell[1], cell[2]), run["seed"], "", args))
    return run.get("fingerprint") == json.loads(json.dumps(want, default=float))


def saved(runs: Path, cell: Cell, seed: int, args: argparse.Namespace) -> Run | None:
    """The saved run of (cell, seed) if its settings match today's, else None."""
    path = runs / f"{run_name(cell, seed, args.quick)}.json"
    run: Run | None = json.loads(path.read_text()) if path.exists() else None
    return run if run is not None and matches(run, args) else None


def run_grid(todo: list[tuple[Cell, int]], runs: Path, args: argparse.Namespace) -> None:
    """Run the (cell, seed) pairs not saved yet, saving each as it finishes, within budget."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        for i, (cell, seed) in enumerate(todo, 1):
            name, head = run_name(cell, seed, args.quick), f"[{i}/{len(todo)}]"
            if saved(runs, cell, seed, args) is not None:
                print(f"{head} skip {name} (saved)", file=sys.stderr, flush=True)
                continue
            spent = (time.monotonic() - start) / 60
            if args.budget_minutes is not None and spent >= args.budget_minutes:
                left = len(todo) - i + 1
                print(f"budget spent ({spent:.1f} min): {left} left", file=sys.stderr)
                return
            if (runs / f"{name}.json").exists():
                print(f"{head} {name}: saved with other settings, rerunning", file=sys.stderr)
            print(f"{head} {label(cell)} seed {seed}", file=sys.stderr, flush=True)
            cfg = cell_config(cell, seed, str(Path(tmp) / "runs"), args)
            run = {"cell": label(cell), "key": list(cell), "seed": seed}
            run |= run_cell(cfg, Path(tmp))
            save(runs / f"{name}.json", {**run, "fingerprint": fingerprint(cfg)})
            print(f"{head} saved {name} ({run['wall_s']:.0f} s)", file=sys.stderr, flush=True)


def load_results(runs: Path, args: argparse.Namespace) -> Results:
    """Every saved run of this mode whose settings match today's, by cell (in the grid's
    order), then seed."""
    found: dict[str, list[Run]] = {}
    for path in sorted(runs.glob("*.json")):
        if path.name.startswith("quick-") != args.quick:
            continue
        run: Run = json.loads(path.read_text())
        if not matches(run, args):
            print(f"not summarized: {path.name} (other settings)", file=sys.stderr)
            continue
        found.setdefault(run["cell"], []).append(run)
    order = [label(c) for c in cells()]
    return {k: sorted(found[k], key=lambda r: r["seed"]) for k in order if k in found}


# ---------------------------------------------------------------------------- summary
def target(run: Run, gain: float) -> float:
    return float(run["base"]["overall"]) + gain


def time_to(run: Run, gain: float, key: str) -> float:
    """``key`` (elapsed_s, train_s or images) at the first evaluation at or above the run's
    target (NaN if never)."""
    hit = (e for e in run["evals"] if e["round"] > 0 and e["overall"] >= target(run, gain))
    return float(next((e[key] for e in hit), math.nan))


def stat(xs: Sequence[float], fn: Callable[[Any], Any]) -> float:
    """``fn`` over the finite values (NaN if none)."""
    good = [x for x in xs if not math.isnan(x)]
    return float(fn(good)) if good else math.nan


def median_all(xs: Sequence[float]) -> float:
    """The median, NaN when any value is (a seed that never reached the target)."""
    return math.nan if not xs or any(map(math.isnan, xs)) else float(np.median(xs))


def summary_row(name: str, runs: list[Run], gain: float) -> dict[str, Any]:
    finals = [r["evals"][-1] for r in runs]
    overall = [f["overall"] for f in finals]
    row: dict[str, Any] = {
        "cell": name,
        "seeds": len(runs),
        "base overall": stat([r["base"]["overall"] for r in runs], np.mean),
        "final overall": stat(overall, np.mean),
        "sd": stat(overall, np.std) if len(runs) > 1 else math.nan,
    }
    for cat in finals[0]["categories"]:
        row[cat] = stat([f["categories"].get(cat, math.nan) for f in finals], np.mean)
    ttt = [time_to(r, gain, "elapsed_s") for r in runs]
    return row | {
        "final accuracy": stat([f["accuracy"] for f in finals], np.mean),
        "s per round": stat([float(np.mean(r["round_s"])) for r in runs], np.mean),
        "wall s per run": stat([r["wall_s"] for r in runs], np.mean),
        "s to target (median)": median_all(ttt),
        "images to target (median)": median_all([time_to(r, gain, "images") for r in runs]),
        "reached": f"{sum(not math.isnan(t) for t in ttt)}/{len(runs)}",
    }


def ratio(traj: list[Run], ode: list[Run], gain: float, key: str) -> dict[str, Any]:
    """Trajectory + SDE over ELBO + ODE time-to-target (``key``): the median and min-max
    over every (trajectory seed, ELBO + ODE seed) pairing. NaN, with the reason, when a run
    never reached the target. If every ELBO + ODE run did, a trajectory run that did not is
    right-censored: its time-to-target exceeds its last evaluation's, so with that in its
    place each pairing's ratio is a lower bound, and ``lower_bound`` (their median) is one
    for the median ratio (``lower_bound_min``: for the smallest)."""
    a = [time_to(r, gain, key) for r in traj]
    b = [time_to(r, gain, key) for r in ode]
    out: dict[str, Any] = {"pairings": len(a) * len(b), "spread": "min-max over seed pairings"}
    missed = [_missed(rs, ts) for rs, ts in ((traj, a), (ode, b)) if any(map(math.isnan, ts))]
    if a and b and not missed:
        rs = [x / y for x, y in itertools.product(a, b)]
        return out | {"median": float(np.median(rs)), "min": min(rs), "max": max(rs)}
    why = "never reached the target: " + "; ".join(missed) if missed else "a cell has no run"
    out |= {"median": math.nan, "min": math.nan, "max": math.nan, "why": why}
    if a and b and not any(map(math.isnan, b)):
        last = [float(r["evals"][-1][key]) for r in traj]
        at_least = [x if math.isnan(t) else t for x, t in zip(last, a, strict=True)]
        rs = [x / y for x, y in itertools.product(at_least, b)]
        out |= {"lower_bound": float(np.median(rs)), "lower_bound_min": min(rs)}
    return out


def _missed(runs: list[Run], times: list[float]) -> str:
    seeds = [str(r["seed"]) for r, t in zip(runs, times, strict=True) if math.isnan(t)]
    return f"{runs[0]['cell']} seed(s) {', '.join(seeds)}"


def headline(results: Results, gain: float) -> dict[str, Any]:
    traj, ode = (results.get(label(h), []) for h in HEADLINE)
    per_round = [float(np.mean([np.mean(r["round_s"]) for r in rs])) for rs in (traj, ode) if rs]
    return {
        "wall_clock_to_target_trajectory_over_elbo_ode": ratio(traj, ode, gain, "elapsed_s"),
        "images_to_target_trajectory_over_elbo_ode": ratio(traj, ode, gain, "images"),
        "train_time_to_target_trajectory_over_elbo_ode": ratio(traj, ode, gain, "train_s"),
        "s_per_round_trajectory_over_elbo_ode": per_round[0] / per_round[1]
        if len(per_round) == 2
        else math.nan,
        "paper_wall_clock_ratio": PAPER_RATIO,
    }


def headline_md(head: dict[str, Any], gain: float) -> list[str]:
    md = [f"Headline: {label(HEADLINE[0])} over {label(HEADLINE[1])}, to base + {gain:g}.", ""]
    md += ["| ratio | median | spread | paper |", "|---|---|---|---|"]
    for key, what in (
        ("wall_clock_to_target", "wall-clock to target"),
        ("images_to_target", "rollout images to target"),
        ("train_time_to_target", "training time to target (evaluations excluded)"),
    ):
        h = head[f"{key}_trajectory_over_elbo_ode"]
        spread = f"{fmt(h['min'])}-{fmt(h['max'])} ({h['spread']}, {h['pairings']})"
        if "why" in h:
            bound = (
                f"; median ratio >= {fmt(h['lower_bound'])} (each pairing >= "
                f"{fmt(h['lower_bound_min'])}), a run that missed counted at its last evaluation"
                if "lower_bound" in h
                else ""
            )
            spread = f"n/a: {h['why']}{bound}"
        paper = f"{PAPER_RATIO}x" if key == "wall_clock_to_target" else ""
        md.append(f"| {what} | {fmt(h['median'])} | {spread} | {paper} |")
    md.append(f"| s per round | {fmt(head['s_per_round_trajectory_over_elbo_ode'])} | | |")
    return md


# ---------------------------------------------------------------------------- plots
def mean_curve(runs: list[Run], x: str, y: Callable[[dict[str, Any]], float]) -> Any:
    """Mean over seeds of (x, y) at the evaluation rounds every seed has (round 0 = base)."""
    common = set.intersection(*({e["round"] for e in r["evals"]} for r in runs))
    pts = [[e for e in r["evals"] if e["round"] in common] for r in runs]
    xs = np.mean([[e[x] for e in p] for p in pts], axis=0)
    return xs, np.mean([[y(e) for e in p] for p in pts], axis=0)


def style(name: str) -> dict[str, Any]:
    loss = name.rsplit(", ", 1)[1].lower()
    ls = ":" if name.startswith("Trajectory") else "--" if "SDE" in name else "-"
    heads = {label(h) for h in HEADLINE}
    color = f"C{LOSSES.index(loss)}"
    return {"ls": ls, "color": color, "lw": 2.5 if name in heads else 1.0, "marker": "o", "ms": 3}


def _figure(n: int, cols: int, size: tuple[float, float]) -> tuple[Any, Any, list[Any]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    return plt, fig, list(axes.flat)


def plot_curves(results: Results, gain: float, path: Path) -> None:
    plt, fig, axes = _figure(3, 3, (5.3, 4.5))
    for name, runs in results.items():
        st = style(name)
        common = min(len(r["reward"]) for r in runs)
        rew = np.mean([r["reward"][:common] for r in runs], axis=0)
        axes[0].plot(runs[0]["rounds"][:common], rew, **{**st, "marker": None}, label=name)
        axes[1].plot(*mean_curve(runs, "round", lambda e: e["overall"]), **st, label=name)
        axes[2].plot(*mean_curve(runs, "elapsed_s", lambda e: e["overall"]), **st, label=name)
    axes[0].set(xlabel="round", ylabel="training reward (mean over seeds)", title="reward")
    axes[1].set(xlabel="round", ylabel="held-out overall (GenEval)", title="overall vs rounds")
    axes[2].set(xlabel="wall-clock s", ylabel="held-out overall", title="overall vs wall-clock")
    base = float(np.mean([r["base"]["overall"] for rs in results.values() for r in rs]))
    for ax in axes[1:]:
        ax.axhline(base, color="grey", lw=0.8)
        ax.axhline(base + gain, color="grey", lw=0.8, ls="--")
    fig.legend(*axes[1].get_legend_handles_labels(), fontsize=7, loc="lower center", ncol=6)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def category_value(e: dict[str, Any], cat: str) -> float:
    return float(e["overall"] if cat == "overall" else e["categories"].get(cat, math.nan))


def plot_categories(results: Results, path: Path) -> None:
    """One panel per category: every cell's held-out accuracy against rounds."""
    from matplotlib.lines import Line2D

    cats = list(next(iter(results.values()))[0]["evals"][0]["categories"]) or ["overall"]
    plt, fig, axes = _figure(len(cats), 3, (5.0, 3.8))
    for name, runs in results.items():
        for ax, cat in zip(axes, cats, strict=False):
            get = functools.partial(category_value, cat=cat)
            ax.plot(*mean_curve(runs, "round", get), **style(name))
    for ax, cat in zip(axes, cats, strict=False):
        ax.set(xlabel="round", ylabel="held-out accuracy", title=cat)
    handles = [Line2D([], [], **style(n)) for n in results]
    fig.legend(handles, list(results), fontsize=7, loc="lower center", ncol=4)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- outputs
def write_outputs(results: Results, args: argparse.Namespace, command: str, wall: float) -> str:
    rows = [summary_row(name, runs, args.target_gain) for name, runs in results.items()]
    head = headline(results, args.target_gain)
    total = sum(r["wall_s"] for rs in results.values() for r in rs)
    record = {
        "benchmark": "grid",
        "command": command,
        "quick": args.quick,
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
        "target_gain": args.target_gain,
        "wall_clock_s": {"this_sitting": wall, "all_saved_runs": total},
        "headline": head,
        "rows": rows,
        "runs": {k: [_public(r) for r in rs] for k, rs in results.items()},
    }
    (args.out / "grid.json").write_text(json.dumps(record, indent=1, default=float) + "\n")
    keys = list(rows[0])
    md = [f"### `{command}`", "", f"Target: each run's base overall + {args.target_gain:g}."]
    md += [f"Wall-clock: {wall / 60:.1f} min this sitting; {total / 60:.1f} min in all", ""]
    md += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    md += ["", *headline_md(head, args.target_gain)]
    (args.out / "grid.md").write_text("\n".join(md) + "\n")
    plot_curves(results, args.target_gain, args.out / "grid_curves.png")
    plot_categories(results, args.out / "grid_categories.png")
    return "\n".join(md)


def _public(run: Run) -> Run:
    return {k: v for k, v in run.items() if k != "fingerprint"}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.grid", description=__doc__)
    p.add_argument("--quick", action="store_true", help="the pair, one tiny round: a smoke test")
    p.add_argument("--out", type=Path, default=RESULTS, help="results; runs in OUT/grid_runs")
    p.add_argument("--config", type=Path, default=CONFIG, help="the main job's config")
    p.add_argument("--cells", help="comma-separated labels or names, e.g. trajectory-sde-grpo")
    p.add_argument("--seeds", type=int, help="seeds of the headline pair (default 3; quick 1)")
    p.add_argument("--rounds", type=int, help="override train.rounds")
    p.add_argument("--eval-every", type=int, help="override train.eval_every")
    p.add_argument("--budget-minutes", type=float, help="start no new cell after this long")
    p.add_argument("--target-gain", type=float, default=0.20, help="overall over the base")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    seeds = args.seeds if args.seeds is not None else 1 if args.quick else 3
    start, runs = time.monotonic(), args.out / "grid_runs"
    run_grid(plan(parse_cells(args.cells, args.quick), seeds), runs, args)
    results = load_results(runs, args)
    if not results:
        raise SystemExit(f"no finished runs in {runs}")
    command = shlex.join(["python", "-m", "bench.grid", *argv])
    print(write_outputs(results, args, command, time.monotonic() - start))


if __name__ == "__main__":
    main()
