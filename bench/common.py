"""Shared plumbing of the benchmarks: arguments, the machine's description, result files.

Every benchmark is ``python -m bench.NAME [--quick] [--out DIR]`` and writes
``DIR/NAME.json`` (the numbers and the command line) and ``DIR/NAME.md`` (a markdown table),
by default into ``docs/results/``. ``--quick`` runs a tiny version: a smoke test that the
benchmark works, whose figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "docs" / "results"
BASE = REPO / "checkpoints" / "shapes-base"  # the shipped base model every benchmark starts from


def parse_args(name: str, doc: str | None, argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=doc)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a figure")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for NAME.json / NAME.md")
    return p.parse_args(argv)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import torch

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
        info["cpu_model"] = model
    except (OSError, StopIteration):
        pass
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        pass
    return info


def timed(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeat`` calls of ``fn`` after ``warmup`` unmeasured ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def write(
    name: str,
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    summary: dict[str, Any],
    notes: str = "",
) -> Path:
    """``NAME.json`` and ``NAME.md`` under ``args.out``; returns the markdown path."""
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "command": "python -m bench." + name + (" --quick" if args.quick else ""),
        "quick": bool(args.quick),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
        "summary": summary,
        "rows": rows,
    }
    (args.out / f"{name}.json").write_text(json.dumps(record, indent=1, default=float) + "\n")
    md = [f"### `{record['command']}`", ""]
    if notes:
        md += [notes, ""]
    md += table(rows)
    md += ["", "| summary | value |", "|---|---|"]
    md += [f"| {k} | {fmt(v)} |" for k, v in summary.items()]
    path = args.out / f"{name}.md"
    path.write_text("\n".join(md) + "\n")
    print("\n".join(md), file=sys.stdout)
    return path


def table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return out


def fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "n/a"
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)
