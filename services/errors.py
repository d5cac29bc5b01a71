"""Why a run stops early: the driver turns these into exit status 1 with a resume hint."""

from __future__ import annotations


class RunStopped(RuntimeError):
    """The run cannot go on; the controller checkpoints what is complete and exits 1."""


class LearnerLost(RuntimeError):
    """A learner rank died: its state is gone, so the run fails; ``--resume`` continues it."""


class ClusterLost(RuntimeError):
    """The Ray cluster went away under the driver (nothing more can be saved)."""
