"""``elborl status``: ask a status service for its runs and print them as a table."""

from __future__ import annotations

import json
import sys
import time
from typing import Any
from urllib.parse import quote

import httpx
from rich.console import Console
from rich.table import Table

STATE_STYLE = {
    "running": "green",
    "starting": "cyan",
    "stopping": "yellow",
    "stopped": "yellow",
    "finished": "bold green",
    "failed": "bold red",
}


def print_status(url: str, token: str, run: str | None, as_json: bool) -> int:
    """Print the run list (or one run); 1 when the service cannot be reached or refuses."""
    path = f"/api/v1/runs/{quote(run, safe='')}" if run else "/api/v1/runs"
    try:
        resp = httpx.get(url + path, headers={"Authorization": f"Bearer {token}"}, timeout=10)
    except httpx.HTTPError as exc:
        print(f"elborl status: cannot reach {url} ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 1
    if resp.status_code != 200:
        detail = _detail(resp)
        print(f"elborl status: {url}{path}: {resp.status_code} {detail}", file=sys.stderr)
        return 1
    body = resp.json()
    console = Console(file=sys.stdout)
    if as_json:
        print(json.dumps(body, indent=1))
    elif run:
        console.print(_detail_table(body))
        if body.get("workers"):
            console.print(_workers_table(body["workers"]))
    else:
        console.print(_list_table(body["runs"], url))
    return 0


def _detail(resp: httpx.Response) -> str:
    try:
        return str(resp.json().get("detail", ""))
    except ValueError:
        return resp.text[:200]


def _list_table(runs: list[dict[str, Any]], url: str) -> Table:
    table = Table(title=f"elborl runs at {url}")
    for col in ("run", "state", "round", "reward", "held-out acc", "updated"):
        table.add_column(col, justify="left" if col in ("run", "state") else "right")
    for r in runs:
        table.add_row(
            r["run_id"],
            _state(r["state"]),
            f"{r['round']}/{r['total_rounds'] or '?'}",
            _f(r["reward_mean"]),
            _f(r["accuracy"]),
            _ago(r["updated"]),
        )
    return table


def _detail_table(d: dict[str, Any]) -> Table:
    table = Table(title=f"elborl run {d['run_id']}", show_header=False)
    table.add_column("field")
    table.add_column("value")
    rows = [
        ("state", _state(d["state"])),
        ("error", d["error"] or ""),
        ("round", f"{d['round']}/{d['total_rounds'] or '?'}"),
        ("policy version", _f(d["policy_version"], "d")),
        ("reward (mean +- std)", f"{_f(d['reward_mean'])} +- {_f(d['reward_std'])}"),
        ("held-out accuracy", f"{_f(d['accuracy'])} (round {d['accuracy_round'] or '-'})"),
        ("images/s", _f(d["images_per_s"], ".1f")),
        ("seconds/round", _f(d["seconds_per_round"], ".1f")),
        ("ETA", _duration(d["eta_s"])),
        ("last checkpoint", d["last_checkpoint"] or "-"),
        ("stop requested", "yes" if d["stop_requested"] else "no"),
        ("updated", _ago(d["updated"])),
    ]
    rows += [(f"config {k}", str(v)) for k, v in d["config"].items()]
    for name, value in rows:
        if value:
            table.add_row(name, value)
    return table


def _workers_table(workers: list[dict[str, Any]]) -> Table:
    table = Table(title="workers")
    for col in ("role", "workers", "alive", "restarts", "nodes"):
        table.add_column(col)
    for w in workers:
        alive = "?" if w["alive"] is None else str(w["alive"])
        style = "green" if w["alive"] == w["num_workers"] else "bold red"
        table.add_row(
            w["role"],
            str(w["num_workers"]),
            f"[{style}]{alive}[/]",
            str(w["restarts"]),
            ", ".join(n[:8] for n in w["nodes"]),
        )
    return table


def _state(state: str) -> str:
    return f"[{STATE_STYLE.get(state, 'white')}]{state}[/]"


def _f(v: float | None, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _ago(t: float | None) -> str:
    return "-" if t is None else f"{_duration(max(0.0, time.time() - t))} ago"
