"""Reading run directories for the API: status, metrics history, sample grids, checkpoints.

Everything comes from the files the driver writes (``services/run.py``), so the same code
serves a live run (``status.json`` and ``metrics.jsonl`` are rewritten every round, the former
atomically) and a finished one. The reader never writes, except the stop request.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast, get_args

import yaml

from services.api.control import STOP_FILE
from services.api.models import (
    MetricRecord,
    MetricsHistory,
    RoleHealth,
    RunDetail,
    RunState,
    RunSummary,
    SampleGrid,
)

# A run's detail is rebuilt when one of its files changes, and at least this often (seconds): a
# driver that died writes nothing, and its state must still turn to ``failed``.
DETAIL_TTL_S = 1.0
MAX_CACHED_QUERIES = 256  # serialized metrics-history answers kept (cleared when full)
GRID_NAME = re.compile(r"^(?P<eval>eval_)?round_(?P<round>\d{5,})\.png$")
LIVE_STATES = ("starting", "running", "stopping")
# The configuration fields worth a glance; a whitelist, so nothing else (and never the
# service section) reaches a response.
CONFIG_SUMMARY = (
    "name",
    "seed",
    "world.name",
    "world.image_size",
    "model.kind",
    "model.checkpoint",
    "model.lora.rank",
    "rollout.num_workers",
    "rollout.prompts_per_round",
    "rollout.images_per_prompt",
    "rollout.sampling.sampler",
    "rollout.sampling.num_steps",
    "rewards.num_actors",
    "learner.num_workers",
    "learner.zero_stage",
    "learner.loss",
    "learner.estimator",
    "learner.lr",
    "learner.kl_beta",
    "train.rounds",
    "train.async_rollout",
    "train.eval_every",
    "train.checkpoint_every",
)


@dataclass
class _HistoryCache:
    """``metrics.jsonl`` read incrementally: only bytes appended since the last read."""

    inode: int = -1
    offset: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)
    keys: set[str] = field(default_factory=set)


class RunsReader:
    """The runs under one directory (each a sub-directory with a config or a status file)."""

    def __init__(self, runs_dir: str | Path):
        self.root = Path(runs_dir)
        self._lock = threading.Lock()
        self._history: dict[str, _HistoryCache] = {}
        self._configs: dict[str, tuple[float, dict[str, Any]]] = {}
        # run id -> (fingerprint, when built, detail, the detail as JSON)
        self._details: dict[str, tuple[tuple[Any, ...], float, RunDetail, bytes]] = {}
        self._metrics_bodies: dict[tuple[Any, ...], bytes] = {}

    # ------------------------------------------------------------------ runs
    def run_ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if _is_run(p))

    def path(self, run_id: str) -> Path | None:
        """The run's directory, or None: only names that list as runs, never a path."""
        if not run_id or "/" in run_id or "\0" in run_id:
            return None
        path = self.root / run_id
        return path if _is_run(path) else None

    def status(self, run_id: str) -> dict[str, Any]:
        try:
            data = json.loads((self.root / run_id / "status.json").read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def summary(self, run_id: str) -> RunSummary:
        d = self.detail(run_id)
        return RunSummary(**{k: getattr(d, k) for k in RunSummary.model_fields})

    def detail(self, run_id: str) -> RunDetail:
        """The run's detail; cached until one of its files changes or ``DETAIL_TTL_S`` passes
        (a dashboard and scrapers polling many times a second cost a few ``stat`` calls)."""
        return self._cached_detail(run_id)[2]

    def detail_json(self, run_id: str) -> bytes:
        """``detail`` as JSON, serialized once per cached detail (what a poll costs is then a
        few ``stat`` calls and a send)."""
        return self._cached_detail(run_id)[3]

    def _cached_detail(self, run_id: str) -> tuple[tuple[Any, ...], float, RunDetail, bytes]:
        ckpt = _last_checkpoint(self.root / run_id)
        key = (*self._fingerprint(run_id), ckpt.name if ckpt else None)
        now = time.monotonic()
        with self._lock:
            hit = self._details.get(run_id)
        if hit is not None and hit[0] == key and now - hit[1] < DETAIL_TTL_S:
            return hit
        detail = self._detail(run_id, ckpt)
        entry = (key, now, detail, detail.model_dump_json().encode())
        with self._lock:
            self._details[run_id] = entry
        return entry

    def _fingerprint(self, run_id: str) -> tuple[Any, ...]:
        """What the detail is read from besides the newest complete checkpoint: its files'
        identities, sizes and modification times, and the stop request."""
        path = self.root / run_id
        stats: list[tuple[int, int, int] | None] = []
        for name in ("status.json", "metrics.jsonl", "config.yaml", STOP_FILE):
            try:
                st = (path / name).stat()
                stats.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                stats.append(None)
        return tuple(stats)

    def _detail(self, run_id: str, ckpt: Path | None) -> RunDetail:
        path = self.root / run_id
        st = self.status(run_id)
        state, error = _state(st, path)
        history = self.history(run_id)
        last = history[-1] if history else {}
        accuracy, accuracy_round = _latest(history, "eval/accuracy")
        config = self.config(run_id)
        return RunDetail(
            run_id=run_id,
            state=state,
            error=error,
            round=_int(st.get("round")) or _int(last.get("round")) or 0,
            total_rounds=_int(st.get("total_rounds")) or _int(_dig(config, "train.rounds")),
            reward_mean=_num(st.get("reward_mean", last.get("reward/mean"))),
            reward_std=_num(st.get("reward_std", last.get("reward/std"))),
            accuracy=_num(st.get("accuracy")) if st.get("accuracy") is not None else accuracy,
            accuracy_round=_int(st.get("accuracy_round")) or accuracy_round,
            updated=_num(st.get("updated")),
            policy_version=_version(st.get("version", last.get("weights/version"))),
            images_per_s=_num(st.get("images_per_s")),
            rollout_images_per_s=_num(
                st.get("rollout_images_per_s", last.get("rollout/images_per_s"))
            ),
            seconds_per_round=_num(st.get("seconds_per_round")),
            eta_s=_num(st.get("eta_s")) if state in ("running", "stopping") else None,
            started=_num(st.get("started")),
            stop_requested=(path / STOP_FILE).exists(),
            last_checkpoint=f"checkpoints/{ckpt.name}" if ckpt else None,
            last_checkpoint_round=_round_of(ckpt.name) if ckpt else None,
            samples_scored=_int(st.get("samples_scored", last.get("perf/samples_scored_total"))),
            samples_trained=_int(st.get("samples_trained", last.get("perf/samples_trained_total"))),
            workers=_workers(st.get("workers")),
            service_url=st.get("service_url") if isinstance(st.get("service_url"), str) else None,
            warnings=[w for w in st.get("warnings") or [] if isinstance(w, str)],
            config={k: v for k in CONFIG_SUMMARY if (v := _dig(config, k)) is not None},
        )

    def config(self, run_id: str) -> dict[str, Any]:
        """The run's resolved ``config.yaml`` (cached until it changes)."""
        path = self.root / run_id / "config.yaml"
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return {}
        cached = self._configs.get(run_id)
        if cached is None or cached[0] != mtime:
            try:
                data = yaml.safe_load(path.read_text())
            except (OSError, yaml.YAMLError):
                data = None
            cached = (mtime, data if isinstance(data, dict) else {})
            self._configs[run_id] = cached
        return cached[1]

    # ------------------------------------------------------------------ metrics
    def history(self, run_id: str) -> list[dict[str, Any]]:
        """Every round record of ``metrics.jsonl``; re-read from the start if it was replaced."""
        path = self.root / run_id / "metrics.jsonl"
        with self._lock:
            cache = self._history.setdefault(run_id, _HistoryCache())
            try:
                st = path.stat()
            except OSError:
                self._history[run_id] = _HistoryCache()
                return []
            if st.st_ino != cache.inode or st.st_size < cache.offset:
                cache = self._history[run_id] = _HistoryCache(inode=st.st_ino)
            if st.st_size > cache.offset:
                with open(path, "rb") as f:
                    f.seek(cache.offset)
                    chunk = f.read(st.st_size - cache.offset)
                complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written waits
                cache.offset += len(complete)
                for line in complete.splitlines():
                    rec = _parse_record(line)
                    if rec is not None:
                        cache.records.append(rec)
                        cache.keys.update(k for k in rec if k not in ("round", "time"))
            return cache.records

    def metrics_json(self, run_id: str, since: int, keys: list[str]) -> bytes:
        """``metrics`` as JSON, serialized once per history length and query (a few hundred
        queries are kept; a dashboard asks the same ones every few seconds)."""
        records = self.history(run_id)
        with self._lock:
            cache = self._history.get(run_id, _HistoryCache())
            # The file read so far (its identity, the bytes taken) names the records exactly.
            key = (run_id, cache.inode, cache.offset, len(records), since, tuple(keys))
            body = self._metrics_bodies.get(key)
        if body is None:
            body = self.metrics(run_id, since, keys).model_dump_json().encode()
            with self._lock:
                if len(self._metrics_bodies) >= MAX_CACHED_QUERIES:
                    self._metrics_bodies.clear()
                self._metrics_bodies[key] = body
        return body

    def metrics(self, run_id: str, since: int, keys: list[str]) -> MetricsHistory:
        records = self.history(run_id)
        with self._lock:
            all_keys = sorted(self._history[run_id].keys) if run_id in self._history else []
        wanted = set(keys) if keys else None
        out = []
        for rec in records:
            if rec["round"] <= since:
                continue
            values = {
                k: v
                for k, v in rec.items()
                if k not in ("round", "time") and (wanted is None or k in wanted)
            }
            out.append(MetricRecord(round=rec["round"], time=rec.get("time"), values=values))
        return MetricsHistory(run_id=run_id, keys=all_keys, records=out)

    # ------------------------------------------------------------------ samples
    def latest_grid(self, run_id: str, kind: str, url_prefix: str) -> SampleGrid | None:
        samples = self.root / run_id / "samples"
        if not samples.is_dir():
            return None
        grids = [
            (int(m["round"]), p)
            for p in samples.glob("*.png")
            if (m := GRID_NAME.match(p.name)) and bool(m["eval"]) == (kind == "eval")
        ]
        if not grids:
            return None
        round_, png = max(grids)
        try:
            captions = json.loads(png.with_suffix(".json").read_text())
        except (OSError, json.JSONDecodeError):
            captions = {}  # runs written before grids had captions
        return SampleGrid(
            run_id=run_id,
            round=round_,
            kind="eval" if kind == "eval" else "train",
            image_url=f"{url_prefix}/{png.name}",
            prompts=[str(p) for p in captions.get("prompts", [])],
            rewards=[_num(r) for r in captions.get("rewards", [])],
        )

    def grid_file(self, run_id: str, file_name: str) -> Path | None:
        if not GRID_NAME.match(file_name):
            return None
        samples = self.root / run_id / "samples"
        png = samples / file_name
        # Only a regular file written there: never a symlink out of the run directory.
        if png.is_symlink() or samples.is_symlink() or not png.is_file():
            return None
        return png


# ---------------------------------------------------------------------- helpers
def _is_run(path: Path) -> bool:
    """A run directory: not hidden (nor ``.``/``..``), with a status or a config file (a name
    the filesystem refuses, e.g. too long, is none)."""
    try:
        return (
            not path.name.startswith(".")
            and path.is_dir()
            and ((path / "status.json").exists() or (path / "config.yaml").exists())
        )
    except OSError:
        return False


def _state(status: dict[str, Any], path: Path) -> tuple[RunState, str | None]:
    """The state to report: the driver's, corrected when its process is visibly gone."""
    raw = status.get("state")
    state = cast(RunState, raw if raw in get_args(RunState) else "unknown")
    error = status.get("error") if isinstance(status.get("error"), str) else None
    if state in ("starting", "running") and (path / STOP_FILE).exists():
        state = "stopping"
    if state in LIVE_STATES and _driver_gone(status):
        state = "failed"
        error = error or (
            f"the driver (pid {status.get('pid')}) exited without recording an outcome; "
            "resume with `elborl train ... --resume`"
        )
    return state, error


def _driver_gone(status: dict[str, Any]) -> bool:
    """True only when the driver ran on this host and its process no longer exists."""
    pid = status.get("pid")
    if not isinstance(pid, int) or status.get("hostname") != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _parse_record(line: bytes) -> dict[str, Any] | None:
    try:
        raw = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("round"), int):
        return None
    rec: dict[str, Any] = {"round": raw["round"], "time": _num(raw.get("time"))}
    for k, v in raw.items():
        if k not in ("round", "time") and isinstance(v, int | float):
            rec[k] = _num(v)
    return rec


