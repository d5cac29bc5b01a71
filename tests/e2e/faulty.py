"""``elborl train`` with faults injected by test-only subclasses (no hook in the library).

    python -m tests.e2e.faulty [--nan-loss-steps 2,4,5] [--unguided-learner]
        [--crash-in-checkpoint N] train ARGS

- ``--nan-loss-steps``: the learner's engine makes every loss of those (1-based) optimizer
  steps NaN (a subclass of ``LearnerEngine``, run by a subclass of ``LearnerWorker``);
- ``--unguided-learner``: the learner's passes ignore the guidance scale (the mistake
  ``learner.first_ratio_tol`` catches before the first update);
- ``--crash-in-checkpoint N``: the process dies (exit 137) after round N's checkpoint files
  are written and before they are committed (a subclass of ``RunDir``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from learner.batch import TrainBatch
from learner.engine import LearnerEngine
from services.actors import LearnerWorker
from services.controller import RoleClasses
from services.run import RunDir

NAN_STEPS_ENV = "ELBORL_TEST_NAN_STEPS"  # read only by this test module, in the learner actor


class NanLossEngine(LearnerEngine):
    """A learner engine whose losses become NaN at the steps in ``ELBORL_TEST_NAN_STEPS``."""

    def _backward(self, loss: Tensor | None, batch: TrainBatch, stand_in: int) -> int:
        steps = {int(s) for s in os.environ.get(NAN_STEPS_ENV, "").split(",") if s}
        if loss is not None and int(self.engine.global_steps) + 1 in steps:
            with torch.no_grad():
                loss = loss * float("nan")
        return super()._backward(loss, batch, stand_in)


class NanLossLearner(LearnerWorker):
    engine_class = NanLossEngine

    def __init__(self, rank: int, world_size: int, threads: int, nan_steps: str = ""):
        os.environ[NAN_STEPS_ENV] = nan_steps
        super().__init__(rank, world_size, threads)


def nan_learner(steps: str) -> type:
    """A ``NanLossLearner`` that knows its steps (Ray passes only the role's own arguments)."""

    class Learner(NanLossLearner):
        def __init__(self, rank: int, world_size: int, threads: int):
            super().__init__(rank, world_size, threads, steps)

    return Learner


class UnguidedEngine(LearnerEngine):
    """A learner engine whose passes are unguided whatever the rollouts were sampled with."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.train_guidance = self.ref_guidance = 1.0


class UnguidedLearner(LearnerWorker):
    engine_class = UnguidedEngine


class CrashingRunDir(RunDir):
    """Dies like a killed process once round ``crash_round``'s files are written."""

    crash_round = -1

    def seal_checkpoint(self, tmp: Path, round_: int) -> Path:
        if round_ == self.crash_round:
            logging.getLogger("elborl.driver").error("test: crashing in checkpoint %d", round_)
            os._exit(137)
        return super().seal_checkpoint(tmp, round_)


def main(argv: list[str]) -> int:
    """What ``elborl train`` does (``services.cli.main``), with the faulty classes."""
    from services.cli import _load, build_parser
    from services.config import ConfigError
    from services.driver import train

    parser = argparse.ArgumentParser(prog="python -m tests.e2e.faulty")
    parser.add_argument("--nan-loss-steps", default="")
    parser.add_argument("--unguided-learner", action="store_true")
    parser.add_argument("--crash-in-checkpoint", type=int, default=-1)
    ours, rest = parser.parse_known_args(argv)
    extra: dict[str, Any] = {}
    if ours.nan_loss_steps:
        extra["classes"] = RoleClasses(learner=nan_learner(ours.nan_loss_steps))
    if ours.unguided_learner:
        extra["classes"] = RoleClasses(learner=UnguidedLearner)
    if ours.crash_in_checkpoint >= 0:
        CrashingRunDir.crash_round = ours.crash_in_checkpoint
        extra["run_dir_class"] = CrashingRunDir
    args = build_parser().parse_args(rest)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = _load(args)
        return train(cfg, args.address, args.resume, args.config, **extra)
    except ConfigError as exc:
        print(f"elborl train: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
