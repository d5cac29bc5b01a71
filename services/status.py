"""The driver's state for the status service: ``status.json`` and the run's pace."""

from __future__ import annotations

import json
import time
from collections import deque
from typing import Any

from services.run import RunDir


def update_status(run_dir: RunDir, **fields: Any) -> None:
    """Merge ``fields`` into ``status.json`` (the driver sets state and identity through this)."""
    path = run_dir.path / "status.json"
    try:
        status = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        status = {}
    run_dir.write_status({**status, **fields, "updated": time.time()})


class Pace:
    """Wall-clock pace over the last ``window`` rounds (evaluation and checkpoints included)."""

    def __init__(self, history: list[dict[str, Any]], window: int = 10):
        self.done: deque[tuple[float, float]] = deque(maxlen=window)  # (seconds, images)
        self.last_tick = time.time()
        self.metrics: dict[str, Any] = {}
        self.accuracy: tuple[int, float] | None = None
        for rec in history:
            if "eval/accuracy" in rec:
                self.accuracy = (int(rec["round"]), float(rec["eval/accuracy"]))

    def add(self, round_: int, metrics: dict[str, Any]) -> None:
        now = time.time()
        self.done.append((now - self.last_tick, float(metrics.get("rollout/images", 0.0))))
        self.last_tick, self.metrics = now, metrics
        if "eval/accuracy" in metrics:
            self.accuracy = (round_, float(metrics["eval/accuracy"]))

    def seconds_per_round(self) -> float | None:
        return sum(d for d, _ in self.done) / len(self.done) if self.done else None

    def images_per_s(self) -> float | None:
        seconds = sum(d for d, _ in self.done)
        return sum(n for _, n in self.done) / seconds if seconds > 0 else None

    def status(self, round_: int, total: int, state: str) -> dict[str, Any]:
        """The pace's fields of ``status.json`` after ``round_`` of ``total``."""
        m, spr = self.metrics, self.seconds_per_round()
        remaining = total - round_
        return {
            "state": state,
            "error": None,
            "round": round_,
            "total_rounds": total,
            "reward_mean": m.get("reward/mean"),
            "reward_std": m.get("reward/std"),
            "accuracy": self.accuracy[1] if self.accuracy else None,
            "accuracy_round": self.accuracy[0] if self.accuracy else None,
            "images_per_s": self.images_per_s(),
            "rollout_images_per_s": m.get("rollout/images_per_s"),
            "seconds_per_round": spr,
            "eta_s": 0.0 if state == "finished" else remaining * spr if spr is not None else None,
        }