def _latest(history: list[dict[str, Any]], key: str) -> tuple[float | None, int | None]:
    for rec in reversed(history):
        if rec.get(key) is not None:
            return rec[key], rec["round"]
    return None, None


def _last_checkpoint(path: Path) -> Path | None:
    root = path / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("round_*") if (p / "COMPLETE").exists())
    return done[-1] if done else None


def _round_of(name: str) -> int | None:
    digits = name.rsplit("_", 1)[-1]
    return int(digits) if digits.isdigit() else None


def _workers(raw: Any) -> list[RoleHealth]:
    if not isinstance(raw, dict):
        return []
    out = []
    for role, w in raw.items():
        if isinstance(w, dict):
            out.append(
                RoleHealth(
                    role=str(role),
                    num_workers=_int(w.get("num_workers")) or 0,
                    alive=_int(w.get("alive")),
                    restarts=_int(w.get("restarts")) or 0,
                    nodes=[str(n) for n in w.get("nodes", []) if isinstance(n, str)],
                )
            )
    return out


def _dig(data: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(part)  # type: ignore[assignment]
    return data if isinstance(data, str | int | float | bool) else None


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v) if math.isfinite(v) else None


def _version(v: Any) -> int | None:
    """-1 (nothing published yet) and anything unreadable are None."""
    return int(v) if isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 else None


def _int(v: Any) -> int | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return max(0, int(v))
